"""The one runner interface every backend implements: ``infer(batch)`` on preprocessed batches.

``eval``, ``predict``, ``bench`` and the parity checks only ever see this interface (Polygraphy's
runner/comparator split), so they never care where a model came from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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

    def executed_precision(self) -> Optional[dict]:
        """What the backend reports it actually runs, read back after compilation (``label``: e.g. "f32"),
        or None where there is nothing to read back and the declared ``precision`` is what runs."""
        return None

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.input_shape):
            raise EdgekitError(f"{self.name}: expected a batch N x {' x '.join(map(str, self.input_shape))}, "
                               f"got {' x '.join(map(str, batch.shape))}")
        return batch
