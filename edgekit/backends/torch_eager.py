"""``torch``: PyTorch eager, the reference every artifact is compared with.

It runs checkpoints as they are (edgekit checkpoints and plain GMBINet state_dicts): a backend
like the others, but not a compile target. Load options: ``threads``, ``device``; on a CUDA device
also ``mode`` (``eager``, ``graph``: eager replayed from a CUDA graph per batch size, ``compile``:
``torch.compile``), ``precision`` (fp32, fp16) and ``max_autotune``. torch is imported when a runner
is made, so listing the registry stays cheap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.backends.base import Runner
from edgekit.backends.registry import BackendSpec, register_backend


# The one list of the torch GPU modes: the loader checks it, and bench --device gpu's rows are its variants.
TORCH_MODES = ("eager", "graph", "compile")


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, checkpoint, threads: int | None = None, device: str = "cpu"):
        import torch

        super().__init__(checkpoint.preprocess, checkpoint.path or Path("."), {"checkpoint_sha256": checkpoint.sha256})
        self.checkpoint = checkpoint
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = torch.device(device)
        self.model = checkpoint.build().to(self.device)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(batch).to(self.device)
            return self.model(x).float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        super().close()


class TorchGpuRunner(Runner):
    """GMBINet on the GPU: eager, eager replayed from CUDA graphs (one per batch size), or torch.compile."""

    def __init__(self, checkpoint, mode: str = "eager", precision: str = "fp32", max_autotune: bool = False):
        import torch

        super().__init__(checkpoint.preprocess, checkpoint.path or Path("."), {"checkpoint_sha256": checkpoint.sha256})
        self.torch = torch
        self.name, self.precision, self.mode = f"torch-{mode}", precision, mode
        self.device = torch.device("cuda")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        torch.backends.cudnn.benchmark = True
        model = checkpoint.build().eval().to(self.device, self.dtype)
        if mode == "compile":
            model = torch.compile(model, mode="max-autotune" if max_autotune else None)
        self.model = model
        self._graphs: dict = {}

    def _graph(self, n: int):
        torch = self.torch
        if n not in self._graphs:
            static_in = torch.randn(n, *self.input_shape, device=self.device, dtype=self.dtype)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(3):  # warm-up (cuDNN autotuning) outside the capture
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[n] = (graph, static_in, static_out)
        return self._graphs[n]

    def infer_device(self, x):
        """CUDA tensor in, CUDA tensor out (for CUDA-graph rows: the graph's own output buffer)."""
        torch = self.torch
        if self.mode == "graph":
            graph, static_in, static_out = self._graph(int(x.shape[0]))
            static_in.copy_(x)
            graph.replay()
            return static_out
        with torch.inference_mode():
            return self.model(x.to(self.dtype))

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(batch).to(self.device)
        return self.infer_device(x).float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()  # the captured graphs hold their static buffers
        self.model = None
        super().close()


def _load(path: Path, threads: int | None = None, device: str = "cpu", mode: str = "eager", precision: str = "fp32",
          max_autotune: bool = False) -> Runner:
    from edgekit.errors import EdgekitError
    from edgekit.models.checkpoint import load_checkpoint

    if mode not in TORCH_MODES:
        raise EdgekitError(f"torch: unknown mode {mode!r} (choose from {', '.join(TORCH_MODES)})")
    if str(device).startswith("cuda"):
        return TorchGpuRunner(load_checkpoint(path), mode, precision, max_autotune=max_autotune)
    if mode != "eager" or precision != "fp32":
        raise EdgekitError(f"torch on the CPU runs eager fp32 (mode {mode!r}, precision {precision!r} need a CUDA device)")
    return TorchRunner(load_checkpoint(path), threads=threads, device=device)


SPEC = register_backend(BackendSpec(
    name="torch", description="PyTorch eager (the source model; runs checkpoints, not a compile target)",
    precisions=("fp32", "fp16"), load=_load, package="torch", pip_name="torch",
    load_options=("threads", "device", "mode", "precision", "max_autotune"),
    tools=("torch",), bench_default=("fp32",),
    variants={m: {"mode": m} for m in TORCH_MODES}, gpu_bench_default=("fp32", "fp16"),
    gpu_load_options={"device": "cuda"}, runs_checkpoints=True,
))
