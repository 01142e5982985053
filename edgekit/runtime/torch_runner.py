"""PyTorch eager runner for edgekit checkpoints and plain GMBINet state_dicts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgekit.models.checkpoint import Checkpoint, load_checkpoint
from edgekit.runtime.base import Backend, Runner, register_backend


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, checkpoint: Checkpoint, threads: int | None = None, device: str = "cpu"):
        super().__init__(checkpoint.preprocess, checkpoint.path or Path("."), {"checkpoint_sha256": checkpoint.sha256})
        self.checkpoint = checkpoint
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.model = checkpoint.build().to(self.device)

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(self._check_batch(batch)).to(self.device)
        return self.model(x).float().cpu().numpy()


def _is_checkpoint_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin")


register_backend(Backend(
    name="torch",
    recognizes=_is_checkpoint_file,
    load=lambda p, threads=None, **_: TorchRunner(load_checkpoint(p), threads=threads),
    priority=90,
))
