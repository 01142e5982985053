"""``edgekit bench --device cpu``: one table, one row per backend x precision, measured in one run.

Timing: every row is warmed up, then measured in interleaved rounds (row A, row B, ... , row A, ...)
so drift on a noisy machine hits all rows alike. The headline FPS is what an application sees:
one synchronous request, one image at a time (1 / median latency at batch 1). Throughput with
several requests in flight is a separate column, for backends that offer async queues.

What makes a figure believable on a shared machine: each row reports the spread of its per-round
medians; a ratio to the baseline is the median of the per-round paired ratios (round k of both rows
saw the same machine), and is "within noise" when their min-max range contains 1.0; p99 is given
only from at least ``MIN_P99_SAMPLES`` samples; the precision a backend actually ran is read back;
the CPU model and its ISA flags, and the data behind every accuracy figure, are in the result.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from edgekit.artifact import is_artifact, now_utc, read_manifest
from edgekit.backends.base import Runner
from edgekit.bench.agreement import Reference, agreement, format_agreement
from edgekit.bench.busy import DEFAULT_SETTLE_S, MAX_EXTRA_ROUNDS, judge_machine
from edgekit.data.datasets import SegDataset, SegSample, is_sd900, limit_samples, open_segmentation
from edgekit.eval.evaluate import predict_probs
from edgekit.eval.metrics import SegMetrics
from edgekit.eval.timing import Row, time_rows  # noqa: F401  (the rows bench times)
from edgekit.progress import progress

PAPER_ROW = {"name": "paper's own figures (its split, its CPU)", "fps_b1": 16.53,
             "iou": 0.8728, "mae": 0.0126,
             "note": "reported by the paper on the authors' own SD-Saliency-900 split and hardware; batch size "
                     "not stated; not measured here",
             "accuracy_data": {"dataset": "SD-Saliency-900", "split": "the authors' own split (not published)",
                               "images": None, "source": "the paper's own figure, not measured by edgekit"},
             "plot_label": "paper's own figures (its split, its CPU)"}
SCHEMA = "edgekit-bench/1"
MIN_P99_SAMPLES = 100  # below this the 99th percentile is one of the two slowest calls, not a statistic
# ISA flags worth naming in a benchmark (as /proc/cpuinfo spells them): x86 SIMD levels, then Arm's.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16")
ARM_FLAGS = ("asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16")


def cpu_record(cpuinfo: Optional[str] = None) -> dict:
    """CPU model and ISA flags from /proc/cpuinfo (the first processor's entry); ``cpuinfo``: its text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = None, None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        if flags is None and key in ("flags", "features"):  # x86: flags, Arm: Features
            flags = set(value.split())
    flags = flags or set()
    arm = bool(flags & {"asimd", "neon"})
    checked = [f for f in ISA_FLAGS if (f in ARM_FLAGS) == arm]
    return {"cpu": model or platform.processor() or platform.machine(), "arch": platform.machine(),
            "isa": [f for f in checked if f in flags], "isa_absent": [f for f in checked if f not in flags],
            "isa_source": "/proc/cpuinfo" if cpuinfo else "unavailable (no /proc/cpuinfo)"}


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load averages: how busy the machine was (other processes share its cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_description() -> dict:
    return {**cpu_record(), "logical_cpus": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version()}


def describe_isa(machine: dict) -> str:
    """'sse4_2 avx avx2 fma f16c; absent: avx512f avx512_vnni avx512_bf16 amx_bf16' for captions."""
    isa = " ".join(machine.get("isa") or []) or "unknown"
    absent = [f for f in machine.get("isa_absent") or []
              if f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "sve", "i8mm", "bf16")]
    return isa + (f"; absent: {' '.join(absent)}" if absent else "")


def model_size(path: Path) -> int:
    if is_artifact(path):
        return int(read_manifest(path, verify=False).get("size_bytes", 0))
    if path.is_file() and path.suffix.lower() == ".xml" and path.with_suffix(".bin").is_file():  # OpenVINO IR
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return path.stat().st_size if path.is_file() else 0


def throughput(runner: Runner, batch: int, jobs: int, seconds: float) -> Optional[float]:
    """Images/s with ``jobs`` requests in flight, for runners that offer an async queue."""
    make = getattr(runner, "throughput_queue", None)
    if make is None:
        return None
    queue = make(batch, jobs)
    x = np.random.default_rng(1).standard_normal((batch, *runner.input_shape)).astype(np.float32)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(jobs):
            queue.start_async({0: x})
        queue.wait_all()
        done += jobs * batch
    return done / (time.perf_counter() - t0)


def latency_percentiles(seconds: Sequence[float]) -> dict:
    """p50/p90 in ms; p99 only from at least MIN_P99_SAMPLES samples (None, with the reason, below)."""
    ms = np.asarray(seconds, dtype=float) * 1e3
    out = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "p99": None,
           "samples": int(len(ms))}
    if len(ms) >= MIN_P99_SAMPLES:
        out["p99"] = float(np.percentile(ms, 99))
    else:
        out["p99_note"] = f"not computed from {len(ms)} samples (needs {MIN_P99_SAMPLES}: raise --rounds x --iters)"
    return out


