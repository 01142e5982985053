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
    return [b.name if b.build is None else f"{b.name}:{p}" for b in backends()
            if b.device == "cpu" and "gmbinet" in b.kinds and buildable_here(b, log, "--all")
            for p in (b.precisions if b.build is not None else ("",))]


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


def plan_rows(models: List[str], backends: List[str], calib: Optional[str], parity_data: str, threads, log,
              input_size: Optional[Tuple[int, int]] = None):
    """[(row name, path)] for the benchmark; says on ``log`` which artifact it compiles or reuses.
    ``input_size`` (``bench --size``): checkpoints are compiled for it; artifacts must have it."""
    for m in models:
        if not Path(m).exists():
            raise EdgekitError(f"model not found: {m}")
    check_row_size(models, input_size)
    rows, builds = [], [(Path(m), s) for m in models if not is_artifact(Path(m)) for s in backends
                        if get_backend(parse_backend(s)[0]).build is not None]
    built = 0
    for m in models:
        p = Path(m)
        if is_artifact(p):
            man = read_manifest(p)
            rows.append((f"{man['target']}:{man['precision']} ({p.name})", p))
            continue
        if spec_for_model_file(p) is not None:  # a plain model.onnx / model.xml: run as given
            rows.append((f"{p.name}", p))
            continue
        for spec in backends:
            if get_backend(parse_backend(spec)[0]).build is None:  # runs the checkpoint itself (torch)
                rows.append((parse_backend(spec)[0], p))
            else:
                built += 1
                log(f"artifact {built}/{len(builds)}: {spec} of {p.name}")
                rows.append((spec, artifact_for(p, spec, calib, parity_data, threads, log, input_size)))
    return rows
