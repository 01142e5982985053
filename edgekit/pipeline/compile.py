"""``edgekit compile`` and ``edgekit quantize``: a checkpoint or artifact -> a verified artifact folder.

The command builds one ``CompileRequest`` (``edgekit.pipeline.request``) and hands it to
``compile_artifact``, which checks the whole request before any model is loaded, then builds the
artifact (``edgekit.pipeline.build``) or, for ``--target auto`` / ``--precision auto``, lets
``edgekit.pipeline.auto`` measure the candidates. What differs between a GMBINet checkpoint and an
MLFF backbone is a method on the source (``edgekit.pipeline.sources``), never a type check here.
"""
from __future__ import annotations

from typing import Callable, Optional

from edgekit.artifact import check_out
from edgekit.backends.registry import BackendSpec, get_backend
from edgekit.errors import EdgekitError
from edgekit.pipeline.build import build_artifact
from edgekit.pipeline.request import AUTO, DEFAULT_PARITY_DATA, CompileRequest
from edgekit.pipeline.sources import METRICS

__all__ = ["CompileRequest", "DEFAULT_PARITY_DATA", "check_request", "compile_artifact", "compile_model",
           "source_kind"]


def source_kind(source_path: str, as_backbone: bool = False) -> str:
    """The kind of model at ``source_path``, decided without loading it."""
    from edgekit.pipeline.mlff_source import MLFF_KIND, is_mlff_source

    return MLFF_KIND if is_mlff_source(source_path, as_backbone) else "gmbinet"


def check_request(request: CompileRequest) -> Optional[BackendSpec]:
    """Every check of ``request`` that needs no model loaded: refused in one line before any work starts.
    Returns the target's spec (None for ``--target auto``: ``auto`` picks the specs)."""
    kind = source_kind(request.source, request.as_backbone)
    if request.is_auto and kind != "gmbinet":
        raise EdgekitError(f"--{'target' if request.target == AUTO else 'precision'} auto is for GMBINet checkpoints; "
                           "give a target and fp32, int8, ... for an MLFF backbone")
    spec = None if request.target == AUTO else get_backend(request.target)
    if spec is not None:
        spec.check(request.precision, kind)
    check_out(request.out, request.force)
    if request.metric not in METRICS:
        raise EdgekitError(f"unknown metric {request.metric!r} (choose from {', '.join(METRICS)})")
    if request.max_drop is not None and request.val is None:
        raise EdgekitError("--max-drop needs --val: validation images to measure the drop on")
    if request.precision == "int8" and request.calib is None and (
            spec is None or "calibration" in spec.needs.get("int8", ())):
        raise EdgekitError("--precision int8 needs --calib: real images to calibrate on (an SD-900 folder, an image "
                           "folder; or 'synthetic' to calibrate on generated images)")
    if request.is_auto:
        from edgekit.pipeline.auto import check_auto_request

        check_auto_request(request)
    return spec


def compile_artifact(request: CompileRequest, log: Callable = print, note: Optional[Callable] = None,
                     result: Optional[Callable] = None) -> dict:
    """Build the artifact folder ``request`` asks for; returns its manifest.

    ``log``: the build's own messages (kernels built, INT8 drops); ``note``: what ``auto`` measured and why it
    chose (default: ``log``); ``result``: the one result line (``wrote OUT: ...``; default: ``log``). The CLI
    sends log and note to stderr and the result line alone to stdout."""
    spec = check_request(request)
    if request.is_auto:
        from edgekit.pipeline.auto import compile_auto

        return compile_auto(request, log=log, note=note or log, result=result)
    return build_artifact(spec, request, log=log, result=result)


def compile_model(source_path: str, target: str, precision: Optional[str], out: str, *, log: Callable = print,
                  note: Optional[Callable] = None, result: Optional[Callable] = None, **options) -> dict:
    """``compile_artifact(CompileRequest(source=source_path, target=..., precision=..., out=..., **options))``:
    the library's short form; ``options`` are ``CompileRequest``'s other fields (an unknown one is a TypeError)."""
    request = CompileRequest(source=source_path, target=target, precision=precision, out=out, **options)
    return compile_artifact(request, log=log, note=note, result=result)
