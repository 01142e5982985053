"""Core commands: info, eval, predict, import, synth."""
from __future__ import annotations

from pathlib import Path

import click

from edgekit.commands._common import (build_command, check_out, echo_json, force_option, json_option, limit_option,
                                     looks_like_model, model_path, note, out_option, print_table, threads_option,
                                     write_json)
from edgekit.errors import EdgekitError


@click.command("info")
@click.argument("model", required=False, metavar="[CKPT|ARTIFACT|MODEL.onnx|MODEL.xml]")
@click.option("--size", default=None, type=int, help="Input size for MAC counting (default: the model's own).")
@json_option
def info_cmd(model, size, as_json):
    """Architecture, parameters, MACs and input spec of a checkpoint; what an artifact or model file is."""
    from edgekit.artifact import is_artifact
    from edgekit.backends.registry import spec_for_model_file

    path = Path(model_path(model))
    if is_artifact(path):
        return _artifact_info(path, as_json)
    if spec_for_model_file(path) is not None:
        return _plain_model_info(path, as_json)
    from edgekit.models.info import checkpoint_info

    d = checkpoint_info(str(path), size)
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
    if d.get("nonfinite_weights"):
        rows.append(("non-finite weights", d["nonfinite_weights"] + " (compile, quantize and eval refuse it)"))
    if d.get("metrics"):
        rows.append(("recorded metrics", ", ".join(f"{k}={v}" for k, v in d["metrics"].items())))
    print_table("edgekit info", ["field", "value"], rows, numeric=False)


def _spec_text(pre: dict) -> str:
    h, w = pre["input_size"]
    return (f"{pre['channels']} x {h} x {w} float32; gray/{pre['scale']}, (x-{pre['mean']})/{pre['std']}, "
            f"gray->{pre['channels']}ch, bilinear {pre.get('resize', 'stretch')} to {h}x{w}")


def _artifact_info(folder: Path, as_json: bool) -> None:
    """An artifact folder: its manifest (file hashes checked first), as recorded at compile time."""
    from edgekit.artifact import read_manifest

    m = read_manifest(folder)
    if as_json:
        echo_json({"kind": "artifact", "path": str(folder), **m})
        return
    src = m.get("source") or {}
    rows = [("artifact", str(folder)), ("target / precision", f"{m.get('target')} / {m.get('precision')}"),
            ("model", f"{(m.get('model') or {}).get('kind', m.get('model_kind', '-'))}"),
            ("input", _spec_text(m["preprocess"]) if "preprocess" in m else "-"),
            ("files", ", ".join(f"{n} ({h[:12]}…)" for n, h in m.get("files", {}).items())),
            ("size", f"{m.get('size_bytes', 0) / 1e6:.2f} MB"), ("created", m.get("created", "-"))]
    if isinstance(src, dict) and src:
        rows.append(("source", f"{src.get('path', '-')} (sha256 {str(src.get('sha256', ''))[:12]}…)"))
    p = m.get("parity")
    if p:
        agree = f", mask IoU agreement {p['mask_iou_agreement']:.4f}" if "mask_iou_agreement" in p else ""
        rows.append(("parity", f"max |diff| {p['max_abs_diff']:.2e}{agree} on {p['images']} images of "
                               f"{p.get('data', '-')} vs {p.get('reference', '-')}"))
    q = m.get("quantization")
    if q:
        rows.append(("quantization", ", ".join(f"{k}={v}" for k, v in q.items() if not isinstance(v, (dict, list)))))
    rows.append(("tools", ", ".join(f"{k} {v}" for k, v in (m.get("tools") or {}).items())))
    print_table("edgekit info", ["field", "value"], rows, numeric=False)


def _plain_model_info(path: Path, as_json: bool) -> None:
    """A plain model.onnx / model.xml: what the runtime reads off it, and the preprocessing assumed."""
    from edgekit import runtime
    from edgekit.utils import sha256_file

    runner = runtime.load(path)
    d = {"kind": "model file", "path": str(path), "backend": runner.name, "sha256": sha256_file(path),
         "size_bytes": path.stat().st_size, "input": [runner.spec.channels, *runner.spec.input_size],
         "preprocess": runner.spec.to_dict(), "preprocess_assumed": runner.meta.get("preprocess_assumed")}
    if as_json:
        echo_json(d)
        return
    rows = [("model file", d["path"]), ("runs on", runner.name), ("sha256", d["sha256"][:16] + "…"),
            ("size", f"{d['size_bytes'] / 1e6:.2f} MB"), ("input", _spec_text(d["preprocess"])),
            ("preprocessing", d["preprocess_assumed"] or "-")]
    print_table("edgekit info", ["field", "value"], rows, numeric=False)


def load_runner(model: str | None, threads):
    """``runtime.load`` of the MODEL argument; a plain model file's assumed preprocessing said on stderr."""
    from edgekit import runtime

    runner = runtime.load(model_path(model), threads=threads)
    if runner.meta.get("preprocess_assumed"):
        note(f"note: {runner.meta['preprocess_assumed']}")
    return runner


