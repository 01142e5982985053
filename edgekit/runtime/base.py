"""One runner interface for every model source, and the registry backends add themselves to.

A backend module calls ``register_backend(Backend(...))`` at import time. ``load(path)`` asks each
registered backend, in priority order, whether it recognises the path; so ``eval``, ``predict`` and
``bench`` never care where a model came from, and a backend whose optional package is missing only
fails when someone actually asks for it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError


class Runner:
    """Runs a segmentation model on preprocessed batches.

    ``infer(batch)`` takes float32 ``N x C x H x W`` (see ``spec``) and returns float32 probabilities
    ``N x 1 x H x W``. Subclasses set ``spec``, ``name`` (backend), ``precision`` and ``source``.
    """

    name = "runner"
    precision = "fp32"

    def __init__(self, spec: PreprocessSpec, source: Path, meta: Optional[dict] = None):
        self.spec = spec
        self.source = Path(source)
        self.meta = meta or {}

    @property
    def input_shape(self):
        return (self.spec.channels, *self.spec.input_size)

    def infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def warmup(self, iterations: int = 2, batch: int = 1) -> None:
        x = np.random.default_rng(0).standard_normal((batch, *self.input_shape)).astype(np.float32)
        for _ in range(iterations):
            self.infer(x)

    def describe(self) -> str:
        return f"{self.name} {self.precision} ({self.source})"

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.input_shape):
            raise EdgekitError(f"{self.name}: expected a batch N x {' x '.join(map(str, self.input_shape))}, "
                               f"got {' x '.join(map(str, batch.shape))}")
        return batch


@dataclass
class Backend:
    name: str
    recognizes: Callable[[Path], bool]  # cheap check on the path, without importing heavy packages
    load: Callable[..., Runner]
    priority: int = 50


_BACKENDS: Dict[str, Backend] = {}
# Modules imported on first use of the registry; each registers its backend(s).
_BUILTIN = (
    "edgekit.runtime.torch_runner",
    "edgekit.runtime.onnx_runner",
    "edgekit.runtime.openvino_runner",
    "edgekit.runtime.cuda_fused_runner",
    "edgekit.runtime.trt_runner",
    "edgekit.backends.cpu_fused.runner",
)


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def _ensure_builtin():
    for mod in _BUILTIN:
        importlib.import_module(mod)


def backends() -> List[Backend]:
    _ensure_builtin()
    return sorted(_BACKENDS.values(), key=lambda b: b.priority)


def load(path: str | os.PathLike, **options) -> Runner:
    """A runner for a checkpoint file or an artifact folder, whichever backend it belongs to."""
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"model not found: {p}")
    for b in backends():
        if b.recognizes(p):
            return b.load(p, **options)
    from edgekit.export.artifact import is_artifact, read_manifest

    if is_artifact(p):  # say what is wrong with it: corrupt manifest, or a target with no runner here
        target = read_manifest(p).get("target")
        raise EdgekitError(f"{p}: no runtime backend for artifact target {target!r} is available here")
    raise EdgekitError(f"{p}: not a checkpoint or artifact folder any installed backend recognises")
