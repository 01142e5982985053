"""Core commands: info, eval, predict, import, synth."""
from __future__ import annotations

from pathlib import Path

import click

from edgekit.commands._common import echo_json, print_table, write_json
from edgekit.errors import EdgekitError
from edgekit.models.default import resolve_model


@click.command("info")
@click.argument("model", required=False, metavar="[CKPT]")
@click.option("--size", default=None, type=int, help="Input size for MAC counting (default: the model's own).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info_cmd(model, size, as_json):
    """Architecture, parameters, MACs and input spec of a checkpoint."""
    from edgekit.models.info import checkpoint_info

    d = checkpoint_info(resolve_model(model), size)
    if as_json:
        echo_json(d)
        return
    c = d["config"]
    rows = [
        ("model", d["model"]),
        ("source", d["path"]),
        ("sha256", d["sha256"][:16] + "…"),
        ("widths / depths / scales", f"{c.get('widths')} / {c.get('depths')} / {c.get('scales')}"),
        ("parameters (checkpoint)", f"{d['parameters']:,}"),
        ("parameters (inference path)", f"{d['parameters_inference']:,}"),
        (f"MACs @ {d['macs_input'][2]}x{d['macs_input'][3]}", f"{d['macs'] / 1e9:.3f} G (conv+linear; FLOPs = 2 x MACs)"),
        ("element-wise ops", f"{d['elementwise_ops'] / 1e6:.1f} M (BN, ReLU, sigmoid)"),
        ("input", f"{d['input']['shape']} float32, " + d['input']['normalize']),
        ("classes", ", ".join(d["classes"]) or "-"),
    ]
    if d.get("metrics"):
        rows.append(("recorded metrics", ", ".join(f"{k}={v}" for k, v in d["metrics"].items())))
    print_table("edgekit info", ["field", "value"], rows, numeric=False)


@click.command("eval")
@click.argument("model", required=False, metavar="[CKPT|ARTIFACT]")
@click.option("--data", default="synthetic", show_default=True,
              help="SD-900 folder, images/+masks/ folder, or synthetic[:N].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--batch", "batch_size", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for the runtime.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate N images only, taken across all classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
def eval_cmd(model, data, split, batch_size, threads, limit, as_json, out_json):
    """Per-class MAE, IoU@0.5 and max F-measure of a checkpoint or artifact."""
    from edgekit import runtime
    from edgekit.data.datasets import open_segmentation
    from edgekit.eval.evaluate import evaluate

    dataset = open_segmentation(data, split)
    runner = runtime.load(resolve_model(model), threads=threads)
    result = evaluate(runner, dataset, batch_size=batch_size, limit=limit, show_progress=not as_json)
    result["split"] = split
    if out_json:
        write_json(out_json, result)
    if as_json:
        echo_json(result)
        return
    rows = [(c, m["images"], f"{m['mae']:.4f}", f"{m['iou']:.4f}", f"{m['max_f']:.4f}")
            for c, m in result["per_class"].items()]
    o = result["overall"]
    rows.append(("overall", o["images"], f"{o['mae']:.4f}", f"{o['iou']:.4f}", f"{o['max_f']:.4f}"))
    print_table(f"eval: {result['model']}", ["class", "images", "MAE", "IoU@0.5", "max F (β²=0.3)"], rows,
                caption=result["data"])


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="[CKPT|ARTIFACT] IMAGES...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--json", "as_json", is_flag=True)
def predict_cmd(inputs, out_dir, threshold, threads, as_json):
    """Write <name>_mask.png and <name>_overlay.png for each image (or folder of images)."""
    from edgekit import runtime
    from edgekit.data.images import is_image_name
    from edgekit.eval.predict import predict

    first = Path(inputs[0])
    is_model = (first.is_file() and not is_image_name(first)) or (first / "manifest.json").is_file()
    model, images = (inputs[0], inputs[1:]) if is_model else (None, inputs)
    if not images:
        raise EdgekitError("no input images given")
    runner = runtime.load(resolve_model(model), threads=threads)
    results = predict(runner, images, Path(out_dir), threshold=threshold, show_progress=not as_json)
    if as_json:
        echo_json(results)
    else:
        for r in results:
            click.echo(f"{r['image']}: defect {100 * r['defect_fraction']:.2f}% of pixels -> {r['overlay']}")


@click.command("import")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--classes", default=None, help="Comma-separated class names to record.")
def import_cmd(source, out_path, classes):
    """Convert a plain GMBINet state_dict (e.g. the authors' checkpoint) to an edgekit checkpoint."""
    from edgekit.models.checkpoint import load_checkpoint

    ck = load_checkpoint(source)
    if classes:
        ck.classes = [c.strip() for c in classes.split(",") if c.strip()]
    ck.save(out_path)
    click.echo(f"wrote {out_path} ({ck.model_name}, {len(ck.state_dict)} tensors, source sha256 "
               f"{ck.provenance.get('source_sha256', ck.sha256)[:12]}…)")


@click.command("synth")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("-n", "count", default=30, show_default=True, type=click.IntRange(1, 100000))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--size", default=200, show_default=True, type=click.IntRange(32, 4096))
def synth_cmd(out_dir, count, split, size):
    """Write synthetic steel-defect images and masks (images/ + masks/) for demos or calibration."""
    from edgekit.data.images import write_png
    from edgekit.data.datasets import synthetic_dataset

    ds = synthetic_dataset(count, split=split, size=(size, size))
    out = Path(out_dir)
    for s in ds.samples:
        write_png(out / "images" / f"{s.name}.png", s._image)
        write_png(out / "masks" / f"{s.name}.png", (s._mask * 255).astype("uint8"))
    click.echo(f"wrote {count} images and masks to {out}")


commands = [info_cmd, eval_cmd, predict_cmd, import_cmd, synth_cmd]