def spread(per_round: Sequence[float]) -> dict:
    """Min, median and max of per-round figures."""
    v = [float(x) for x in per_round]
    return {"rounds": len(v), "min": min(v), "median": float(np.median(v)), "max": max(v), "per_round": v}


def ratio_with_spread(row_rounds: Sequence[float], base_rounds: Sequence[float]) -> dict:
    """A row's FPS over the baseline's, round by round (both measured in the same interleaved round).

    ``ratio`` is the median of the per-round ratios, ``low``/``high`` their min and max;
    ``within_noise`` is True when that range contains 1.0 (the row is not measurably faster or slower),
    None when one round gives no spread to judge by.
    """
    if len(row_rounds) != len(base_rounds) or not row_rounds:
        raise ValueError("ratio_with_spread needs the same, non-zero number of rounds for row and baseline")
    ratios = [a / b for a, b in zip(row_rounds, base_rounds)]
    low, high = min(ratios), max(ratios)
    return {"ratio": float(np.median(ratios)), "low": float(low), "high": float(high), "rounds": len(ratios),
            "within_noise": bool(low <= 1.0 <= high) if len(ratios) > 1 else None}


def add_baseline_ratios(out_rows: List[dict], rows: List[Row], baseline: Optional[str]) -> Optional[dict]:
    """``speedup_vs_baseline`` (median per-round ratio) and ``speedup_spread`` on every row; the baseline row."""
    by_name = {r.name: r for r in rows}
    base = next((r for r in out_rows if r["name"] == baseline), None) if baseline else None
    for r in out_rows:
        r["speedup_vs_baseline"], r["speedup_spread"] = None, None
        if base is None:
            continue
        if r is base:
            r["speedup_vs_baseline"] = 1.0
            r["speedup_spread"] = {"baseline": True}
            continue
        ratio = ratio_with_spread(by_name[r["name"]].round_fps(1), by_name[base["name"]].round_fps(1))
        r["speedup_vs_baseline"] = ratio.pop("ratio")
        r["speedup_spread"] = ratio
    return base


def row_summary(r: Row, batches, async_jobs: int) -> dict:
    """One JSON row: identity, what it ran, size, ``r.result`` (accuracy), latency at batch 1, FPS per batch
    with its spread over the rounds."""
    fps_by_batch = {b: b / float(np.median(r.lat[b])) for b in batches}
    best = max(fps_by_batch, key=fps_by_batch.get)
    tp = throughput(r.runner, 1, async_jobs, 2.0)
    rounds_b1 = r.round_fps(1)
    return {
        "name": r.name, "backend": r.runner.name, "precision": r.runner.precision,
        "executed_precision": r.runner.executed_precision(),
        "source": str(r.runner.source), "size_bytes": r.size_bytes, **r.result,
        "latency_ms": latency_percentiles(r.lat[1]),
        "fps_b1": fps_by_batch[1], "fps_b1_spread": spread(rounds_b1) if rounds_b1 else None,
        "fps_by_batch": {str(b): v for b, v in fps_by_batch.items()},
        "best_batch": best, "fps_best": fps_by_batch[best],
        "throughput_fps": tp, "throughput_jobs": async_jobs if tp else None,
    }


def accuracy_data(dataset: SegDataset, images: int, limit: Optional[int]) -> dict:
    """What one accuracy figure is on: dataset, split and the number of images actually scored."""
    if images < len(dataset):
        selection = f"{images} of {len(dataset)}, taken round-robin over the classes (--eval-limit {limit})"
    else:
        selection = f"all {images}"
    return {"dataset": dataset.name or dataset.description, "split": dataset.split or None, "images": images,
            "available": len(dataset), "selection": selection, "synthetic": dataset.synthetic}


