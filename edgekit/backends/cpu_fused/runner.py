"""Run a ``cpu-fused`` artifact: the library for the best ISA this CPU has, loaded with ctypes.

``CpuFusedRunner(folder, threads=N)`` verifies the manifest's hashes (weights and libraries), picks the
fastest library the CPU can run (``choose_isa``; one line naming what the CPU has and what the artifact
needs when it runs none), starts the kernels' persistent pool of ``N`` threads, and plans each batch size
once (``plan_gmbinet``: buffers preallocated, the op program built).  A batch of 2+ images is streamed
through the stages image by image (``batch_path``, :data:`edgekit.kernels.cpu.runtime.BATCH_PATHS`).  ``infer`` points the program's input
and output at the caller's batch and a fresh result array (no copies), runs it, and returns the result;
calls on one runner are serialised.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.backends.artifact_runner import ArtifactRunner

TARGET = "cpu-fused"


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CpuFusedRunner(ArtifactRunner):
    name = TARGET

    def __init__(self, folder, threads: Optional[int] = None, isa: Optional[str] = None,
                 fuse_head: bool = True, batch_path: str = "stream"):
        super().__init__(folder)  # verified first: signature (keys trusted), paths, every file's sha256
        from edgekit.backends.cpu_fused.build import check_geometry
        from edgekit.kernels.cpu.runtime import CpuKernels, FusedNet, choose_isa

        if self.artifact is None:
            raise EdgekitError(f"{folder}: cpu-fused runs artifact folders (edgekit compile --target cpu-fused)")
        folder, m = self.artifact.folder, self.manifest
        libs = m.get("kernels", {}).get("libraries", {})
        if not libs or not all(isinstance(v, dict) for v in libs.values()):
            raise EdgekitError(f"{folder}: not a complete cpu-fused artifact (no kernel libraries)")
        # every geometry value checked against the hashed weights' size before any native code is loaded
        weights_size = self.artifact.path(m.get("model_file"), "model_file").stat().st_size
        net, offsets = check_geometry(folder, m, weights_size)
        if isa is not None:
            if isa not in libs:
                raise EdgekitError(f"{folder}: has no {isa} library (it holds {', '.join(libs)})")
            choose_isa([isa])  # still refuse an ISA this CPU lacks
            self.isa = isa
        else:
            self.isa = choose_isa(list(libs))
        self.threads = int(threads) if threads else default_threads()
        weights = np.frombuffer(self.artifact.read(m["model_file"], "model_file"), dtype=np.uint8)
        if weights.nbytes != weights_size:
            raise EdgekitError(f"{folder}: {m['model_file']} changed after it was verified; refused")
        lib_name = libs[self.isa].get("file")
        library = self.artifact.read(lib_name, f"kernel library ({self.isa})")  # hashed as read, loaded as read
        self.kernels = CpuKernels.from_bytes(library, f"{folder}/{lib_name}", self.threads)
        self.fused = FusedNet(self.kernels, net, weights, offsets, fuse_head=fuse_head, batch_path=batch_path)
        # the stem counts the batch's NaN/inf while it reads it: no separate pass over the batch (0.2 ms a 512² image)
        self.kernel_checks_finite = self.kernels.counts_nonfinite
        if net.in_channels != self.spec.channels:
            raise EdgekitError(f"{folder}: the model takes {net.in_channels} channels, its preprocessing gives "
                               f"{self.spec.channels}")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        fused = self.fused  # once: close() from another thread may set it to None after infer's closed check
        if fused is None:
            raise EdgekitError(f"{self.name}: this runner was closed ({self.source})")
        if not self.kernel_checks_finite:
            return fused.forward(batch)
        out, nonfinite = fused.forward(batch, count_nonfinite=True)
        if nonfinite is None:  # nothing counted them (see FusedNet.forward): the base class's pass, still before returning
            self._check_finite(batch)
        elif nonfinite:
            raise self._nonfinite_error(batch, nonfinite)  # the output of a batch holding NaN/inf is never returned
        return out

    def close(self) -> None:
        """Stop the kernels' worker threads and drop the weights and activation arenas now."""
        fused = getattr(self, "fused", None)
        if fused is not None:  # the image-parallel lanes' threads and pools
            fused.close()
        kernels = getattr(self, "kernels", None)
        if kernels is not None:
            kernels.close()
        self.fused = None
        super().close()

    def describe(self) -> str:
        return f"{self.name} {self.precision} {self.isa} x{self.threads} threads ({self.source})"
