"""``edgekit bench --device gpu``: the CPU benchmark's table, JSON and plot, for CUDA paths.

Rows come from the backend registry (``BackendSpec.gpu_bench_default``, ``variants``,
``gpu_load_options``), as the CPU bench's do. Today (for a checkpoint): PyTorch eager, eager replayed
from a CUDA graph (``torch.cuda.CUDAGraph``), ``torch.compile`` (default mode; ``--max-autotune`` for
mode="max-autotune", which takes minutes per batch size), each in fp32 and fp16; the fused CUDA kernels
(backend ``cuda-fused``) in fp32 and fp16 where PyCUDA imports; TensorRT engines (``trt`` artifacts
given on the command line, or compiled from the checkpoint when ``tensorrt`` is installed). Batch 1
and 32 by default.

Timing: input already on the GPU (random normal, never zeros); every row warmed up, then timed in
interleaved rounds, each call between two CUDA events recorded on the current stream and synchronised
(one synchronous request: what an application sees). FPS = batch / median latency. Accuracy columns
(IoU, MAE) as on the CPU, with ``--data`` (an SD-900 folder: its test split).

This module is importable and its row planning runs without a GPU (tests); measuring needs CUDA.
Untested on a GPU in this project's environment (see README).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from edgekit.backends.base import Runner
from edgekit.errors import EdgekitError, MissingBackendError

PAPER_GPU_ROW = {"name": "paper (arXiv 2508.16397, their GPU)", "fps_b1": 1048.0, "iou": 0.8728, "mae": 0.0126,
                 "note": "reported on the authors' split and GPU; batch size not stated",
                 "plot_label": "paper (their GPU, their split)"}
SCHEMA = "edgekit-bench/1"
DEFAULT_GPU_BATCHES = (1, 32)
BASELINE = "eager:fp32"


def no_cuda_reason() -> Optional[str]:
    """None when torch sees a CUDA device, else the one line ``bench --device gpu`` refuses with."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "edgekit bench --device gpu needs torch with CUDA"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return (f"edgekit bench --device gpu needs a CUDA device; torch {torch.__version__} ({build}) sees none here")
    return None


def require_cuda() -> None:
    reason = no_cuda_reason()
    if reason:
        raise EdgekitError(reason)


# ---------------------------------------------------------------------------------------------
# Row planning (pure: no GPU needed)
# ---------------------------------------------------------------------------------------------

@dataclass
class PlannedRow:
    name: str
    kind: str  # the backend's registry name: "torch", "cuda-fused", "trt", ...
    precision: str
    path: Path
    mode: Optional[str] = None  # the backend's variant (torch: eager | graph | compile)
    build: bool = False  # a compile target that runs artifacts only, from a checkpoint: compile it (cached) first


# Every GPU row comes from a ``BackendSpec`` (edgekit.backends.registry), as the CPU bench's rows do: a
# backend that runs on the GPU declares ``gpu_bench_default`` (and ``variants`` when one backend gives
# several rows, as torch's eager / CUDA-graph / torch.compile modes do). A new GPU backend is one module.

def gpu_row_kinds() -> List[Tuple[str, object, Optional[str]]]:
    """(row kind, spec, variant) for every GPU row kind, in the order of the default rows: backends that
    run a checkpoint as it is first (no compile step, the reference among them), then compile targets."""
    from edgekit.backends.registry import backends

    specs = [b for b in backends() if b.gpu_bench_default]
    specs.sort(key=lambda b: 0 if (b.build is None or b.runs_checkpoints) else 1)  # stable: registry order within
    return [k for b in specs for k in ([(v, b, v) for v in b.variants] if b.variants else [(b.name, b, None)])]


def default_gpu_backends() -> Tuple[str, ...]:
    """``kind:precision`` of ``bench --device gpu`` without ``--backends``: each spec's ``gpu_bench_default``."""
    return tuple(f"{kind}:{p}" for kind, spec, _ in gpu_row_kinds() for p in spec.gpu_bench_default)


def __getattr__(name):  # DEFAULT_GPU_BACKENDS stays importable, computed from the registry when asked for
    if name == "DEFAULT_GPU_BACKENDS":
        return default_gpu_backends()
    raise AttributeError(name)