def describe_accuracy_data(d: dict) -> str:
    """'SD-Saliency-900 test split, 30 of 225 images (round-robin over the classes)'."""
    split = d.get("split")
    text = d["dataset"] + (f" {split}" if split and split.endswith("seed") else f" {split} split" if split else "")
    if d.get("available") and d["images"] < d["available"]:
        return f"{text}, {d['images']} of {d['available']} images (round-robin over the classes)"
    return f"{text}, {d['images']} images"


def run_bench(rows: List[Row], data: str = "synthetic", batches=(1, 8), rounds: int = 5, iters: int = 20,
              warmup: int = 5, eval_limit: Optional[int] = None, async_jobs: int = 2,
              show_progress: bool = True, baseline: Optional[str] = None,
              references: Optional[Sequence[Optional[Reference]]] = None, threads: Optional[int] = None,
              settle_s: float = DEFAULT_SETTLE_S, log: Callable[[str], None] = lambda _: None) -> dict:
    """Score and time ``rows``. ``references``: each row's PyTorch reference (``bench.agreement``), for
    its agreement figures; ``settle_s``: how long a busy machine may be given to settle (``bench.busy``)."""
    batches = sorted(set(batches) | {1})
    dataset = open_segmentation(data, "test")
    refs = list(references) if references is not None else [None] * len(rows)
    load_start = load_average()
    score_rows(rows, dataset, eval_limit, refs, threads, show_progress, log)
    time_rows(rows, batches, rounds, iters, warmup, show_progress, log=log)
    machine = settle_rounds(rows, batches, rounds, iters, threads, settle_s, log)
    if async_jobs and any(getattr(r.runner, "throughput_queue", None) for r in rows):
        log(f"async throughput, {async_jobs} requests in flight, 2 s per row that offers a queue")
    out_rows = [row_summary(r, batches, async_jobs) for r in rows]
    add_baseline_ratios(out_rows, rows, baseline)
    torch_row = next((r for r in out_rows if r["backend"] == "torch" and r.get("iou") is not None), None)
    for r in out_rows:
        r["iou_delta_vs_torch"] = r["iou"] - torch_row["iou"] if torch_row and r.get("iou") is not None else None
    scope = rows[0].result["accuracy_data"] if rows else accuracy_data(dataset, len(dataset), eval_limit)
    ground_truth = shows_ground_truth(dataset, rows)
    return {
        "schema": SCHEMA, "device": "cpu", "date": now_utc(), "machine": machine_description(),
        "data": describe_accuracy_data(scope) + ("" if dataset.synthetic else f" at {data}"),
        "accuracy_data": scope, "synthetic": dataset.synthetic, "eval_images": scope["images"],
        # what the table's accuracy columns are: IoU/MAE against real masks, or only agreement with PyTorch
        "accuracy_shown": "ground truth and agreement with PyTorch" if ground_truth else "agreement with PyTorch",
        "settings": {"batches": batches, "rounds": rounds, "iters_per_round": iters, "warmup": warmup,
                     "threads": rows[0].runner.meta.get("threads") if rows else None,
                     "min_p99_samples": MIN_P99_SAMPLES, "settle_s": settle_s,
                     "load_average": {"start": load_start, "end": load_average()},
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "timing": "interleaved rounds, synchronous single request; FPS = batch / median latency; "
                               "spread = min/max of the per-round medians; ratio = median of per-round paired "
                               "ratios, within noise when their min-max contains 1.0"},
        "machine_state": machine,
        "baseline": baseline, "rows": out_rows,
        # the paper's figures are on SD-900 (its own split): beside a measurement on SD-900 only
        "reference": PAPER_ROW if on_sd900(data, dataset) else None,
    }


def on_sd900(data: str, dataset: SegDataset) -> bool:
    """``--data`` is SD-Saliency-900 (``data.datasets.is_sd900``, the one place that says so)."""
    return not dataset.synthetic and is_sd900(Path(data))


def shows_ground_truth(dataset: SegDataset, rows: List[Row]) -> bool:
    """IoU/MAE columns only for real images with masks: on synthetic images the table shows agreement
    with PyTorch instead (an IoU there would sit beside figures on real data and mean little)."""
    return not dataset.synthetic and any(r.result.get("iou") is not None for r in rows)


