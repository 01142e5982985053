"""Adapter package size against what a device holds (backbone + adapter), for the fleet update path.

Trains an MLFF adapter with the default backbone (EfficientNet-Lite0) on real NEU images, compiles the
backbone once (ONNX fp32, what a device deploys), packages the adapter with and without health samples, and
reports package bytes / (backbone + adapter bytes). Goal: <= 2 %.

    python benchmarks/package_size.py --data ../shared/datasets/neu-cls --out benchmarks/out/package_size
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import tempfile
from pathlib import Path


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/neu-cls")
    ap.add_argument("--classes", default="crazing,inclusion,scratches")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/out/package_size")
    args = ap.parse_args()

    from edgekit.pipeline.compile import compile_model
    from edgekit.fleet.health import record_health
    from edgekit.models.backbones import load_backbone
    from edgekit.ota import build_package, generate_keypair
    from edgekit.mlff.registry import Registry
    from edgekit.train.continual import TaskData, add_task

    classes = args.classes.split(",")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted((Path(args.data) / c).iterdir())[: args.per_class]
        paths += files
        labels += [i] * len(files)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = load_backbone("efficientnet-lite0")
        add_task(tmp / "reg", backbone, "neu-defects", TaskData(paths, labels, classes), epochs=10, rehearsal=0,
                 cache_dir=tmp / "cache")
        adapter = Registry.open(tmp / "reg").adapter_folder()
        art = tmp / "backbone_onnx"
        compile_model(str(tmp / "reg"), "onnx", "fp32", str(art), parity_data=args.data, log=lambda *_: None)
        key = generate_keypair(tmp / "key")[0]
        bare, with_samples = tmp / "bare.zip", tmp / "samples.zip"
        build_package(adapter, key, "1.0.0", bare)
        samples = [paths[i * len(paths) // 4] for i in range(4)]
        health, info = record_health(adapter, backbone, samples)
        build_package(adapter, key, "1.0.0", with_samples, health=health, health_info=info)
        sizes = {"adapter_bytes": _folder_bytes(adapter), "backbone_weights_bytes": backbone.weights_path.stat().st_size,
                 "backbone_artifact_bytes": _folder_bytes(art), "package_bytes": bare.stat().st_size,
                 "package_with_4_samples_bytes": with_samples.stat().st_size, "health_bytes": len(health)}
    rows = {}
    for name in ("package_bytes", "package_with_4_samples_bytes"):
        rows[name] = {"vs_artifact_plus_adapter": sizes[name] / (sizes["backbone_artifact_bytes"] + sizes["adapter_bytes"]),
                      "vs_weights_plus_adapter": sizes[name] / (sizes["backbone_weights_bytes"] + sizes["adapter_bytes"])}
    result = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "backbone": "efficientnet-lite0",
              "classes": classes, "images": len(paths), "sizes": sizes, "ratios": rows}
    (out / "package_size.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
