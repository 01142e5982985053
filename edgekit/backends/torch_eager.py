"""``torch``: PyTorch eager, the reference every artifact is compared with.

It runs checkpoints as they are (edgekit checkpoints and plain GMBINet state_dicts): a backend
like the others, but not a compile target. Load options: ``threads``, ``device``. torch is imported
when a runner is made, so listing the registry stays cheap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.backends.base import Runner
from edgekit.backends.registry import BackendSpec, register_backend


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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(self._check_batch(batch)).to(self.device)
            return self.model(x).float().cpu().numpy()


def _load(path: Path, threads: int | None = None, device: str = "cpu") -> TorchRunner:
    from edgekit.models.checkpoint import load_checkpoint

    return TorchRunner(load_checkpoint(path), threads=threads, device=device)


SPEC = register_backend(BackendSpec(
    name="torch", description="PyTorch eager (the source model; runs checkpoints, not a compile target)",
    precisions=("fp32",), load=_load, package="torch", pip_name="torch", load_options=("threads", "device"),
    tools=("torch",), bench_default=("fp32",),
))
