"""Pareto table for structured pruning: parameters, MACs, CPU FPS (OpenVINO, one interleaved run)
and SD-900 test IoU for GMBINet checkpoints pruned at several ratios.

    # the pruned checkpoints (fine-tuned at 512 px on the SD-900 train split, val for selection):
    edgekit prune ../shared/checkpoints/gmbinet_sd900_official.pt --ratio 0.25 \
        --finetune recipes/gmbinet_sd900.yaml --data ../shared/datasets/sd-saliency-900 --out p25.pt
    python benchmarks/prune_pareto.py ../shared/checkpoints/gmbinet_sd900_official.pt p25.pt p50.pt \
        --data ../shared/datasets/sd-saliency-900 --out benchmarks/out/prune

Every checkpoint is compiled with `edgekit compile --target openvino --precision fp32` (and the
OpenVINO default precision, the CPU-deployment baseline), then all artifacts are timed in one
`edgekit bench` run. Writes pareto.json, pareto.md and pareto.png into --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def edgekit(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgekit.cli", *args]
    print("+ edgekit " + " ".join(args), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="the unpruned checkpoint first, then pruned ones")
    ap.add_argument("--data", required=True, help="SD-900 folder (test split for IoU)")
    ap.add_argument("--out", default="benchmarks/out/prune")
    ap.add_argument("--precisions", default="fp32,default")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--rounds", default="7")
    ap.add_argument("--iters", default="20")
    a = ap.parse_args()


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
        for prec in a.precisions.split(","):
            folder = arts / f"r{ratio:g}_{prec}"
            done = folder / "manifest.json"
            if not done.is_file() or json.loads(done.read_text()).get("source", {}).get("sha256") != ck.sha256:
                edgekit("compile", str(ck_path), "--target", "openvino", "--precision", prec, "--out", str(folder),
                        "--threads", a.threads, "--parity-data", a.data, "--force")
            artifacts.append((i, prec, folder))
    bench_json = out / "bench.json"
    edgekit("bench", *[str(f) for _, _, f in artifacts], "--device", "cpu", "--threads", a.threads, "--batch", "1",
            "--data", a.data, "--rounds", a.rounds, "--iters", a.iters, "--json", str(bench_json))
    bench = json.loads(bench_json.read_text())
    rows = []
    for (i, prec, folder), r in zip(artifacts, bench["rows"]):
        assert Path(r["source"]).resolve() == folder.resolve(), (r["source"], folder)
        rows.append({**info[i], "precision": prec, "fps_b1": r["fps_b1"], "p50_ms": r["latency_ms"]["p50"],
                     "iou": r["iou"], "mae": r["mae"]})
    for r in rows:
        base = next(b for b in rows if b["ratio"] == rows[0]["ratio"] and b["precision"] == r["precision"])
        r["fps_vs_unpruned"] = r["fps_b1"] / base["fps_b1"]
        r["iou_delta_vs_unpruned"] = r["iou"] - base["iou"]
    result = {"date": bench["date"], "machine": bench["machine"], "data": bench["data"],
              "command": " ".join(["python", "benchmarks/prune_pareto.py", *sys.argv[1:]]), "rows": rows}
    (out / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"Date {bench['date']}, {bench['machine']['cpu']}, {bench['machine']['logical_cpus']} CPUs, "
             f"batch 1, {a.threads} threads, 512x512, all rows in one interleaved bench run.", "",
             "| ratio | OpenVINO precision | widths | params | GMACs | p50 ms | FPS | FPS vs unpruned | test IoU | ΔIoU | MAE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['precision']} | {r['widths']} | {r['params']:,} | {r['macs'] / 1e9:.3f} | "
                     f"{r['p50_ms']:.1f} | {r['fps_b1']:.1f} | {r['fps_vs_unpruned']:.2f}x | {r['iou']:.4f} | "
                     f"{r['iou_delta_vs_unpruned']:+.4f} | {r['mae']:.4f} |")
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prec, marker in zip(a.precisions.split(","), "os^D"):
        sel = [r for r in rows if r["precision"] == prec]
        ax.plot([r["fps_b1"] for r in sel], [r["iou"] for r in sel], marker=marker, label=f"OpenVINO {prec}")
        for r in sel:
            ax.annotate(f"{r['ratio']:g}", (r["fps_b1"], r["iou"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FPS, batch 1, synchronous")
    ax.set_ylabel("SD-900 test IoU@0.5")
    ax.set_title("GMBINet structured pruning (label: ratio)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)


if __name__ == "__main__":
    main()
