"""edgekit's own GMBINet kernels, in three parts:

* the shared graph, device-neutral (numpy only): :mod:`edgekit.kernels.graph` (the folded network's
  parameter layout and the one launch planner every executor follows) and :mod:`edgekit.kernels.sources`
  (the digest tying a built kernel to its source);
* :mod:`edgekit.kernels.cpu`: the fused CPU kernels (``cpu-fused``): ``runtime`` loads and runs a built
  library (numpy + ctypes), ``build`` compiles it (a C++ compiler) and calibrates its INT8 1x1s;
* :mod:`edgekit.kernels.cuda`: the CUDA kernels (``cuda-fused``): the PyCUDA loaders, the nvcc build and
  check, and the host emulation of the ``.cu`` sources.

Folding a PyTorch model for them (:mod:`edgekit.kernels.fold`) is build-side and the only part that needs
torch.  Importing this package imports nothing: a device loading a cpu-fused artifact pulls in the shared
graph and ``cpu.runtime`` only.
"""
