"""Which rows a benchmark runs: artifacts as given, checkpoints expanded into backend x precision
rows compiled once into a cache folder (keyed by the checkpoint's sha256)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

from edgekit.backends.registry import get_backend, spec_for_model_file
from edgekit.errors import EdgekitError
from edgekit.artifact import is_artifact, read_manifest
from edgekit.utils import sha256_file

BASELINE = "openvino:default"


def default_cpu_backends(all_rows: bool = False, log=None) -> list:
    """The rows of ``edgekit bench CKPT`` without ``--backends``: each CPU backend's ``bench_default``
    (the one place that chooses them, in the backend's spec); ``all_rows``: every CPU backend x
    precision it offers (``--all``)."""
    from edgekit.backends.registry import backends, buildable_here, default_bench_rows

    if not all_rows:
        return default_bench_rows("cpu", log)
    rows = []
    for b in backends():
        if not (b.device == "cpu" and "gmbinet" in b.kinds and buildable_here(b, log, "--all")):
            continue
        for p in (b.precisions if b.build is not None else ("",)):
            why = b.precision_not_here(p) if p and b.precision_not_here else None
            if why:  # e.g. cpu-fused bf16 on a CPU without AMX
                if log:
                    log(f"--all: {b.name}:{p} left out ({why})")
                continue
            rows.append(b.name if b.build is None else f"{b.name}:{p}")
    return rows


def cache_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def parse_backend(spec: str):
    target, _, precision = spec.partition(":")
    return target, precision or "fp32"


def artifact_for(ckpt: Path, spec: str, calib: Optional[str], parity_data: str, threads, log,
                 input_size: Optional[Tuple[int, int]] = None) -> Path:
    """Compile (or reuse) the artifact of ``ckpt`` for ``spec`` = target[:precision] (at ``input_size``,
    ``bench --size``: cached apart from the checkpoint's own size)."""
    from edgekit.pipeline.compile import compile_model

    target, precision = parse_backend(spec)
    sized = f"_{input_size[0]}x{input_size[1]}" if input_size else ""
    folder = cache_root() / "bench" / sha256_file(ckpt)[:16] / f"{target}_{precision}{sized}"
    if is_artifact(folder):
        try:
            why = get_backend(target).outdated
            why = why(read_manifest(folder)) if why else None
            if why is None:
                log(f"  cached: {folder}")
                return folder
            log(f"  cached artifact is outdated ({why}): rebuilding")
        except EdgekitError:
            pass  # stale or corrupt cache entry: rebuild it
    log(f"  compiling into {folder} (cached for the next run)")
    compile_model(str(ckpt), target, precision, str(folder), calib=calib, parity_data=parity_data,
                       force=True, threads=threads, log=log, input_size=input_size)
    return folder


def check_row_size(models: List[str], input_size: Optional[Tuple[int, int]]) -> None:
    """``bench --size``: an artifact or plain model file runs at the size it was built for; one of another
    size is refused (before anything is compiled) rather than timed beside rows at ``input_size``."""
    if not input_size:
        return
    for m in models:
        p = Path(m)
        if is_artifact(p):
            have = tuple((read_manifest(p).get("preprocess") or {}).get("input_size") or ())
            if have != tuple(input_size):
                raise EdgekitError(f"{p} runs at {'x'.join(map(str, have)) or 'an unknown size'}, not --size "
                                   f"{input_size[0]}x{input_size[1]}: give the checkpoint (compiled for each size) "
                                   "or an artifact built with compile --input-size")
        elif spec_for_model_file(p) is not None:
            raise EdgekitError(f"{p} is a plain model file with its own input size; --size needs a checkpoint or "
                               "artifacts")


def at_size(runner, input_size: Optional[Tuple[int, int]]):
    """A checkpoint's runner (torch runs any size) set to run at ``input_size`` (``bench --size``)."""
    if input_size and tuple(runner.spec.input_size) != tuple(input_size):
        import dataclasses

        runner.spec = dataclasses.replace(runner.spec, input_size=tuple(input_size))
    return runner


def _model_rows(m: str, backends: List[str]):
    """[(row name, spec or None)] of one model argument: an artifact or a plain model file is one row as
    given (spec None); a checkpoint one row per backend spec."""
    p = Path(m)
    if is_artifact(p):
        man = read_manifest(p)
        return [(f"{man['target']}:{man['precision']} ({p.name})", None)]
    if spec_for_model_file(p) is not None:  # a plain model.onnx / model.xml: run as given
        return [(p.name, None)]
    return [(parse_backend(s)[0] if get_backend(parse_backend(s)[0]).build is None else s, s) for s in backends]


def row_names(models: List[str], backends: List[str]) -> List[str]:
    """The names ``plan_rows`` will give its rows, known before anything is compiled."""
    for m in models:
        if not Path(m).exists():
            raise EdgekitError(f"model not found: {m}")
    return [name for m in models for name, _ in _model_rows(m, backends)]


def resolve_baseline(wanted: Optional[str], names: List[str]) -> Optional[str]:
    """The row ``--baseline`` names: the row's full name, or a unique match of what comes before its
    " (...)" (``openvino:default``) or inside it (the artifact folder's name); without ``--baseline``, the
    plain OpenVINO row (``BASELINE``) where there is one. One error line for a name that is no row."""
    if wanted is None:
        return next((n for n in names if n.startswith(BASELINE)), None)
    if wanted in names:
        return wanted
    hits = [n for n in dict.fromkeys(names)
            if n.split(" (", 1)[0] == wanted or n.endswith(f"({wanted})")]
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(dict.fromkeys(names)) or "none"
    if hits:
        raise EdgekitError(f"--baseline {wanted} matches several rows ({', '.join(hits)}): give the full row name")
    raise EdgekitError(f"--baseline {wanted} is not a row of this bench (rows: {listed})")


def plan_rows(models: List[str], backends: List[str], calib: Optional[str], parity_data: str, threads, log,
              input_size: Optional[Tuple[int, int]] = None):
    """[(row name, path)] for the benchmark; says on ``log`` which artifact it compiles or reuses.
    ``input_size`` (``bench --size``): checkpoints are compiled for it; artifacts must have it."""
    row_names(models, backends)  # every model exists before anything is compiled
    check_row_size(models, input_size)
    rows = []
    planned = [(Path(m), name, spec) for m in models for name, spec in _model_rows(m, backends)]
    builds = [x for x in planned if x[2] is not None and get_backend(parse_backend(x[2])[0]).build is not None]
    built = 0
    for p, name, spec in planned:
        if spec is None or get_backend(parse_backend(spec)[0]).build is None:  # as given / the checkpoint itself
            rows.append((name, p))
            continue
        built += 1
        log(f"artifact {built}/{len(builds)}: {spec} of {p.name}")
        rows.append((name, artifact_for(p, spec, calib, parity_data, threads, log, input_size)))
    return rows
