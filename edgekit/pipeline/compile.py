"""``edgekit compile`` and ``edgekit quantize``: a checkpoint or artifact -> a verified artifact folder.

``compile_model`` checks the whole request before any model is loaded, then builds the artifact
(``edgekit.pipeline.build``) or, for ``--precision auto``, lets ``edgekit.pipeline.auto`` measure the
candidates. What differs between a GMBINet checkpoint and an MLFF backbone is a method on the
source (``edgekit.pipeline.sources``), never a type check here.
"""
from __future__ import annotations

from typing import Callable, Optional

from edgekit.artifact import check_out
from edgekit.backends.registry import BackendSpec, get_backend
from edgekit.errors import EdgekitError
from edgekit.pipeline.build import build_artifact
from edgekit.pipeline.sources import METRICS

DEFAULT_PARITY_DATA = "synthetic:12"


def source_kind(source_path: str, as_backbone: bool = False) -> str:
    """The kind of model at ``source_path``, decided without loading it."""
    from edgekit.pipeline.mlff_source import MLFF_KIND, is_mlff_source

    return MLFF_KIND if is_mlff_source(source_path, as_backbone) else "gmbinet"


def check_request(target: str, precision: str, out: str, *, kind: str, calib: Optional[str], max_drop, metric: str,
                  val: Optional[str], force: bool) -> BackendSpec:
    """Every argument check that needs no model loaded: refused in one line before any work starts."""
    spec = get_backend(target)
    spec.check(precision, kind)
    check_out(out, force)
    if metric not in METRICS:
        raise EdgekitError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if max_drop is not None and val is None:
        raise EdgekitError("--max-drop needs --val: validation images to measure the drop on")
    if precision == "int8" and "calibration" in spec.needs.get("int8", ()) and calib is None:
        raise EdgekitError("--precision int8 needs --calib: real images to calibrate on (an SD-900 folder, an image "
                           "folder; or 'synthetic' to calibrate on generated images)")
    if precision == "auto" and kind != "gmbinet":
        raise EdgekitError("--precision auto is for GMBINet checkpoints; give fp32, int8, ... for an MLFF backbone")
    return spec


def compile_model(source_path: str, target: str, precision: str, out: str, *, parity_data: Optional[str] = None,
                  calib: Optional[str] = None, subset: int = 100, int8_scheme: str = "pointwise",
                  max_drop: Optional[float] = None, metric: str = "iou", val: Optional[str] = None,
                  force: bool = False, threads: Optional[int] = None, log: Callable = print,
                  as_backbone: bool = False, sign_key=None, input_size=None, resize=None) -> dict:
    """Build one artifact folder; returns its manifest.

    ``parity_data``: images for the parity check; by default the real images given (``val``, then
    ``calib``), else a few synthetic ones. ``as_backbone``: compile ``source_path`` (a backbone
    name or weights file) as an MLFF backbone; a registry folder or a backbone name is one anyway.
    ``input_size`` ((height, width), ``--input-size``) and ``resize`` (``--resize``): build a GMBINet for
    that input instead of its checkpoint's; recorded in the manifest, parity measured at it.
    """
    kind = source_kind(source_path, as_backbone)
    spec = check_request(target, precision, out, kind=kind, calib=calib, max_drop=max_drop, metric=metric, val=val,
                         force=force)
    if parity_data is None:
        parity_data = val or (calib if calib not in (None, "synthetic") else None) or DEFAULT_PARITY_DATA
    if precision == "auto":
        from edgekit.pipeline.auto import compile_auto

        return compile_auto(source_path, target, out, parity_data=parity_data, calib=calib, subset=subset,
                            int8_scheme=int8_scheme, max_drop=max_drop, metric=metric, val=val, force=force,
                            threads=threads, log=log, sign_key=sign_key, input_size=input_size, resize=resize)
    return build_artifact(spec, source_path, precision, out, parity_data=parity_data, calib=calib, subset=subset,
                          int8_scheme=int8_scheme, max_drop=max_drop, metric=metric, val=val, force=force,
                          threads=threads, log=log, as_backbone=as_backbone, sign_key=sign_key,
                          input_size=input_size, resize=resize)
