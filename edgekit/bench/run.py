"""``edgekit bench`` from a ``BenchRequest``: which bench (CPU rows, an MLFF registry, the GPU), its rows
planned and checked before anything is compiled, measured, and the result returned for the command to
print. A served model's row (``--server``) comes in as a ready runner: serving is a layer above."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional

from edgekit.bench.request import BenchRequest
from edgekit.errors import EdgekitError

Log = Callable[[str], None]


def check_backend_specs(specs: List[str], allow_auto: bool = True) -> None:
    """Every ``target:precision`` of ``--backends`` exists and its package is installed (one line if not)."""
    from edgekit.backends.registry import get_backend
    from edgekit.bench.plan import parse_backend

    for s in specs:
        t, p = parse_backend(s)
        spec = get_backend(t)
        if spec.build is None:  # runs checkpoints as they are (torch)
            spec.require()
            continue
        if p == "auto" and not allow_auto:
            raise EdgekitError("--backends: precision auto is for GMBINet checkpoints")
        spec.check(p)


def kind_of(req: BenchRequest) -> str:
    """'gpu', 'mlff' (an adapter registry) or 'cpu'; refuses mixed or contradictory requests."""
    from edgekit.mlff.registry import is_registry  # torch-free: a station benches artifacts without torch

    if req.backends and req.all_rows:
        raise EdgekitError("--all and --backends choose the rows two ways: give one of them")
    if req.input_size and (req.device == "gpu" or req.server):
        raise EdgekitError("--size is for the local CPU rows (not --device gpu or --server): compile an artifact with "
                           "--input-size and bench that")
    if req.device == "gpu":
        if req.baseline:
            raise EdgekitError("--baseline is for the CPU bench (the GPU bench's baseline is eager PyTorch fp32)")
        return "gpu"
    if any(is_registry(m) for m in req.models):
        if len(req.models) != 1:
            raise EdgekitError("bench takes one adapter registry at a time (no other models beside it)")
        if req.baseline:
            raise EdgekitError("--baseline is for the CPU bench of models (an adapter registry's baseline is torch)")
        if req.input_size:
            raise EdgekitError("--size is for GMBINet rows; an adapter registry's backbone keeps its own input")
        return "mlff"
    return "cpu"


def bench_cpu(req: BenchRequest, served=None, log: Log = lambda _: None) -> dict:
    """The CPU bench: rows planned (the baseline checked before anything is compiled), scored against the
    data and their PyTorch models, timed, the machine judged (``bench.busy``)."""
    # Rows share one process: torch's OpenMP workers must not spin-wait while OpenVINO's threads run
    # (seen here: torch p90 latency of seconds when interleaved). Takes effect if torch is not loaded yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from edgekit import runtime
    from edgekit.bench.agreement import reference_for
    from edgekit.bench.cpu import Row, model_size, run_bench
    from edgekit.bench.plan import at_size, default_cpu_backends, parse_backend, plan_rows, resolve_baseline, row_names

    # Default rows are what a checkpoint is compiled to; artifacts alone are their own rows (and a station
    # without torch must not be asked to check the torch row's package).
    has_checkpoint = any(not Path(m).is_dir() for m in req.models)
    if req.backends:
        specs = list(req.backends)
    else:
        specs = default_cpu_backends(req.all_rows, log) if has_checkpoint or not req.models else []
    check_backend_specs(specs)
    names = row_names(list(req.models), specs)
    if served is not None:
        names.append(served_row_name(req, served))
    baseline = resolve_baseline(req.baseline, names)  # a bad --baseline: one line, nothing compiled
    if has_checkpoint or any(parse_backend(s)[0] == "torch" for s in specs):
        _set_threads(req.threads)
    calib = req.calib if req.calib is not None else req.data  # int8 rows calibrate on --data (its train split)
    planned = plan_rows(list(req.models), specs, calib, "synthetic:12", req.threads, log, req.input_size)
    rows = [Row(name, at_size(runtime.load(path, threads=req.threads), req.input_size), model_size(path))
            for name, path in planned]
    references = [reference_for(path) for _, path in planned]
    if served is not None:
        rows.append(Row(served_row_name(req, served), served, served.size_bytes))
        references.append(reference_for(None))
    result = run_bench(rows, data=req.data, batches=req.cpu_batches(), rounds=req.rounds, iters=req.iters,
                       eval_limit=req.eval_limit, baseline=baseline, async_jobs=req.concurrency,
                       references=references, threads=req.threads, settle_s=req.settle_s, log=log)
    result["settings"]["input_sizes"] = sorted({"x".join(map(str, r.runner.spec.input_size)) for r in rows
                                                if getattr(r.runner, "spec", None) is not None})  # what the rows ran at
    return result


def served_row_name(req: BenchRequest, served) -> str:
    return f"served {req.served_model} ({served.protocol})"


def bench_registry(req: BenchRequest, log: Log = lambda _: None) -> dict:
    """``edgekit bench REGISTRY``: backbone (torch / compiled) + the registry's adapter heads, per image."""
    from edgekit.bench.mlff import MLFF_BASELINE, default_mlff_backends, plan_mlff_rows, run_mlff_bench

    specs = list(req.backends) if req.backends else default_mlff_backends()
    check_backend_specs(specs, allow_auto=False)
    if req.data.startswith("synthetic"):
        raise EdgekitError("bench REGISTRY needs --data: class folders (DIR/<class>/*, e.g. NEU-CLS) named like the "
                           "registry's classes; accuracy is measured on their fixed held-out part")
    _set_threads(req.threads)
    registry = req.models[0]
    rows = plan_mlff_rows(registry, specs, req.data, req.calib or req.data, req.threads, log)
    return run_mlff_bench(rows, data=req.data, batches=req.cpu_batches(), rounds=req.rounds, iters=req.iters,
                          eval_limit=req.eval_limit, baseline=MLFF_BASELINE if "torch" in specs else None,
                          registry=registry)


def bench_gpu(req: BenchRequest, log: Log = lambda _: None) -> dict:
    """``bench --device gpu`` (edgekit.bench.gpu): its own default batches unless --batch is given."""
    from edgekit.bench.gpu import DEFAULT_GPU_BATCHES, gpu_bench

    return gpu_bench(list(req.models), backends=",".join(req.backends) if req.backends else None,
                     batches=list(req.batches or DEFAULT_GPU_BATCHES), data=req.data, calib=req.calib,
                     rounds=req.rounds, iters=req.iters, eval_limit=req.eval_limit, max_autotune=req.max_autotune,
                     log=log)


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