def _row_probs(runner: Runner, samples: List[SegSample], desc: str, show_progress: bool) -> List[np.ndarray]:
    """Probability maps of ``samples``, one image per call (batch 1, as the headline FPS)."""
    out = []
    with progress(total=len(samples), desc=desc, enabled=show_progress) as bar:
        for s in samples:
            out.append(predict_probs(runner, [s.image()], [s.name])[0])
            bar.update(1)
    return out


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def score_rows(rows: List[Row], dataset: SegDataset, eval_limit: Optional[int],
               references: Sequence[Optional[Reference]], threads: Optional[int], show_progress: bool,
               log: Callable[[str], None]) -> None:
    """Every row on the same images: IoU/MAE/maxF against the masks where there are masks, and its
    agreement with its PyTorch reference (``bench.agreement``) where it has one, into ``row.result``."""
    samples = limit_samples(dataset.samples, eval_limit)
    masks = [s.load()[1] for s in samples]  # load() checks each mask's size against its image
    has_masks = any(m is not None for m in masks)
    scope = accuracy_data(dataset, len(samples), eval_limit)
    if not has_masks:
        scope["masks"] = False
    more = f", {eval_limit} images" if eval_limit and eval_limit < len(dataset) else ""
    ref_maps: dict = {}  # reference checkpoint -> its maps on ``samples``

    def is_own_reference(r: Row, ref: Optional[Reference]) -> bool:
        return bool(ref and ref.checkpoint and r.runner.name == "torch" and _same_file(r.runner.source, ref.checkpoint))

    # the rows that are their own reference first (a torch row of the checkpoint), so their maps serve the others
    order = sorted(range(len(rows)), key=lambda i: not is_own_reference(rows[i], references[i]))
    for k, i in enumerate(order, 1):
        r, ref = rows[i], references[i]
        log(f"accuracy {k}/{len(rows)}: {r.name} on {dataset.description}{more}")
        probs = _row_probs(r.runner, samples, "eval", show_progress)
        own = is_own_reference(r, ref)
        if own:
            ref_maps.setdefault(str(ref.checkpoint.resolve()), probs)
        if ref and ref.checkpoint and str(ref.checkpoint.resolve()) not in ref_maps:
            from edgekit import runtime

            log(f"reference for {r.name}: the PyTorch model of {ref.checkpoint} on the same images")
            ref_maps[str(ref.checkpoint.resolve())] = _row_probs(runtime.load(ref.checkpoint, threads=threads),
                                                               samples, "reference", show_progress)
        metrics = SegMetrics()
        for s, m, p in zip(samples, masks, probs):
            if m is not None:
                metrics.add(p, m, s.cls)
        overall = metrics.summary()["overall"] if has_masks else {}
        r.result.update(iou=overall.get("iou"), mae=overall.get("mae"), max_f=overall.get("max_f"),
                        accuracy_data=dict(scope))
        if ref and ref.checkpoint:
            r.result["agreement_vs_torch"] = agreement(probs, ref_maps[str(ref.checkpoint.resolve())])
            r.result["agreement_reference"] = {"checkpoint": str(ref.checkpoint), "is_reference": own}
        else:
            r.result["agreement_vs_torch"] = None
            r.result["agreement_reference"] = {"checkpoint": None, "note": ref.note if ref else "no reference given"}