@click.command("eval")
@click.argument("model", required=False, metavar="[CKPT|ARTIFACT|MODEL.onnx|MODEL.xml]")
@click.option("--data", default="synthetic", show_default=True,
              help="SD-900 folder, images/+masks/ folder, or synthetic[:N].")
@click.option("--split", default=None, type=click.Choice(["train", "val", "test", "all"]),
              help="Which images to score: SD-900 folders and synthetic data default to test; an image/mask folder "
                   "without split.json scores all its images unless train/val/test is given (then the part "
                   "`edgekit train` put there, by file name).")
@click.option("--batch", "batch_size", default=4, show_default=True, type=click.IntRange(1, 1024))
@threads_option()
@limit_option()
@json_option
@out_option("file", "Also write the JSON here.", required=False, dest="out_json")
@force_option
def eval_cmd(model, data, split, batch_size, threads, limit, as_json, out_json, force):
    """Per-class MAE, IoU@0.5 and max F-measure of a checkpoint, artifact or model file."""
    from edgekit.data.datasets import open_segmentation
    from edgekit.eval.evaluate import evaluate

    check_out(out_json, force)
    dataset = open_segmentation(data, split or "test")
    split_note = None
    if dataset.split == "all" and not dataset.synthetic and split != "all":
        # a folder without split.json: `edgekit train` split it by file name (split_by_name); --split test must
        # score what training held out, not every image (a new user's IoU otherwise included the train images).
        # Said in the result (JSON and the table's caption), not as a stderr note: a refusal stays one line.
        if split is None:
            split_note = (f"{data} has no split.json: all {len(dataset.samples)} images scored (--split test "
                          "scores the part `edgekit train` held out)")
        else:
            from edgekit.data.datasets import split_by_name

            dataset = split_by_name(dataset, split)
            split_note = f"{data} has no split.json: the {split} part by file name, as `edgekit train` split it"
    split = split or ("all" if dataset.split == "all" else "test")
    runner = load_runner(model, threads)
    result = evaluate(runner, dataset, batch_size=batch_size, limit=limit, show_progress=not as_json,
                      note=note)
    result["split"] = split
    if split_note:
        result["split_note"] = split_note
    if runner.meta.get("preprocess_assumed"):
        result["preprocess_assumed"] = runner.meta["preprocess_assumed"]
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
                caption=result["data"] + (f"; {split_note}" if split_note else ""))


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="[CKPT|ARTIFACT|MODEL.onnx|MODEL.xml] IMAGES...")
@out_option("folder", "Output folder.", dest="out_dir")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@threads_option()
@force_option
@json_option
def predict_cmd(inputs, out_dir, threshold, threads, force, as_json):
    """Write <name>_mask.png and <name>_overlay.png for each image (or folder of images).

    The first argument is the model when it looks like one (.pt/.pth/.ckpt/.bin/.onnx/.xml, or an
    artifact folder); without one, the embedded default checkpoint is used (said on stderr).
    """
    from edgekit.data.images import expand_image_paths, is_image_name
    from edgekit.eval.predict import output_names, predict

    from edgekit.artifact import is_artifact, not_an_artifact

    first = Path(inputs[0])
    if (len(inputs) > 1 and first.is_dir() and not is_artifact(first)
            and not any(is_image_name(p) for p in first.iterdir())):
        raise not_an_artifact(first)  # meant as the model (images follow), but not an artifact folder
    model, images = (inputs[0], inputs[1:]) if looks_like_model(inputs[0]) else (None, inputs)
    if not images:
        raise EdgekitError(f"no input images given (after the model {model})")
    model_path(model, quiet=True)  # a missing model is named before the images are looked at
    paths = expand_image_paths(images, unique_stems=True)
    if not force:
        for p in paths:
            for out in output_names(p, Path(out_dir)):
                check_out(out, force)
    runner = load_runner(model, threads)
    results = predict(runner, [str(p) for p in paths], Path(out_dir), threshold=threshold, show_progress=not as_json,
                      note=note)
    if runner.meta.get("preprocess_assumed"):
        for r in results:
            r["preprocess_assumed"] = runner.meta["preprocess_assumed"]
    if as_json:
        echo_json(results)
    else:
        for r in results:
            click.echo(f"{r['image']}: defect {100 * r['defect_fraction']:.2f}% of pixels -> {r['overlay']}")


@build_command
@click.command("import")
@click.argument("source", type=click.Path(dir_okay=False))
@out_option("file", "edgekit checkpoint to write.", dest="out_path")
@force_option
@click.option("--classes", default=None, help="Comma-separated class names to record.")
def import_cmd(source, out_path, force, classes):
    """Convert a plain GMBINet state_dict (e.g. the authors' checkpoint) to an edgekit checkpoint."""
    from edgekit.models.checkpoint import load_checkpoint

    check_out(out_path, force)
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
