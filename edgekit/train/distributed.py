"""Multi-process training: ``edgekit train --nproc N`` and runs under an external ``torchrun``.

One process per rank, started by ``torch.distributed.run`` (``launch``) or by the user's own ``torchrun``
on several machines; every rank reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``...) in ``context()``. Gradients are averaged by
``DistributedDataParallel`` (gloo on the CPU, NCCL on GPUs).

Data: the recipe's ``train.batch`` stays the *global* batch. Every rank draws the same global batch from
the pure (seed, iteration) sampler and keeps its own contiguous share (what ``DistributedSampler`` gives:
disjoint shards per rank), so N ranks step through exactly the samples and augmentations one process
would, a resumed run draws the same batches whatever N it resumes with, and the loss curve of N ranks
follows N=1's (up to BatchNorm statistics over a shard instead of the whole batch, and dropout masks).
Rank 0 keeps the seeded RNG stream of a single process; the others reseed from (seed, rank, iteration),
so their dropout masks differ. Only rank 0 validates and writes checkpoints, logs and the report.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch

from edgekit.errors import EdgekitError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, base: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if base.type == "cuda" and self.enabled else base

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers: BatchNorm running statistics follow rank 0's, the ones checkpoints keep
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, *tensors: torch.Tensor):
        """This rank's contiguous share of a global batch."""
        if not self.enabled:
            return tensors
        return tuple(torch.tensor_split(t, self.world)[self.rank] for t in tensors)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (the global batch's loss, for the log)."""
        if not self.enabled:
            return float(value.detach())
        v = value.detach().reshape(1).clone()
        torch.distributed.all_reduce(v)
        return float(v) / self.world

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def context(device: torch.device, global_batch: int) -> DistContext:
    """The process group of this run, from torchrun's environment (a single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                      local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                      backend="nccl" if device.type == "cuda" else "gloo")
    if global_batch % world:
        raise EdgekitError(f"train.batch {global_batch} (the global batch) does not split over {world} processes: "
                           f"use a multiple of {world}")
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(ctx.backend)
        _OWNED.append(True)
    return ctx


_OWNED: List[bool] = []  # whether context() made the process group (a caller's own group is left alone)


def shutdown() -> None:
    if _OWNED and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNED.clear()


def rank_seed(seed: int, rank: int, iteration: int) -> int:
    from edgekit.train.data import _mix

    return _mix(seed, rank, iteration, 0xD157)


def launch(nproc: int, train_args: List[str], nnodes: int = 1) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m edgekit.cli train ...``.

    The ranks' stderr (progress, log) passes through; their stdout (rank 0's result line) is returned.
    """
    if nproc < 1:
        raise EdgekitError("--nproc must be at least 1")
    if os.environ.get("WORLD_SIZE"):
        raise EdgekitError("--nproc under torchrun: torchrun already started the processes (drop --nproc)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nnodes={nnodes}",
           f"--nproc_per_node={nproc}", "-m", "edgekit.cli", "train", *train_args]
    env = os.environ.copy()
    env.setdefault("OMP_NUM_THREADS", "1")  # the loop sets torch's threads per rank; quiets torchrun's note
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_edgekit_root(), env.get("PYTHONPATH")) if p)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise EdgekitError(f"distributed training failed (torch.distributed.run exited {p.returncode}; "
                           "the ranks' messages are above)")
    return p


def _edgekit_root() -> str:
    import edgekit

    return str(os.path.dirname(os.path.dirname(os.path.abspath(edgekit.__file__))))