def _row_kind(kind: str):
    for k, spec, variant in gpu_row_kinds():
        if k == kind:
            return spec, variant
    raise EdgekitError(f"unknown GPU row {kind!r} (choose from {', '.join(default_gpu_backends())})")


def parse_gpu_backend(spec: str) -> Tuple[str, str]:
    """(row kind, precision) of ``kind[:precision]``; the precision defaults to the spec's first GPU default."""
    kind, _, precision = spec.strip().partition(":")
    try:
        backend, _ = _row_kind(kind)
    except EdgekitError:
        raise EdgekitError(f"unknown GPU row {spec!r} (choose from {', '.join(default_gpu_backends())})") from None
    precision = precision or backend.gpu_bench_default[0]
    if precision not in backend.precisions:
        raise EdgekitError(f"GPU row {spec!r}: precision {precision} (choose from {', '.join(backend.precisions)})")
    return kind, precision


def unavailable_reason(spec, available: Optional[bool] = None) -> Optional[str]:
    """None when ``spec``'s package imports here (or ``available`` says so), else the note a default row
    that cannot run gets."""
    if spec.available() if available is None else available:
        return None
    return f"{spec.package} is not installed: pip install {spec.pip_name or spec.package}"


def plan_gpu_rows(models: Sequence[str], specs: Sequence[str], *, available: Optional[Mapping[str, bool]] = None,
                  explicit: bool = False) -> Tuple[List[PlannedRow], List[dict]]:
    """(rows to run, rows left out with the reason). ``available``: backend name -> whether it can run here,
    overriding the specs' own ``available()`` (tests plan without the packages). ``explicit``: the user
    listed ``specs`` (a row that cannot run is then an error, not a note)."""
    from edgekit.artifact import is_artifact, read_manifest
    from edgekit.backends.registry import get_backend

    parsed = [(s, *parse_gpu_backend(s)) for s in specs]
    rows, skipped = [], []
    for m in models:
        p = Path(m)
        if not p.exists():
            raise EdgekitError(f"model not found: {p}")
        if is_artifact(p):
            man = read_manifest(p, verify=False)
            target = man.get("target")
            try:
                backend = get_backend(target)
            except EdgekitError:
                backend = None
            if backend is None or backend.device != "gpu":
                raise EdgekitError(f"{p} is a {target} artifact (a CPU backend); bench --device gpu takes "
                                   f"checkpoints and GPU artifacts")
            rows.append(PlannedRow(f"{target}:{man.get('precision')} ({p.name})", target, man.get("precision"), p))
            continue
        for spec, kind, precision in parsed:
            backend, variant = _row_kind(kind)
            name = f"{kind}:{precision}"
            why = unavailable_reason(backend, (available or {}).get(backend.name))
            if why:
                skipped.append({"name": name, "reason": why})
                continue
            compile_first = backend.build is not None and not backend.runs_checkpoints
            rows.append(PlannedRow(name, backend.name, precision, p, mode=variant, build=compile_first))
    if explicit and skipped:
        raise EdgekitError(f"GPU row {skipped[0]['name']}: {skipped[0]['reason']}")
    if not rows:
        raise EdgekitError("no GPU rows to run")
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# Runners and timing (CUDA)
# ---------------------------------------------------------------------------------------------

def device_call(runner: Runner) -> Tuple[Optional[Callable], bool]:
    """(call on a CUDA tensor or None, whether the row's timing stays on the device). Runners without
    ``infer_device`` are timed numpy in -> numpy out: their rows include the host copies."""
    fn = getattr(runner, "infer_device", None)
    return fn, fn is not None


def open_row(row: PlannedRow, *, max_autotune: bool, calib: Optional[str], log: Callable) -> Runner:
    """The row's runner, from its spec: an artifact as it is; a compile target that runs only artifacts
    compiled (cached) first; a backend that runs checkpoints with its GPU load options, the variant's
    options and the row's precision (never retried without them: the row names them)."""
    from edgekit import runtime
    from edgekit.artifact import is_artifact
    from edgekit.backends.registry import get_backend

    if row.build:
        from edgekit.bench.plan import artifact_for

        row.path = artifact_for(row.path, f"{row.kind}:{row.precision}", calib, "synthetic:12", None, log)
    if is_artifact(row.path):
        return runtime.load(row.path)
    spec = get_backend(row.kind)
    options = {**spec.gpu_load_options, **spec.variants.get(row.mode, {}), "precision": row.precision,
               "max_autotune": max_autotune}
    return spec.load(row.path, **spec.declared_options(options))  # one option set for every row: each takes its own


