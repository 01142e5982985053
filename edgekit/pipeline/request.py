"""``CompileRequest``: everything ``edgekit compile`` / ``edgekit quantize`` (or a library caller) asks
for, built once and handed down the pipeline whole (``compile_model`` -> ``check_request`` ->
``build_artifact`` / ``auto``), so an option is declared in one place: a new compile option is a new
field here (with its default) plus the code that reads it, not a parameter added to five signatures.

The request is frozen: a step that needs a variant (``auto`` builds each candidate without a budget
into a temporary folder) makes one with ``dataclasses.replace`` and leaves the caller's as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

DEFAULT_PARITY_DATA = "synthetic:12"
AUTO = "auto"  # --target auto / --precision auto: measure the candidates here and keep the fastest


@dataclass(frozen=True, kw_only=True)
class CompileRequest:
    """One compile: ``source`` (a checkpoint, float artifact, MLFF registry or backbone) to ``out``.

    ``target``/``precision``: a registered target and one of its precisions, or ``auto`` for either
    (``edgekit.pipeline.auto``); ``precision=None`` means ``fp32``, or ``auto`` with ``target="auto"``.
    ``parity_data``: images for the parity check; None: the real images given (``val``, then ``calib``),
    else a few synthetic ones. ``sign_key``: a loaded Ed25519 private key (loaded by the command before
    any work). ``as_backbone``: compile ``source`` as an MLFF backbone."""

    source: str
    target: str
    precision: Optional[str] = None
    out: str
    parity_data: Optional[str] = None
    calib: Optional[str] = None
    subset: int = 100
    int8_scheme: str = "pointwise"
    max_drop: Optional[float] = None
    metric: str = "iou"
    val: Optional[str] = None
    force: bool = False
    threads: Optional[int] = None
    as_backbone: bool = False
    # --input-size (height, width) / --resize (stretch, letterbox): build a GMBINet for that input instead of its
    # checkpoint's; recorded in the manifest's preprocess, parity measured at it (None: the checkpoint's own)
    input_size: Optional[Tuple[int, int]] = None
    resize: Optional[str] = None
    sign_key: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.precision is None:
            object.__setattr__(self, "precision", AUTO if self.target == AUTO else "fp32")
        for name in ("source", "out"):  # paths arrive as str or Path; the manifest records str
            object.__setattr__(self, name, str(getattr(self, name)))
        for name in ("calib", "val", "parity_data"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    @property
    def is_auto(self) -> bool:
        return AUTO in (self.target, self.precision)

    @property
    def parity_images(self) -> str:
        """The images parity is checked on: ``parity_data``, else the real images given (``val``, then
        ``calib`` unless it is the synthetic generator), else ``DEFAULT_PARITY_DATA``."""
        if self.parity_data is not None:
            return self.parity_data
        return self.val or (self.calib if self.calib not in (None, "synthetic") else None) or DEFAULT_PARITY_DATA