def _one_round(rows: List[Row], batches: List[int], iters: int, inputs: dict) -> None:
    """One more interleaved round of every row at every batch size (as ``time_rows`` measures them)."""
    for b in batches:
        for r in rows:
            r.start_round(b)
            for _ in range(max(1, iters // b)):
                t0 = time.perf_counter()
                r.runner.infer(inputs[b])
                r.record(b, time.perf_counter() - t0)


def _keep_last_rounds(rows: List[Row], keep: int) -> None:
    for r in rows:
        for b, per_round in r.rounds.items():
            r.rounds[b] = per_round[-keep:]
            r.lat[b] = [t for one in r.rounds[b] for t in one]


def _window(rows: List[Row], keep: int) -> List[List[float]]:
    return [r.round_fps(1)[-keep:] for r in rows]


def settle_rounds(rows: List[Row], batches: List[int], rounds: int, iters: int, threads: Optional[int],
                  settle_s: float, log: Callable[[str], None], judge=judge_machine, load=load_average,
                  clock=time.perf_counter) -> dict:
    """After the timed rounds: is the machine busy (``bench.busy``)? If so, say it in one line, and
    while the spread is unsettled time more rounds for up to ``settle_s`` seconds; the record for the
    JSON's ``machine_state``."""
    cpus = os.cpu_count() or 1
    load1 = (load() or [None])[0]
    state = judge(load1, cpus, threads, _window(rows, rounds))
    first = state.to_json()
    record = {**first, "extra_rounds": 0, "settled": None, "rounds_kept": rounds, "rounds_timed": rounds}
    if not state.busy:
        return record
    can_settle = state.spread_unsettled and settle_s > 0 and rounds >= 2 and rows
    log(f"machine busy: {state.reasons()}; "
        + (f"timing more rounds, up to {settle_s:.0f} s, until the spread settles" if can_settle else
           "figures may be off: rerun on a quiet machine" + ("" if settle_s > 0 or not state.spread_unsettled
                                                             else " (--settle-time 0: no extra rounds)")))
    if not can_settle:
        return record
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *rows[0].runner.input_shape)).astype(np.float32) for b in batches}
    t0, extra, last = clock(), 0, 0.0
    while extra < MAX_EXTRA_ROUNDS and clock() - t0 + last <= settle_s:
        r0 = clock()
        _one_round(rows, batches, iters, inputs)
        last, extra = clock() - r0, extra + 1
        state = judge((load() or [None])[0], cpus, threads, _window(rows, rounds))
        if not state.spread_unsettled:
            break
    settled = not state.spread_unsettled
    if settled:
        _keep_last_rounds(rows, rounds)
    record = {**state.to_json(), "busy": True, "at_start": first, "extra_rounds": extra, "settled": settled,
              "rounds_timed": rounds + extra, "rounds_kept": rounds if settled else rounds + extra,
              "seconds": round(clock() - t0, 1)}
    if settled:
        log(f"spread settled at {state.round_spread:.0%} after {extra} more round(s): the last {rounds} are kept")
    else:
        log(f"still unsettled after {extra} more round(s), {record['seconds']:.0f} s (spread "
            f"{state.round_spread:.0%}): every round is kept; rerun on a quiet machine for firm ratios")
    return record