def is_reference_row(row: PlannedRow) -> bool:
    """Rows of the backend that runs the source model as it is (torch): timed alone first (phase 1)."""
    from edgekit.backends.registry import get_backend

    return get_backend(row.kind).build is None


def failure_reason(e: BaseException) -> str:
    """One line for a row that failed: the exception's type and the first line of its message
    (a PyCUDA ``CompileError`` carries nvcc's whole log)."""
    if isinstance(e, EdgekitError):
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return lines[0] if lines else type(e).__name__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class CudaEventTiming:
    """How ``bench --device gpu`` times a call: random-normal input already on the GPU, CUDA events
    recorded on the current stream around the call, then synchronised."""

    def __init__(self):
        import torch

        self.torch = torch
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def inputs(self, shape, batches):
        """({batch: CUDA tensor}, {batch: the same values as a numpy array})."""
        torch = self.torch
        gen = torch.Generator(device="cuda").manual_seed(0)
        device = {b: torch.randn(b, *shape, device="cuda", generator=gen) for b in batches}
        return device, {b: device[b].cpu().numpy() for b in batches}

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def measure(self, call) -> float:
        self.start.record()
        call()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def time_gpu_rows(rows, batches: Sequence[int], rounds: int, iters: int, warmup: int, show_progress: bool,
                  timing=None) -> dict:
    """Per-call latencies (seconds) into ``row.lat[batch]``, measured by ``timing`` (default
    :class:`CudaEventTiming`).

    A row whose call raises (a launch failure, an illegal address surfacing at the synchronisation)
    is dropped from the remaining rounds; returns {row name: reason} for those rows. Their ``lat``
    is left incomplete: callers discard it."""
    from edgekit.progress import progress

    timing = timing or CudaEventTiming()
    failed: dict = {}
    inputs, host = timing.inputs(rows[0].runner.input_shape, batches)

    def caller(runner):
        fn = device_call(runner)[0]
        if fn is not None and all(inputs.get(b) is not None for b in batches):
            return lambda b: fn(inputs[b])
        return lambda b: runner.infer(host[b])

    calls = {id(r): caller(r.runner) for r in rows}
    for r in rows:
        try:
            for b in batches:
                r.lat[b], r.rounds[b] = [], []
                for _ in range(warmup):
                    calls[id(r)](b)
            timing.synchronize()
        except Exception as e:  # noqa: BLE001 - any backend error becomes the row's reason
            failed[r.name] = f"warm-up: {failure_reason(e)}"
    with progress(total=rounds * len(rows) * len(batches), desc="timing", enabled=show_progress, unit="run") as bar:
        for _ in range(rounds):
            for b in batches:
                for r in rows:  # interleaved: each round visits every row
                    if r.name in failed:
                        bar.update(1)
                        continue
                    call = calls[id(r)]
                    try:
                        r.start_round(b)
                        for _ in range(iters):
                            r.record(b, timing.measure(lambda: call(b)))
                    except Exception as e:  # noqa: BLE001
                        failed[r.name] = f"timing batch {b}: {failure_reason(e)}"
                    bar.update(1)
    return failed


def machine_description() -> dict:
    import torch

    from edgekit.bench.cpu import machine_description as cpu_machine

    out = {"gpu": None, "compute_capability": None, "gpu_memory_gb": None, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": None, **cpu_machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                   # PyTorch's fp32 convolutions run in TF32 on Ampere and newer unless this is False
                   cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32))
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    out["python"] = platform.python_version()
    return out


