"""Pareto table for structured pruning: parameters, MACs, CPU FPS (one interleaved run, several
targets side by side) and SD-900 test IoU for GMBINet checkpoints pruned at several ratios.

    # the pruned checkpoints (fine-tuned at 512 px on the SD-900 train split, val for selection):
    edgekit prune ../shared/checkpoints/gmbinet_sd900_official.pt --ratio 0.25 \
        --finetune recipes/gmbinet_sd900.yaml --data ../shared/datasets/sd-saliency-900 --out p25.pt
    edgekit prune ../shared/checkpoints/gmbinet_sd900_official.pt --ratio 0.5 \
        --finetune recipes/gmbinet_sd900.yaml --data ../shared/datasets/sd-saliency-900 --out p50.pt
    python benchmarks/prune_pareto.py ../shared/checkpoints/gmbinet_sd900_official.pt p25.pt p50.pt \
        --data ../shared/datasets/sd-saliency-900 --out benchmarks/out/prune

Every checkpoint is compiled for every TARGET:PRECISION of --targets (default
openvino:default,openvino:fp32,cpu-fused:fp32: the plain OpenVINO CPU-deployment baseline, OpenVINO
fp32 and edgekit's fused CPU kernels) with `edgekit compile CKPT --target T --precision P --out F
--threads N --parity-data DATA --force`, then all artifacts are timed in ONE `edgekit bench` run
(--rounds x --iters, rows interleaved round by round, batch 1). "FPS vs unpruned" compares each row
with the unpruned checkpoint's row of the same target:precision. Artifacts already built from the same
checkpoint (sha256) for the same target and precision are reused. Writes pareto.json, pareto.md and
pareto.png into --out (artifacts/ and bench.json beside them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_TARGETS = "openvino:default,openvino:fp32,cpu-fused:fp32"


def edgekit(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgekit.cli", *args]
    print("+ edgekit " + " ".join(args), file=sys.stderr)
    subprocess.run(cmd, check=True)


def parse_targets(text: str) -> list[tuple[str, str]]:
    """'openvino:default,cpu-fused:fp32' -> [('openvino', 'default'), ('cpu-fused', 'fp32')], checked
    against the backend registry (target exists, offers the precision) before anything is compiled."""
    from edgekit.backends.registry import get_backend
    from edgekit.errors import EdgekitError

    out: list[tuple[str, str]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        target, sep, precision = item.partition(":")
        if not sep or not target or not precision:
            raise SystemExit(f"--targets: {item!r} is not TARGET:PRECISION (e.g. openvino:fp32, cpu-fused:fp32)")
        try:
            spec = get_backend(target)
        except EdgekitError as e:
            raise SystemExit(f"--targets: {e}")
        if spec.build is None:
            raise SystemExit(f"--targets: {target!r} is not a compile target")
        if precision not in spec.precisions:
            raise SystemExit(f"--targets: {target} offers {', '.join(spec.precisions)}, not {precision!r}")
        if spec.device != "cpu":
            raise SystemExit(f"--targets: {target} runs on {spec.device}; this table is a CPU benchmark")
        if (target, precision) not in out:
            out.append((target, precision))
    if not out:
        raise SystemExit("--targets: give at least one TARGET:PRECISION")
    return out


def reusable(folder: Path, ck, target: str, precision: str) -> bool:
    """An artifact already in ``folder`` built from this checkpoint for this target and precision (and, for
    cpu-fused, from the kernel source as it is now: its libraries are compiled from gmbinet_cpu.cpp)."""
    done = folder / "manifest.json"
    if not done.is_file():
        return False
    man = json.loads(done.read_text())
    if (man.get("source", {}).get("sha256") != ck.sha256 or man.get("target") != target
            or man.get("precision") != precision):
        return False
    from edgekit.backends.registry import get_backend

    outdated = get_backend(target).outdated  # e.g. cpu-fused built from another kernel source
    return outdated is None or outdated(man) is None


def round_ratio(row: dict, base: dict):
    """FPS over the unpruned row's, round by round (both timed in the same interleaved round): median, min, max."""
    from edgekit.bench.cpu import ratio_with_spread

    a, b = (r.get("fps_b1_spread") or {} for r in (row, base))
    if not a.get("per_round") or len(a["per_round"]) != len(b.get("per_round") or ()):
        return None
    return ratio_with_spread(a["per_round"], b["per_round"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="the unpruned checkpoint first, then pruned ones")
    ap.add_argument("--data", required=True, help="SD-900 folder (test split for IoU, parity images for compile)")
    ap.add_argument("--out", default="benchmarks/out/prune")
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma list of TARGET:PRECISION to compile and time (default: {DEFAULT_TARGETS})")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--rounds", default="7", help="edgekit bench --rounds")
    ap.add_argument("--iters", default="20", help="edgekit bench --iters (calls per row per round)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render pareto.{md,json,png} from the artifacts and bench.json already in --out")
    a = ap.parse_args()
    targets = parse_targets(a.targets)

    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.models.summary import count_macs

    out = Path(a.out)
    arts = out / "artifacts"
    arts.mkdir(parents=True, exist_ok=True)
    info, artifacts = [], []
    base_widths = None
    for i, ck_path in enumerate(a.checkpoints):
        ck = load_checkpoint(ck_path)
        model = ck.build()
        # the channel fraction removed, read off the widths (a pruned model fine-tuned again with
        # `edgekit train --init` keeps its widths but not the prune record at the top of its provenance)
        base_widths = base_widths if i else list(model.config.widths)
        ratio = round(1 - model.config.widths[-1] / base_widths[-1], 4)
        macs = count_macs(model, (1, model.config.in_channels, 512, 512))["macs"]
        info.append({"checkpoint": str(ck_path), "ratio": ratio, "widths": list(model.config.widths),
                     "params": model.inference_parameter_count(), "macs": macs,
                     "test_iou_recorded": ck.metrics.get("test_iou")})
        for target, prec in targets:
            folder = arts / f"r{ratio:g}_{target}_{prec}"
            if not a.report_only and not reusable(folder, ck, target, prec):
                calib = ["--calib", a.data] if prec == "int8" else []  # int8: its train split calibrates
                edgekit("compile", str(ck_path), "--target", target, "--precision", prec, "--out", str(folder),
                        "--threads", a.threads, "--parity-data", a.data, *calib, "--force")
            artifacts.append((i, target, prec, folder))
    bench_json = out / "bench.json"
    if a.report_only and not bench_json.is_file():
        raise SystemExit(f"--report-only: no {bench_json}")
    if not a.report_only:
        edgekit("bench", *[str(f) for *_, f in artifacts], "--device", "cpu", "--threads", a.threads, "--batch", "1",
                "--data", a.data, "--rounds", a.rounds, "--iters", a.iters, "--json", str(bench_json))
    bench = json.loads(bench_json.read_text())
    assert len(bench["rows"]) == len(artifacts), (len(bench["rows"]), len(artifacts))
    rows = []
    for (i, target, prec, folder), r in zip(artifacts, bench["rows"]):
        assert Path(r["source"]).resolve() == folder.resolve(), (r["source"], folder)
        assert r["backend"] == target, (r["backend"], target, folder)
        rows.append({**info[i], "checkpoint_index": i, "target": target, "precision": prec, "row": f"{target}:{prec}",
                     "executed_precision": r.get("executed_precision"), "artifact": str(folder),
                     "fps_b1": r["fps_b1"], "fps_b1_spread": r.get("fps_b1_spread"),
                     "p50_ms": r["latency_ms"]["p50"], "iou": r["iou"], "mae": r["mae"]})
    for r in rows:
        base = next(b for b in rows if b["ratio"] == rows[0]["ratio"] and b["row"] == r["row"])
        # the headline, as edgekit bench's: the median of the per-round paired ratios (None with one round)
        r["fps_vs_unpruned_per_round"] = round_ratio(r, base)
        r["fps_vs_unpruned_overall"] = r["fps_b1"] / base["fps_b1"]  # ratio of the two rows' overall medians
        spread = r["fps_vs_unpruned_per_round"]
        r["fps_vs_unpruned"] = spread["ratio"] if spread else r["fps_vs_unpruned_overall"]
        r["iou_delta_vs_unpruned"] = r["iou"] - base["iou"]
    # one block of rows per target:precision, checkpoints in the order given (the bench ran them interleaved)
    rows.sort(key=lambda r: (targets.index((r["target"], r["precision"])), r["checkpoint_index"]))
    settings = bench.get("settings", {})
    rounds, iters = settings.get("rounds", a.rounds), settings.get("iters_per_round", a.iters)
    result = {"date": bench["date"], "machine": bench["machine"], "data": bench["data"],
              "settings": {"threads": settings.get("threads", int(a.threads)), "rounds": int(rounds),
                           "iters": int(iters), "batch": 1, "targets": [f"{t}:{p}" for t, p in targets]},
              "command": " ".join(["python", "benchmarks/prune_pareto.py", *sys.argv[1:]]), "rows": rows}
    if a.report_only and (out / "pareto.json").is_file():  # keep the command that measured it
        result["rendered_by"] = result["command"]
        result["command"] = json.loads((out / "pareto.json").read_text()).get("command", result["command"])
    (out / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"Date {bench['date']}, {bench['machine']['cpu']}, {bench['machine']['logical_cpus']} CPUs, "
             f"batch 1, {result['settings']['threads']} threads, 512x512, all rows in one interleaved bench run "
             f"({rounds} rounds x {iters} calls). FPS vs unpruned: against the ratio-0 row of the same "
             f"target:precision, the median of the per-round paired ratios (in brackets their min-max; "
             f"'within noise' when that range holds 1.0).", "",
             "| target:precision | ratio | widths | params | GMACs | p50 ms | FPS | FPS vs unpruned | test IoU | ΔIoU | MAE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spread = r["fps_vs_unpruned_per_round"]
        vs = f"{r['fps_vs_unpruned']:.2f}x"
        if spread and spread["rounds"] > 1 and r["ratio"] != rows[0]["ratio"]:
            vs += f" ({spread['low']:.2f}-{spread['high']:.2f})" + (", within noise" if spread["within_noise"] else "")
        lines.append(f"| {r['row']} | {r['ratio']:g} | {r['widths']} | {r['params']:,} | {r['macs'] / 1e9:.3f} | "
                     f"{r['p50_ms']:.1f} | {r['fps_b1']:.1f} | {vs} | {r['iou']:.4f} | "
                     f"{r['iou_delta_vs_unpruned']:+.4f} | {r['mae']:.4f} |")
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (target, prec), marker in zip(targets, "os^Dvp*hX"):
        sel = [r for r in rows if r["target"] == target and r["precision"] == prec]
        ax.plot([r["fps_b1"] for r in sel], [r["iou"] for r in sel], marker=marker, label=f"{target}:{prec}")
        for r in sel:
            ax.annotate(f"{r['ratio']:g}", (r["fps_b1"], r["iou"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"FPS, batch 1, synchronous, {a.threads} threads")
    ax.set_ylabel("SD-900 test IoU@0.5")
    ax.set_title("GMBINet structured pruning (label: ratio)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)


if __name__ == "__main__":
    main()
