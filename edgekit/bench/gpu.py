"""``edgekit bench --device gpu``: the CPU benchmark's table, JSON and plot, for CUDA paths.

Rows (for a checkpoint): PyTorch eager, eager replayed from a CUDA graph (``torch.cuda.CUDAGraph``),
``torch.compile`` (default mode; ``--max-autotune`` for mode="max-autotune", which takes minutes per
batch size), each in fp32 and fp16; the fused CUDA kernels (backend ``cuda-fused``) in fp32 and fp16
where that backend is available; TensorRT engines (``trt`` artifacts given on the command line, or
compiled from the checkpoint when ``tensorrt`` is installed). Batch 1 and 32 by default.

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
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.backends.base import Runner

PAPER_GPU_ROW = {"name": "paper (arXiv 2508.16397, their GPU)", "fps_b1": 1048.0, "iou": 0.8728, "mae": 0.0126,
                 "note": "reported on the authors' split and GPU; batch size not stated",
                 "plot_label": "paper (their GPU, their split)"}
SCHEMA = "edgekit-bench/1"
TORCH_MODES = ("eager", "graph", "compile")
PRECISIONS = ("fp32", "fp16")
DEFAULT_GPU_BACKENDS = tuple(f"{m}:{p}" for m in TORCH_MODES for p in PRECISIONS) + \
    ("cuda-fused:fp32", "cuda-fused:fp16", "trt:fp16", "trt:int8")
DEFAULT_GPU_BATCHES = (1, 32)
BASELINE = "eager:fp32"
FUSED_BACKEND = "cuda-fused"


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
    kind: str  # "torch" | "cuda-fused" | "trt"
    precision: str
    path: Path
    mode: Optional[str] = None  # torch: eager | graph | compile
    build: bool = False  # trt from a checkpoint: compile the engine (cached) first


def parse_gpu_backend(spec: str) -> Tuple[str, str]:
    kind, _, precision = spec.strip().partition(":")
    precision = precision or ("fp16" if kind == "trt" else "fp32")
    if kind in TORCH_MODES or kind == FUSED_BACKEND:
        if precision not in PRECISIONS:
            raise EdgekitError(f"GPU row {spec!r}: precision {precision} (choose from {', '.join(PRECISIONS)})")
    elif kind == "trt":
        if precision not in ("fp16", "int8"):
            raise EdgekitError(f"GPU row {spec!r}: precision {precision} (choose from fp16, int8)")
    else:
        raise EdgekitError(f"unknown GPU row {spec!r} (choose from {', '.join(DEFAULT_GPU_BACKENDS)})")
    return kind, precision


def plan_gpu_rows(models: Sequence[str], specs: Sequence[str], *, fused_available: bool, tensorrt_available: bool,
                  explicit: bool = False) -> Tuple[List[PlannedRow], List[dict]]:
    """(rows to run, rows left out with the reason). ``explicit``: the user listed ``specs`` (a row
    that cannot run is then an error, not a note)."""
    from edgekit.artifact import is_artifact, read_manifest

    parsed = [(s, *parse_gpu_backend(s)) for s in specs]
    rows, skipped = [], []
    for m in models:
        p = Path(m)
        if not p.exists():
            raise EdgekitError(f"model not found: {p}")
        if is_artifact(p):
            man = read_manifest(p, verify=False)
            if man.get("target") != "trt":
                raise EdgekitError(f"{p} is a {man.get('target')} artifact (a CPU backend); bench --device gpu takes "
                                   f"checkpoints and trt artifacts")
            rows.append(PlannedRow(f"trt:{man.get('precision')} ({p.name})", "trt", man.get("precision"), p))
            continue
        for spec, kind, precision in parsed:
            name = f"{kind}:{precision}"
            if kind in TORCH_MODES:
                rows.append(PlannedRow(name, "torch", precision, p, mode=kind))
            elif kind == FUSED_BACKEND:
                if fused_available:
                    rows.append(PlannedRow(name, kind, precision, p))
                else:
                    skipped.append({"name": name, "reason": f"no '{FUSED_BACKEND}' runtime backend is registered here"})
            elif tensorrt_available:
                rows.append(PlannedRow(name, "trt", precision, p, build=True))
            else:
                skipped.append({"name": name, "reason": "tensorrt is not installed: pip install tensorrt"})
    if explicit and skipped:
        raise EdgekitError(f"GPU row {skipped[0]['name']}: {skipped[0]['reason']}")
    if not rows:
        raise EdgekitError("no GPU rows to run")
    return rows, skipped


def fused_backend_available() -> bool:
    """The cuda-fused backend is registered always; it can run only where PyCUDA is installed."""
    import importlib.util

    from edgekit import runtime

    registered = any(b.name == FUSED_BACKEND for b in runtime.backends())
    return registered and importlib.util.find_spec("pycuda") is not None


def tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------------------------------------
# Runners and timing (CUDA)
# ---------------------------------------------------------------------------------------------

class TorchGpuRunner(Runner):
    """GMBINet on the GPU: eager, eager replayed from CUDA graphs (one per batch size), or torch.compile."""

    def __init__(self, checkpoint, mode: str = "eager", precision: str = "fp32", max_autotune: bool = False):
        import torch

        super().__init__(checkpoint.preprocess, checkpoint.path or Path("."), {"checkpoint_sha256": checkpoint.sha256})
        self.torch = torch
        self.name, self.precision, self.mode = f"torch-{mode}", precision, mode
        self.device = torch.device("cuda")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        torch.backends.cudnn.benchmark = True
        model = checkpoint.build().eval().to(self.device, self.dtype)
        if mode == "compile":
            model = torch.compile(model, mode="max-autotune" if max_autotune else None)
        self.model = model
        self._graphs: dict = {}

    def _graph(self, n: int):
        torch = self.torch
        if n not in self._graphs:
            static_in = torch.randn(n, *self.input_shape, device=self.device, dtype=self.dtype)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(3):  # warm-up (cuDNN autotuning) outside the capture
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[n] = (graph, static_in, static_out)
        return self._graphs[n]

    def infer_device(self, x):
        """CUDA tensor in, CUDA tensor out (for CUDA-graph rows: the graph's own output buffer)."""
        torch = self.torch
        if self.mode == "graph":
            graph, static_in, static_out = self._graph(int(x.shape[0]))
            static_in.copy_(x)
            graph.replay()
            return static_out
        with torch.inference_mode():
            return self.model(x.to(self.dtype))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(self._check_batch(batch)).to(self.device)
        return self.infer_device(x).float().cpu().numpy()


def device_call(runner: Runner) -> Tuple[Optional[Callable], bool]:
    """(call on a CUDA tensor or None, whether the row's timing stays on the device). Runners without
    ``infer_device`` are timed numpy in -> numpy out: their rows include the host copies."""
    fn = getattr(runner, "infer_device", None)
    return fn, fn is not None


def open_row(row: PlannedRow, *, max_autotune: bool, calib: Optional[str], log: Callable) -> Runner:
    from edgekit import runtime

    if row.kind == "torch":
        from edgekit.models.checkpoint import load_checkpoint

        return TorchGpuRunner(load_checkpoint(row.path), row.mode, row.precision, max_autotune=max_autotune)
    if row.kind == FUSED_BACKEND:
        backend = next(b for b in runtime.backends() if b.name == FUSED_BACKEND)
        try:
            return backend.load(row.path, precision=row.precision)
        except TypeError:  # a loader without a precision option
            return backend.load(row.path)
    path = row.path
    if row.build:
        from edgekit.bench.plan import artifact_for

        path = artifact_for(row.path, f"trt:{row.precision}", calib, "synthetic:12", None, log)
        row.path = path
    return runtime.load(path)


def time_gpu_rows(rows, batches: Sequence[int], rounds: int, iters: int, warmup: int, show_progress: bool) -> None:
    """Per-call latencies (seconds) into ``row.lat[batch]``: CUDA events around each synchronous call."""
    import torch

    from edgekit.progress import progress

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = rows[0].runner.input_shape
    inputs = {b: torch.randn(b, *shape, device="cuda", generator=gen) for b in batches}
    host = {b: inputs[b].cpu().numpy() for b in batches}

    def caller(runner):
        fn = device_call(runner)[0]
        return (lambda b: fn(inputs[b])) if fn is not None else (lambda b: runner.infer(host[b]))

    calls = {id(r): caller(r.runner) for r in rows}
    for r in rows:
        for b in batches:
            for _ in range(warmup):
                calls[id(r)](b)
            r.lat[b] = []
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with progress(total=rounds * len(rows) * len(batches), desc="timing", enabled=show_progress, unit="run") as bar:
        for _ in range(rounds):
            for b in batches:
                for r in rows:  # interleaved: each round visits every row
                    call = calls[id(r)]
                    for _ in range(iters):
                        start.record()
                        call(b)
                        end.record()
                        end.synchronize()
                        r.lat[b].append(start.elapsed_time(end) / 1e3)
                    bar.update(1)


def machine_description() -> dict:
    import torch

    from edgekit.bench.cpu import machine_description as cpu_machine

    out = {"gpu": None, "compute_capability": None, "gpu_memory_gb": None, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": None, **{k: v for k, v in cpu_machine().items() if k != "isa"}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version())
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
                  log: Callable = print) -> dict:
    from edgekit.bench.cpu import Row, model_size, row_summary
    from edgekit.data.datasets import open_segmentation
    from edgekit.eval.evaluate import evaluate
    from edgekit.artifact import now_utc

    require_cuda()
    batches = sorted(set(batches) | {1})
    dataset = open_segmentation(data, "test")
    rows, skipped = [], list(skipped or [])
    for p in planned:
        try:
            runner = open_row(p, max_autotune=max_autotune, calib=calib, log=log)
        except EdgekitError as e:  # e.g. the fused backend without PyCUDA: a note, not the end of the run
            skipped.append({"name": p.name, "reason": str(e)})
            log(f"skipping {p.name}: {e}")
            continue
        rows.append(Row(p.name, runner, model_size(p.path)))
    if not rows:
        raise EdgekitError("no GPU row could be opened: " + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped))
    for r in rows:
        acc = evaluate(r.runner, dataset, batch_size=1, show_progress=show_progress, limit=eval_limit)
        r.result.update(iou=acc["overall"]["iou"], mae=acc["overall"]["mae"], max_f=acc["overall"]["max_f"])
    time_gpu_rows(rows, batches, rounds, iters, warmup, show_progress)
    out_rows = []
    for r in rows:
        row = row_summary(r, batches, async_jobs=0)
        row["on_device"] = device_call(r.runner)[1]  # False: the row's times include host copies
        out_rows.append(row)
    base = next((r for r in out_rows if r["name"] == BASELINE), None)  # eager fp32: also the accuracy reference
    for r in out_rows:
        r["speedup_vs_baseline"] = r["fps_b1"] / base["fps_b1"] if base else None
        r["iou_delta_vs_torch"] = r["iou"] - base["iou"] if base else None
    return {
        "schema": SCHEMA, "device": "gpu", "date": now_utc(), "machine": machine_description(),
        "data": dataset.description, "synthetic": dataset.synthetic, "eval_images": eval_limit or len(dataset),
        "settings": {"batches": batches, "rounds": rounds, "iters_per_round": iters, "warmup": warmup,
                     "max_autotune": max_autotune, "threads": None,
                     "timing": "input on the GPU; CUDA events around each synchronous call after warm-up; "
                               "interleaved rounds; FPS = batch / median latency"},
        "baseline": base["name"] if base else None, "rows": out_rows, "skipped": skipped,
        "reference": PAPER_GPU_ROW,
    }


