"""The CUDA kernels (``cuda-fused``): ``gmbi_fused.cu`` and ``gmbinet_layers.cu`` (package data, with their
host-emulation harness in ``emu/``), :mod:`.gmbi` (one GMBI module: the PyCUDA loader, emulation),
:mod:`.gmbinet` (the whole network's module and its emulated run), :mod:`.module` (the one PyCUDA loader and
the toolkit/driver checks) and :mod:`.build` (nvcc: ahead-of-time build and compile check).
Importing this package imports none of them (nor PyCUDA)."""