def _num(v: float) -> str:
    """Three significant digits without an exponent: 4.12, 59.9, 280, 1048."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def format_latency(lat: dict) -> str:
    """'p50/p90/p99' in ms; '-' for a p99 not computed, with the sample count."""
    p99 = _num(lat["p99"]) if lat.get("p99") is not None else f"- (n={lat['samples']})"
    return f"{_num(lat['p50'])}/{_num(lat['p90'])}/{p99}"


def format_fps(row: dict) -> str:
    """'123 (118-130)': the headline FPS and the min-max of its round medians."""
    s = row.get("fps_b1_spread")
    text = _num(row["fps_b1"])
    return text + (f" ({_num(s['min'])}-{_num(s['max'])})" if s and s["rounds"] > 1 else "")


def format_speedup(row: dict) -> str:
    """'1.45x (1.38-1.52)', '1.02x (0.95-1.10) within noise', 'baseline' or '-'."""
    ratio, s = row.get("speedup_vs_baseline"), row.get("speedup_spread")
    if ratio is None:
        return "-"
    if s is None:  # a result written without per-round figures
        return f"{ratio:.2f}x"
    if s.get("baseline"):
        return "baseline"
    if s["within_noise"] is None:
        return f"{ratio:.2f}x (1 round: no spread)"
    return f"{ratio:.2f}x ({s['low']:.2f}-{s['high']:.2f})" + (" within noise" if s["within_noise"] else "")


def format_precision(row: dict) -> str:
    """Declared precision, and what the backend reports it ran where that says more ('bf16 (ran f32)')."""
    ran = row.get("executed_precision") or {}
    declared = row["precision"]
    layers = ran.get("compute_layers") or {}
    int8 = sum(n for p, n in layers.items() if p in ("u8", "i8"))
    if int8:
        return f"{declared} ({int8}/{sum(layers.values())} conv int8)"
    label = ran.get("label")
    if not label or label == {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}.get(declared):
        return declared
    return f"{declared} (ran {label})"


AGREEMENT_COLUMN = "vs PyTorch: mask IoU / pixels / max |dp|"


def ground_truth_shown(result: dict) -> bool:
    return result.get("accuracy_shown", "ground truth").startswith("ground truth")


def table_columns(result: dict, async_jobs: int = 2) -> List[str]:
    """The CPU table's columns: IoU/MAE against real masks only where there are some (never on synthetic
    images), agreement with the PyTorch model always."""
    accuracy = (["IoU", "MAE"] if ground_truth_shown(result) else []) + [AGREEMENT_COLUMN]
    return ["row", "precision (ran)", "size", *accuracy, "latency ms p50/p90/p99 (b1)", "FPS b1 (min-max)",
            "FPS best batch", f"FPS async x{async_jobs}", "vs baseline (min-max)"]


def table_rows(result: dict) -> List[tuple]:
    truth = ground_truth_shown(result)
    out = []
    for r in result["rows"]:
        tp = f"{r['throughput_fps']:.0f}" if r.get("throughput_fps") else "-"
        ref = r.get("agreement_reference") or {}
        accuracy = ((f"{r['iou']:.4f}", f"{r['mae']:.4f}") if truth else ()) + \
            (format_agreement(r.get("agreement_vs_torch"), ref.get("is_reference", False)),)
        out.append((r["name"], format_precision(r), f"{r['size_bytes'] / 1e6:.2f} MB", *accuracy,
                    format_latency(r["latency_ms"]), format_fps(r),
                    f"{_num(r['fps_best'])} (b{r['best_batch']})", tp, format_speedup(r)))
    p = result.get("reference")
    if p and truth:
        out.append((p["name"], "-", "-", f"{p['iou']:.4f}", f"{p['mae']:.4f}", "-", "-", f"{p['fps_b1']:.2f}",
                    "-", "-", "-"))
    return out


def table_title(result: dict) -> str:
    m = result["machine"]
    return f"edgekit bench --device cpu  ({m['cpu']}, {m['logical_cpus']} logical CPUs, {result['settings'].get('threads')} threads)"


def table_caption(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [f"CPU {m['cpu']}; ISA {describe_isa(m)} (from {m.get('isa_source', '/proc/cpuinfo')})"]
    if ground_truth_shown(result):
        lines.append(f"IoU/MAE of the measured rows: {result['data']}")
    lines.append(f"vs PyTorch: each row's masks (prob >= 0.5) against its source checkpoint's PyTorch masks on "
                 f"the same images ({result['data']}): mean IoU / pixels that agree / largest probability difference")
    if result.get("reference"):
        lines.append("paper row: arXiv 2508.16397's own figures, on the authors' SD-900 split and CPU (not measured here)")
    base = result.get("baseline")
    load = (s.get("load_average") or {}).get("start")
    what = "ONNX -> OpenVINO, plugin default precision" if base and base.startswith("openvino:default") else "--baseline"
    lines.append(f"{s['rounds']} interleaved rounds x {s['iters_per_round']} calls; (min-max) = over the round medians; "
                 f"p99 only from >= {MIN_P99_SAMPLES} samples"
                 + (f"; load average {load[0]:.1f} at the start" if load else "")
                 + (f"; baseline = {base}: {what}" if base else "; no baseline row (give --baseline ROW for ratios)"))
    ms = result.get("machine_state")
    if ms and ms.get("busy"):
        first = ms.get("at_start") or ms
        why = ", ".join(w for w, on in (("load average", first.get("by_load")), ("round spread", first.get("by_spread")))
                        if on)
        outcome = ("spread settled after {} extra round(s), the last {} kept".format(ms["extra_rounds"], ms["rounds_kept"])
                   if ms.get("settled") else
                   f"not settled: all {ms['rounds_kept']} rounds kept, ratios may be off" if ms.get("settled") is False
                   else "ratios may be off")
        lines.append(f"MACHINE BUSY ({why}): {outcome}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    markers = "osD^v<>ph*"
    metric = "accuracy" if result.get("kind") == "mlff" else "iou"  # MLFF rows: top-1 classification accuracy
    if metric == "iou" and not ground_truth_shown(result):  # synthetic or mask-less data: agreement with PyTorch
        metric = "agreement"

    def y(r):
        if metric == "agreement":
            return (r.get("agreement_vs_torch") or {}).get("mask_iou")
        return r.get(metric)

    for i, r in enumerate(result["rows"]):  # a legend, not labels: close rows would overlap
        if y(r) is None:
            continue
        ax.scatter(r["fps_b1"], y(r), s=45, marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20),
                   label=r["name"])
    p = result.get("reference")
    if p and metric == "iou":
        ax.scatter(p["fps_b1"], p["iou"], marker="x", color="k", s=50, label=p.get("plot_label", "paper (their CPU, their split)"))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("FPS, batch 1, synchronous (log scale)")
    scope = result.get("accuracy_data")
    on = f" on {describe_accuracy_data(scope)}" if scope else (" (synthetic data)" if result["synthetic"] else "")
    ax.set_ylabel({"accuracy": "top-1 accuracy", "iou": "IoU@0.5",
                   "agreement": "mask IoU vs its PyTorch model"}[metric] + on, fontsize=8)
    ax.set_title(f"edgekit bench, {(result['machine'].get('gpu') or result['machine']['cpu'])[:40]}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