def table_rows(result: dict) -> List[tuple]:
    out = []
    for r in result["rows"]:
        su = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"
        fps = {int(b): v for b, v in r["fps_by_batch"].items()}
        big = max(fps)
        out.append((r["name"] + ("" if r.get("on_device", True) else " (host copies)"),
                    f"{r['size_bytes'] / 1e6:.2f} MB", f"{r['iou']:.4f}", f"{r['mae']:.4f}",
                    f"{r['latency_ms']['p50']:.3f}/{r['latency_ms']['p90']:.3f}/{r['latency_ms']['p99']:.3f}",
                    f"{r['fps_b1']:.0f}", f"{fps[big]:.0f} (b{big})" if big > 1 else "-", su))
    p = result["reference"]
    out.append((p["name"], "-", f"{p['iou']:.4f}", f"{p['mae']:.4f}", "-", f"{p['fps_b1']:.0f}", "-", "-"))
    for s in result.get("skipped", []):
        out.append((f"{s['name']} (not run: {s['reason']})", "-", "-", "-", "-", "-", "-", "-"))
    return out


TABLE_COLUMNS = ["row", "size", "IoU", "MAE", "latency ms p50/p90/p99 (b1)", "FPS b1", "FPS large batch", "vs eager fp32"]


def bench_gpu_command(models: Sequence[str], *, backends: Optional[str], batches: Sequence[int], data: str,
                      calib: Optional[str], rounds: int, iters: int, eval_limit: Optional[int],
                      json_out: Optional[str], plot_out: Optional[str], max_autotune: bool, command: str,
                      log: Callable) -> dict:
    """The ``--device gpu`` branch of ``edgekit bench``: plan (argument errors first), then require CUDA."""
    from edgekit.bench.cpu import plot
    from edgekit.commands._common import print_table, write_json
    from edgekit.models.default import resolve_model

    specs = [s.strip() for s in backends.split(",") if s.strip()] if backends else list(DEFAULT_GPU_BACKENDS)
    for s in specs:
        parse_gpu_backend(s)
    require_cuda()
    planned, skipped = plan_gpu_rows(list(models) or [resolve_model(None)], specs,
                                     fused_available=fused_backend_available(),
                                     tensorrt_available=tensorrt_available(), explicit=bool(backends))
    if calib is None and not data.startswith("synthetic"):
        calib = data
    result = run_gpu_bench(planned, data=data, batches=batches, rounds=rounds, iters=iters, eval_limit=eval_limit,
                           max_autotune=max_autotune, calib=calib, skipped=skipped, log=log)
    result["command"] = command
    if json_out:
        write_json(json_out, result)
        plot_out = plot_out or str(Path(json_out).with_suffix(".png"))
    if plot_out:
        plot(result, Path(plot_out))
    m = result["machine"]
    print_table(f"edgekit bench --device gpu  ({m['gpu']}, sm_{str(m['compute_capability']).replace('.', '')}, "
                f"torch {m['torch']}, CUDA {m['cuda']})", TABLE_COLUMNS, table_rows(result),
                caption=f"accuracy on {result['data']}; CUDA-event timing, input on the GPU; baseline = {BASELINE}")
    return result
