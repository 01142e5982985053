"""``--target auto`` and ``--precision auto``: build every candidate artifact, measure it here, keep the
fastest that holds the accuracy budget, and record why.

The candidates are read off the backend registry, never named here: every compile target that this
machine can build and time (a CPU target whose package is installed and whose ``not_here`` has no
objection, compiling GMBINet models), times every precision it offers (``default`` is the plugin's
own choice, not a precision to compare). ``--target T --precision auto`` is T's precisions;
``--target auto --precision P`` is every target offering P; both ``auto``: all of them.

Accuracy: each candidate's metric on the check images (``--val``; without it, the parity images) is
compared with the source model's; a candidate whose drop exceeds the budget (``--max-drop``, default
0.005) is not kept. A float candidate must also pass its precision's parity budget when it is built
(``edgekit.pipeline.parity``), or it is skipped. INT8 candidates need ``--val``: an INT8 model can
move masks far more than a float one, and only a measured drop on real masks can admit one, so
without ``--val`` they are skipped and the choice is among float candidates only (said, and recorded).

Speed: batch-1 latency, measured on this machine in interleaved rounds (``edgekit.eval.timing``: drift
hits every candidate alike) with a fixed, small budget (``TIMING``: 5 rounds x 10 calls after 3 warm-up
calls, per candidate), so the choice reflects the CPU at hand (bf16 wins on CPUs with native bf16, fp32
elsewhere, INT8 where its convolutions outweigh the quantize/dequantize overhead). A lead smaller than
the round-to-round spread is said to be within noise; the load average is recorded beside it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from edgekit.artifact import artifact_writer, read_manifest, sign_artifact, verify_artifact, write_manifest
from edgekit.backends.registry import BackendSpec, buildable_here, get_backend, targets
from edgekit.errors import EdgekitError
from edgekit.pipeline.request import AUTO, CompileRequest

DEFAULT_BUDGET = 0.005  # metric drop allowed without --max-drop
TIMING = {"batch": 1, "rounds": 5, "iters": 10, "warmup": 3}  # per candidate: bounded, a few seconds each


@dataclass(frozen=True)
class Candidate:
    spec: BackendSpec
    precision: str

    @property
    def name(self) -> str:
        return f"{self.spec.name} {self.precision}"


def candidates_for(target: str):
    """Every concrete precision the target offers ("default" is the baseline, not a choice)."""
    return [p for p in get_backend(target).precisions if p != "default"]


def _why_not_here(spec: BackendSpec, kind: str) -> Optional[str]:
    """Why ``spec`` is no candidate on this machine (None: it is one)."""
    if kind not in spec.kinds:
        return f"compiles {', '.join(spec.kinds)} models, not {kind}"
    if spec.device != "cpu":
        return f"a {spec.device} target (auto times candidates on this machine's CPU; see edgekit bench --device gpu)"
    if not spec.available():
        return f"{spec.pip_name or spec.package} is not installed ({spec.install_hint()})"
    why = spec.not_here() if spec.not_here else None
    return why or None


def plan_candidates(request: CompileRequest, kind: str = "gmbinet") -> Tuple[List[Candidate], List[dict]]:
    """(the candidates to build and time, the ones left out: ``{"target", "precision", "reason"}``, where
    ``precision`` None stands for every precision of the target)."""
    chosen, skipped = [], []
    for spec in targets():
        if request.target not in (AUTO, spec.name):
            continue
        offered = [p for p in spec.precisions if p != "default" and request.precision in (AUTO, p)]
        if not offered:
            continue
        why = _why_not_here(spec, kind)
        if why:
            skipped.append({"target": spec.name, "precision": None, "reason": why})
            continue
        for p in offered:
            why_p = spec.precision_not_here(p) if spec.precision_not_here else None
            if why_p:
                skipped.append({"target": spec.name, "precision": p, "reason": why_p})
            elif p == "int8" and request.val is None:
                skipped.append({"target": spec.name, "precision": p,
                                "reason": "no --val: an INT8 candidate is admitted only on a measured drop on real masks"})
            elif p == "int8" and request.calib is None:
                skipped.append({"target": spec.name, "precision": p, "reason": "needs --calib"})
            else:
                chosen.append(Candidate(spec, p))
    return chosen, skipped


def asked(request: CompileRequest) -> str:
    """What the user asked for, as they wrote it: ``--target auto``, ``--precision auto`` or both."""
    return " ".join(f"--{k} {v}" for k, v in (("target", request.target), ("precision", request.precision))
                    if v == AUTO or request.target == AUTO)


def check_auto_request(request: CompileRequest) -> None:
    """Refusals that need no model loaded: a precision no target offers (``--target auto --precision P``), or
    nothing to choose from here (e.g. only INT8 asked for, without --val)."""
    if request.precision != AUTO and not any(request.precision in t.precisions for t in targets()):
        offered = sorted({p for t in targets() for p in t.precisions if p != "default"})
        raise EdgekitError(f"--target auto: no target offers precision {request.precision} "
                           f"(choose from {', '.join(offered)}, auto)")
    chosen, skipped = plan_candidates(request)
    if not chosen:
        reasons = "; ".join(f"{_skipped_name(s)}: {s['reason']}" for s in skipped)
        raise EdgekitError(f"{asked(request)}: no candidate to measure here ({reasons})")


def _skipped_name(s: dict) -> str:
    return f"{s['target']} {s['precision']}" if s["precision"] else s["target"]


def _skip_line(s: dict) -> str:
    return f"auto: {_skipped_name(s)} skipped ({s['reason']})"


def _failure(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:160] if text else type(e).__name__) if isinstance(e, EdgekitError) \
        else f"{type(e).__name__}: {text[0][:160] if text else ''}"


def compile_auto(request: CompileRequest, log: Callable = print, note: Optional[Callable] = None,
                 result: Optional[Callable] = None) -> dict:
    """Build each candidate of ``request`` into a temporary folder, measure accuracy and batch-1 speed
    here, and write the fastest within the budget to ``request.out`` with ``manifest["auto"]`` saying
    what was measured and why it was chosen. ``note``: the measurements as they come (default ``log``);
    ``result``: the one line saying what was kept (default ``log``)."""
    import numpy as np

    from edgekit import runtime
    from edgekit.data.datasets import open_segmentation
    from edgekit.eval.evaluate import evaluate
    from edgekit.eval.timing import Row, time_rows
    from edgekit.pipeline.build import build_artifact
    from edgekit.pipeline.sources import open_source

    note = note or log
    metric = request.metric
    budget = DEFAULT_BUDGET if request.max_drop is None else request.max_drop
    parity_images = request.parity_images
    check_data = request.val or parity_images
    dataset = open_segmentation(check_data, "val" if (Path(check_data) / "split.json").is_file() else "test")
    planned, skipped = plan_candidates(request)
    for s in skipped:
        note(_skip_line(s))
    if request.val is None:
        note(f"auto: no --val: accuracy drops are measured on the parity images ({dataset.description}) and only "
             "float candidates (held to their parity budgets) are considered")
    reference = evaluate(open_source(request.source, input_size=request.input_size, resize=request.resize)
                         .reference_runner(request.threads), dataset,
                         show_progress=False)["overall"][metric]
    with tempfile.TemporaryDirectory() as tmp:
        built = []
        for i, c in enumerate(planned, 1):
            folder = Path(tmp) / f"{c.spec.name}_{c.precision}"
            note(f"auto: building {i}/{len(planned)}: {c.name}")
            # each candidate without the budget (measured below, alike for all) and unsigned (the kept one is signed)
            one = replace(request, target=c.spec.name, precision=c.precision, out=str(folder),
                          parity_data=parity_images, max_drop=None, val=None, force=False, sign_key=None)
            t0 = time.perf_counter()
            try:
                build_artifact(c.spec, one, log=lambda *_: None)
                runner = runtime.load(verify_artifact(folder, use_env=False), threads=request.threads)  # not signed yet
                runner.warmup()
                score = evaluate(runner, dataset, show_progress=False)["overall"][metric]
            except Exception as e:  # noqa: BLE001 - one candidate failing (a precision the CPU plugin lacks here, a
                # parity budget missed, a backend's build error) leaves the others to choose from; the reason is kept
                skipped.append({"target": c.spec.name, "precision": c.precision, "reason": _failure(e)})
                note(_skip_line(skipped[-1]))
                continue
            drop = (score - reference) if metric == "mae" else (reference - score)
            note(f"auto: built {c.name} in {time.perf_counter() - t0:.1f} s")
            built.append((c, folder, Row(c.name, runner, 0), score, drop))
        if not built:
            reasons = "; ".join(f"{_skipped_name(s)}: {s['reason']}" for s in skipped)
            raise EdgekitError(f"{asked(request)}: no candidate could be built here ({reasons}); nothing written")
        load_before = _load_average()
        if load_before is not None and load_before > (os.cpu_count() or 1):
            note(f"auto: note: load average {load_before} on {os.cpu_count()} logical CPUs: the machine is busy, "
                 "so the timings are noisy (rerun when it is quiet)")
        time_rows([b[2] for b in built], [TIMING["batch"]], rounds=TIMING["rounds"], iters=TIMING["iters"],
                  warmup=TIMING["warmup"], show_progress=False, log=lambda m: note(f"auto: {m}"))
        candidates = []
        for c, folder, row, score, drop in built:
            b = TIMING["batch"]
            rounds = row.round_fps(b)
            p50 = float(np.median(row.lat[b]))
            candidates.append({"target": c.spec.name, "precision": c.precision, "fps_b1": b / p50,
                               "latency_ms_p50": 1e3 * p50, "fps_rounds_min": min(rounds), "fps_rounds_max": max(rounds),
                               metric: score, "drop": drop, "within_budget": drop <= budget, "folder": folder})
            note(f"auto: {c.name:16s} {candidates[-1]['fps_b1']:8.1f} FPS  {metric} {score:.4f} (drop {drop:+.4f})"
                 + ("" if drop <= budget else f", over the budget {budget}"))
        ok = sorted((c for c in candidates if c["within_budget"]), key=lambda c: -c["fps_b1"])
        if not ok:
            raise EdgekitError(f"{asked(request)}: no candidate keeps {metric} within {budget} of the source model on "
                               f"{dataset.description}; nothing written")
        best = ok[0]
        reason = _reason(best, ok, candidates, skipped, metric, budget, dataset.description, request.val is not None)
        chosen = best["folder"]
        with artifact_writer(request.out, force=request.force) as folder:
            for f in chosen.iterdir():  # files and folders (cpu-fused keeps its libraries in kernels/)
                if f.is_dir():
                    shutil.copytree(f, folder / f.name)
                else:
                    shutil.copy2(f, folder / f.name)
            manifest = read_manifest(folder)
            manifest["auto"] = {
                "asked": {"target": request.target, "precision": request.precision},
                "metric": metric, "budget": budget, "data": dataset.description, "val_given": request.val is not None,
                "reference": reference, "chosen": best["precision"], "chosen_target": best["target"], "reason": reason,
                "candidates": [{k: v for k, v in c.items() if k != "folder"} for c in candidates], "skipped": skipped,
                "timing": {**TIMING, "load_average_1min": load_before, "logical_cpus": os.cpu_count()}}
            files = list(manifest.pop("files"))
            for k in ("format", "format_version", "created", "size_bytes"):
                manifest.pop(k, None)
            manifest = write_manifest(folder, manifest, files)
            if request.sign_key is not None:
                sign_artifact(folder, request.sign_key)
    note(f"auto: {reason}")
    (result or log)(f"auto: kept {best['target']} {best['precision']} ({best['fps_b1']:.1f} FPS, {metric} drop "
        f"{best['drop']:+.4f}) -> {request.out}")
    return manifest


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _reason(best: dict, ok: List[dict], candidates: List[dict], skipped: List[dict], metric: str, budget: float,
            data: str, val_given: bool) -> str:
    """One sentence: what won, against what, on which evidence, and what it cannot claim."""
    name = f"{best['target']} {best['precision']}"
    text = (f"chose {name}: the fastest at batch 1 ({best['fps_b1']:.1f} FPS) of {len(ok)} candidate(s) whose "
            f"{metric} drop on {data} is within {budget}")
    if len(ok) > 1:
        second = ok[1]
        text += f"; {best['fps_b1'] / second['fps_b1']:.2f}x the next, {second['target']} {second['precision']}"
        if best["fps_rounds_min"] <= second["fps_rounds_max"]:
            text += " (within the round-to-round spread: noise could swap them)"
    over = len(candidates) - len(ok)
    if over:
        text += f"; {over} over the budget"
    if skipped:
        text += f"; {len(skipped)} skipped"
    if not val_given:
        text += "; without --val the drop is on the parity images and INT8 was not considered"
    return text
