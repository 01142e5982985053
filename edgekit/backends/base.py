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
    ``N x 1 x H x W``. Subclasses set ``spec``, ``name`` (backend), ``precision`` and ``source``, and
    implement ``_infer``, which gets a batch the base class has already checked (Polygraphy's runners:
    ``infer`` checks, ``infer_impl`` runs).

    ``close()`` frees what the runner holds (sessions, compiled models, a kernel worker pool, device
    memory) now rather than whenever the garbage collector gets to it; a closed runner refuses ``infer``.
    A runner is a context manager: ``with runtime.load(path) as runner: ...`` closes it on the way out.
    """

    name = "runner"
    precision = "fp32"
    _closed = False
    # True where the runner's own kernel checks finiteness: it counts the batch's NaN/inf values while it reads
    # the input anyway, and ``_infer`` raises ``_nonfinite_error`` (the same one line) before returning anything
    # for a batch holding any, so ``infer`` skips its separate pass over the batch (fail-closed either way).
    kernel_checks_finite = False

    def __init__(self, spec: PreprocessSpec, source: Path, meta: Optional[dict] = None):
        self.spec = spec
        self.source = Path(source)
        self.meta = meta or {}

    @property
    def input_shape(self):
        return (self.spec.channels, *self.spec.input_size)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch``, after the one set of input checks every backend shares
        (``_check_batch``: float32, ``N x C x H x W`` of this runner's input, every value finite; the last
        checked by the kernel instead where ``kernel_checks_finite``)."""
        if self._closed:
            raise EdgekitError(f"{self.name}: this runner was closed ({self.source})")
        return self._infer(self._check_batch(batch, finite=not self.kernel_checks_finite))

    def _infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Run a checked batch (C-contiguous float32 of ``input_shape``, finite; where ``kernel_checks_finite``,
        not yet checked for finiteness: then ``_infer`` must refuse a non-finite batch itself)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the runner holds; idempotent.  Subclasses free their own resources, then call this."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def _nonfinite_error(self, batch: np.ndarray, count: int) -> EdgekitError:
        return EdgekitError(f"{self.name}: the batch holds {count:,} non-finite values (NaN or inf) of "
                            f"{batch.size:,}; refused")

    def _check_finite(self, batch: np.ndarray) -> None:
        # the fp32 sum first (one vectorised pass, no temporary; about 0.1 ms for a 512 x 512 image, a few % of
        # the fastest inference): only a non-finite sum, NaN/inf or an overflow of huge values, needs the full check
        with np.errstate(all="ignore"):
            suspect = not np.isfinite(batch.sum())
        if suspect and not np.isfinite(batch).all():
            raise self._nonfinite_error(batch, int((~np.isfinite(batch)).sum()))

    def _check_batch(self, batch: np.ndarray, finite: bool = True) -> np.ndarray:
        try:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise EdgekitError(f"{self.name}: the batch is not a float32 array ({e})") from None
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.input_shape):
            raise EdgekitError(f"{self.name}: expected a batch N x {' x '.join(map(str, self.input_shape))}, "
                               f"got {' x '.join(map(str, batch.shape))}")
        if finite:
            self._check_finite(batch)
        return batch