def run_gpu_bench(planned: List[PlannedRow], *, data: str = "synthetic", batches=DEFAULT_GPU_BATCHES, rounds: int = 5,
                  iters: int = 50, warmup: int = 10, eval_limit: Optional[int] = None, max_autotune: bool = False,
                  calib: Optional[str] = None, skipped: Optional[List[dict]] = None, show_progress: bool = True,
                  log: Callable = print, timing=None, opener: Callable = None) -> dict:
    """Open, evaluate and time ``planned``. A row that cannot open, evaluate or run (a PyCUDA
    ``CompileError``, ``LogicError``/``LaunchError``, nvcc missing, ...) becomes an entry of
    ``failed`` with its reason; the other rows still run and the table still prints.

    ``timing`` (default :class:`CudaEventTiming`, which needs CUDA) and ``opener`` (default
    :func:`open_row`) are the seams the CPU tests use."""
    from edgekit.bench.cpu import (Row, accuracy_data, add_baseline_ratios, describe_accuracy_data, model_size,
                                   row_summary)
    from edgekit.data.datasets import open_segmentation
    from edgekit.eval.evaluate import evaluate
    from edgekit.artifact import now_utc

    if timing is None:
        require_cuda()
        timing = CudaEventTiming()
    opener = opener or open_row
    batches = sorted(set(batches) | {1})
    dataset = open_segmentation(data, "test")
    skipped, failed = list(skipped or []), []

    def fail(name: str, stage: str, reason: str) -> None:
        failed.append({"name": name, "stage": stage, "reason": reason})
        log(f"{name} failed ({stage}): {reason}")

    def open_and_evaluate(group: List[PlannedRow]) -> List[Row]:
        opened = []
        for p in group:
            try:
                runner = opener(p, max_autotune=max_autotune, calib=calib, log=log)
            except MissingBackendError as e:  # e.g. the fused backend without PyCUDA: a note, not a failure
                skipped.append({"name": p.name, "reason": str(e)})
                log(f"skipping {p.name}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - nvcc missing, CompileError, LogicError, ...: a failed row
                fail(p.name, "load", failure_reason(e))
                continue
            row = Row(p.name, runner, model_size(p.path))
            try:
                acc = evaluate(runner, dataset, batch_size=1, show_progress=show_progress, limit=eval_limit)
            except Exception as e:  # noqa: BLE001
                fail(p.name, "accuracy", failure_reason(e))
                continue
            row.result.update(iou=acc["overall"]["iou"], mae=acc["overall"]["mae"], max_f=acc["overall"]["max_f"],
                              accuracy_data=accuracy_data(dataset, acc["overall"]["images"], eval_limit))
            opened.append(row)
        return opened

    def keep_timed(group: List[Row], failures: dict) -> List[Row]:
        for r in group:
            if r.name in failures:
                fail(r.name, "timing", failures[r.name])
        return [r for r in group if r.name not in failures]

    # Phase 1, PyTorch rows alone: a fault in our own kernels (phase 2) poisons the CUDA context
    # every later call shares, so the baseline rows are measured before any such kernel is loaded.
    torch_rows = open_and_evaluate([p for p in planned if is_reference_row(p)])
    if torch_rows:
        torch_rows = keep_timed(torch_rows, time_gpu_rows(torch_rows, batches, rounds, iters, warmup, show_progress,
                                                               timing))
    # Phase 2, the other backends, interleaved with the PyTorch rows again (ratios from one run). If
    # phase 2 breaks the context, the PyTorch rows keep their phase-1 times.
    other_rows = open_and_evaluate([p for p in planned if not is_reference_row(p)])
    phase = {r.name: 1 for r in torch_rows}
    if other_rows:
        phase1 = {r.name: ({b: list(v) for b, v in r.lat.items()}, {b: [list(x) for x in v] for b, v in r.rounds.items()})
                  for r in torch_rows}
        failures = time_gpu_rows(torch_rows + other_rows, batches, rounds, iters, warmup, show_progress, timing)
        other_rows = keep_timed(other_rows, failures)
        for r in torch_rows:
            if r.name in failures:
                r.lat, r.rounds = phase1[r.name]
                log(f"{r.name}: phase-2 timing failed ({failures[r.name]}); keeping its phase-1 times")
            else:
                phase[r.name] = 2
    rows = torch_rows + other_rows
    if not rows:
        raise EdgekitError("no GPU row ran: " + "; ".join(f"{f['name']}: {f['reason']}" for f in failed + skipped))
    scope = rows[0].result["accuracy_data"]
    out_rows = []
    for r in rows:
        row = row_summary(r, batches, async_jobs=0)
        row["on_device"] = device_call(r.runner)[1]  # False: the row's times include host copies
        row["timing_phase"] = phase.get(r.name, 2)
        out_rows.append(row)
    base = add_baseline_ratios(out_rows, rows, BASELINE)  # eager fp32: also the accuracy reference
    for r in out_rows:
        r["iou_delta_vs_torch"] = r["iou"] - base["iou"] if base else None
    return {
        "schema": SCHEMA, "device": "gpu", "date": now_utc(), "machine": machine_description(),
        "data": describe_accuracy_data(scope) + ("" if dataset.synthetic else f" at {data}"),
        "accuracy_data": scope, "synthetic": dataset.synthetic, "eval_images": scope["images"],
        "settings": {"batches": batches, "rounds": rounds, "iters_per_round": iters, "warmup": warmup,
                     "max_autotune": max_autotune, "threads": None,
                     "timing": "input on the GPU; CUDA events around each synchronous call after warm-up; "
                               "interleaved rounds; FPS = batch / median latency; PyTorch rows first (phase 1), "
                               "then every row again with the other backends (phase 2, the reported times "
                               "unless phase 2 failed for that row)"},
        "baseline": base["name"] if base else None, "rows": out_rows, "skipped": skipped, "failed": failed,
        "reference": PAPER_GPU_ROW,
    }


def table_rows(result: dict) -> List[tuple]:
    from edgekit.bench.cpu import format_fps, format_latency, format_speedup

    out = []
    for r in result["rows"]:
        su = format_speedup(r)
        fps = {int(b): v for b, v in r["fps_by_batch"].items()}
        big = max(fps)
        out.append((r["name"] + ("" if r.get("on_device", True) else " (host copies)"),
                    f"{r['size_bytes'] / 1e6:.2f} MB", f"{r['iou']:.4f}", f"{r['mae']:.4f}",
                    format_latency(r["latency_ms"]),
                    format_fps(r), f"{fps[big]:.0f} (b{big})" if big > 1 else "-", su))
    p = result["reference"]
    out.append((p["name"], "-", f"{p['iou']:.4f}", f"{p['mae']:.4f}", "-", f"{p['fps_b1']:.0f}", "-", "-"))
    for f in result.get("failed", []):
        out.append((f"{f['name']} (FAILED at {f['stage']}: {f['reason']})", "-", "-", "-", "-", "-", "-", "-"))
    for s in result.get("skipped", []):
        out.append((f"{s['name']} (not run: {s['reason']})", "-", "-", "-", "-", "-", "-", "-"))
    return out


TABLE_COLUMNS = ["row", "size", "IoU", "MAE", "latency ms p50/p90/p99 (b1)", "FPS b1 (min-max)", "FPS large batch",
                 "vs eager fp32 (min-max)"]


def gpu_bench(models: Sequence[str], *, backends: Optional[str], batches: Sequence[int], data: str,
              calib: Optional[str], rounds: int, iters: int, eval_limit: Optional[int], max_autotune: bool,
              log: Callable) -> dict:
    """The ``--device gpu`` branch of ``edgekit bench``: plan (argument errors first), require CUDA, run."""
    from edgekit.models.default import resolve_model

    specs = [s.strip() for s in backends.split(",") if s.strip()] if backends else list(default_gpu_backends())
    for s in specs:
        parse_gpu_backend(s)
    require_cuda()
    planned, skipped = plan_gpu_rows(list(models) or [resolve_model(None)], specs, explicit=bool(backends))
    if calib is None:  # int8 rows calibrate on --data (its train split), as on the CPU path
        calib = data
    result = run_gpu_bench(planned, data=data, batches=batches, rounds=rounds, iters=iters, eval_limit=eval_limit,
                           max_autotune=max_autotune, calib=calib, skipped=skipped, log=log)
    if result["failed"]:
        log(f"{len(result['failed'])} GPU row(s) failed: {', '.join(f['name'] for f in result['failed'])} (reasons in "
            f"the table)")
    return result


def table_title(result: dict) -> str:
    m = result["machine"]
    return (f"edgekit bench --device gpu  ({m['gpu']}, sm_{str(m['compute_capability']).replace('.', '')}, "
            f"torch {m['torch']}, CUDA {m['cuda']})")


def table_caption(result: dict) -> str:
    return f"accuracy on {result['data']}; CUDA-event timing, input on the GPU; baseline = {BASELINE}"
