"""``edgekit compile`` and ``edgekit quantize``: a checkpoint or artifact -> a verified artifact folder.

The flow is the same for every target: export (or reuse) ONNX, let the target build its files,
quantize them when INT8 is asked for, then measure parity against the source model on real images
and record everything in the manifest. A failure at any step leaves no folder behind.

Two kinds of source: a GMBINet checkpoint or float artifact (``Source``), and the frozen backbone of
MLFF adapters (``edgekit.export.mlff.BackboneSource``: a registry folder, a backbone name, or a backbone
file with ``as_backbone``), compiled to its pooled tap features; that kind brings its own image sets,
calibration and parity (feature difference, adapter top-1 agreement).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from edgekit.data.datasets import SegDataset, limit_samples, open_segmentation
from edgekit.data.preprocess import PreprocessSpec, preprocess, resize_probs
from edgekit.errors import EdgekitError
from edgekit.export.artifact import artifact_writer, is_artifact, read_manifest, tool_versions, write_manifest
from edgekit.export.compare import parity
from edgekit.export.onnx_export import INPUT_NAME, export_onnx
from edgekit.export.targets import get_target
from edgekit.runtime.base import Runner

METRICS = ("iou", "mae", "max_f")


@dataclass
class Source:
    """What is being compiled: a checkpoint, or an existing (float) artifact folder."""

    path: Path
    spec: PreprocessSpec
    base: dict  # manifest fields inherited by the new artifact (model, input, preprocess, source...)
    checkpoint: object = None
    manifest: Optional[dict] = None

    @classmethod
    def open(cls, path: str) -> "Source":
        p = Path(path)
        if is_artifact(p):
            man = read_manifest(p)
            if man.get("precision") == "int8":
                raise EdgekitError(f"{p} is already INT8; start from a checkpoint or a float artifact")
            keep = ("model", "input", "output", "preprocess", "classes", "source")
            base = {k: man[k] for k in keep if k in man}
            base["source"] = {**man.get("source", {}), "artifact": str(p), "artifact_target": man["target"]}
            return cls(p, PreprocessSpec.from_dict(man["preprocess"]), base, manifest=man)
        from edgekit.models.checkpoint import load_checkpoint

        ck = load_checkpoint(p)
        base = {
            "model": {"kind": ck.model_name, "config": ck.config},
            "input": {"name": INPUT_NAME, "shape": ["batch", ck.preprocess.channels, *ck.preprocess.input_size],
                      "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "mask", "meaning": "defect probability (sigmoid), N x 1 x H x W"},
            "preprocess": ck.preprocess.to_dict(), "classes": ck.classes,
            "source": {"path": str(p), "sha256": ck.sha256, "provenance": ck.provenance},
        }
        return cls(p, ck.preprocess, base, checkpoint=ck)

    def model_file(self, tmp: Path) -> Path:
        """The float model to build from: a fresh ONNX export, or the source artifact's file."""
        if self.checkpoint is not None:
            spec = self.spec
            return export_onnx(self.checkpoint.build(), (1, spec.channels, *spec.input_size), tmp / "export.onnx")
        return self.path / self.manifest["model_file"]

    def reference_runner(self, threads=None) -> Runner:
        from edgekit import runtime

        if self.checkpoint is not None:
            from edgekit.runtime.torch_runner import TorchRunner

            return TorchRunner(self.checkpoint, threads=threads)
        return runtime.load(self.path, threads=threads)


def calibration_batches(dataset: SegDataset, spec: PreprocessSpec, limit: int) -> List[np.ndarray]:
    samples = limit_samples(dataset.samples, limit)  # every class, not the first class only
    if not samples:
        raise EdgekitError(f"{dataset.description}: no calibration images")
    return [preprocess([s.image()], spec) for s in samples]


def open_calibration(calib: Optional[str]) -> SegDataset:
    """Calibration images: a folder, an SD-900 folder (its train split), or the synthetic generator."""
    if calib is None:
        return open_segmentation("synthetic:128", "train")
    p = Path(calib)
    if p.is_dir() and (p / "Source Images").is_dir():
        return open_segmentation(calib, "train")
    return open_segmentation(calib, "all")


def compile_model(source_path: str, target: str, precision: str, out: str, *, parity_data: str = "synthetic:12",
                  calib: Optional[str] = None, subset: int = 100, int8_scheme: str = "pointwise",
                  max_drop: Optional[float] = None, metric: str = "iou", val: Optional[str] = None,
                  force: bool = False, threads: Optional[int] = None, log: Callable = print,
                  as_backbone: bool = False) -> dict:
    """Build one artifact folder; returns its manifest.

    ``as_backbone``: compile ``source_path`` (a backbone name or weights file) as an MLFF backbone;
    a registry folder or a backbone name is one without the flag.
    """
    from edgekit.export.mlff import BackboneSource, is_mlff_source

    tgt = get_target(target)
    tgt.check(precision)
    mlff = is_mlff_source(source_path, as_backbone)
    if mlff and precision == "auto":
        raise EdgekitError("--precision auto is for GMBINet checkpoints; give fp32, int8, ... for an MLFF backbone")
    if not mlff and is_artifact(Path(source_path)) and \
            read_manifest(Path(source_path), verify=False).get("model", {}).get("kind") == "mlff-backbone":
        raise EdgekitError(f"{source_path} is a compiled MLFF backbone; compile from its registry or backbone instead")
    if metric not in METRICS:
        raise EdgekitError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if max_drop is not None and val is None:
        raise EdgekitError("--max-drop needs --val: validation images to measure the drop on")
    if precision == "auto":
        from edgekit.export.auto import compile_auto

        return compile_auto(source_path, target, out, parity_data=parity_data, calib=calib, subset=subset,
                            int8_scheme=int8_scheme, max_drop=max_drop, metric=metric, val=val, force=force,
                            threads=threads, log=log)
    if mlff:
        src = BackboneSource.open(source_path)
        parity_set = src.parity_data(parity_data)
        calib_set = src.calibration_data(calib) if precision == "int8" else None
        val_set = src.parity_data(val) if val else None
    else:
        src = Source.open(source_path)
        if src.manifest is not None and target in ("onnx", "ort") and src.manifest["target"] == "openvino":
            raise EdgekitError(f"{source_path} is an OpenVINO artifact; compile {target} from the checkpoint or an ONNX artifact")
        parity_set = open_segmentation(parity_data, "test")
        calib_set = open_calibration(calib) if precision == "int8" else None
        val_set = open_segmentation(val, "val" if (Path(val) / "split.json").is_file() else "all") if val else None
    with tempfile.TemporaryDirectory() as tmp, artifact_writer(out, force=force) as folder:
        if target == "cuda-fused":  # the checkpoint and our prebuilt kernels, no ONNX
            from edgekit.export.cuda_fused import build_for_compile as build_cuda_fused

            fields = build_cuda_fused(src, folder, precision, log)
        elif target == "cpu-fused":  # folded weights + our kernels built here per ISA level, no ONNX
            from edgekit.backends.cpu_fused.build import build_cpu_fused

            fields = build_cpu_fused(src.checkpoint, folder, precision, log=log)
        elif target == "trt":  # its own typed ONNX (fp16 or Q/DQ, checked on the CPU), then the engine
            from edgekit.export.trt import build_for_compile

            fields = build_for_compile(src, src.model_file(Path(tmp)), folder, precision, parity_set, calib_set,
                                       subset, int8_scheme, log)
        else:
            fields = tgt.build(src.model_file(Path(tmp)), folder, "fp32" if precision == "int8" else precision)
        files = [fields["model_file"], *fields.pop("extra_files", [])]
        manifest = {"target": target, "precision": precision, **fields, **src.base, "tools": tool_versions()}
        if precision == "int8" and target != "trt":
            manifest["quantization"] = _quantize_in_place(src, folder, manifest, files, calib_set, subset,
                                                          int8_scheme, val_set, metric, max_drop, threads, log)
        write_manifest(folder, manifest, files)  # hashes first: the runner below verifies them
        if mlff:
            manifest["parity"] = src.parity(_load(folder, threads), parity_set, threads)
        elif target == "cuda-fused":
            from edgekit.export.cuda_fused import verification_runner

            runner, limit, how = verification_runner(folder, precision)
            log(f"cuda-fused: verifying on {limit} images by {how.split(' (')[0]}")
            manifest["parity"] = {**parity(src.reference_runner(threads), runner, parity_set, limit=limit), "method": how}
        else:
            manifest["parity"] = parity(src.reference_runner(threads), _load(folder, threads), parity_set)
        manifest = write_manifest(folder, manifest, files)
    p = manifest["parity"]
    if mlff:
        agree = (f", adapter top-1 agreement {p['top1_agreement']:.4f}" if "top1_agreement" in p else "") + \
                (f", accuracy {p['accuracy_reference']:.4f} -> {p['accuracy']:.4f}" if "accuracy" in p else "")
        log(f"wrote {out}: MLFF backbone {src.backbone.id}, {target} {precision}, features vs {p['reference']}: "
            f"max |diff| {p['max_abs_diff']:.2e}{agree} on {p['images']} images")
        return manifest
    log(f"wrote {out}: {target} {precision}, parity vs {p['reference']}: max |diff| {p['max_abs_diff']:.2e}, "
        f"mask IoU agreement {p['mask_iou_agreement']:.4f} on {p['images']} images")
    return manifest


def _load(folder: Path, threads) -> Runner:
    from edgekit import runtime

    return runtime.load(folder, threads=threads)


def _quantize_in_place(src: Source, folder: Path, manifest: dict, files: List[str], calib_set: SegDataset, subset: int, scheme: str,
                       val_set: Optional[SegDataset], metric: str, max_drop: Optional[float], threads, log) -> dict:
    """Replace the float model file in ``folder`` with its NNCF INT8 version, checking the budget."""
    from edgekit.compress.quantize import quantize_model

    target = manifest["target"]
    path = folder / manifest["model_file"]
    mlff = not isinstance(src, Source)  # an MLFF backbone: its own calibration and accuracy check
    calibration = src.calibration_batches(calib_set, subset) if mlff else calibration_batches(calib_set, src.spec, subset)
    validation = _validation_items(val_set, src.spec) if (val_set is not None and not mlff) else None
    vfn = make_validation_fn(metric, target) if (validation and max_drop is not None) else None
    if target == "openvino":
        import openvino as ov

        q = quantize_model(ov.Core().read_model(str(path)), "openvino", calibration, scheme=scheme,
                           subset_size=subset, validation=validation, validation_fn=vfn, max_drop=max_drop)
        # The float IR's .bin is memory-mapped: write beside it and rename, never over it in place.
        staged = path.with_name("int8.xml")
        ov.save_model(q, str(staged), compress_to_fp16=False)
        os.replace(staged, path)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        manifest["inference_precision"] = "default"  # ops left in float run at the plugin's default
    else:
        import onnx

        q = quantize_model(onnx.load(str(path)), "onnx", calibration, scheme=scheme, subset_size=subset,
                           validation=validation, validation_fn=vfn, max_drop=max_drop)
        onnx.save(q, str(path))
    info = {"tool": "nncf", "scheme": scheme, "calibration": calib_set.description, "calibration_images": len(calibration),
            "accuracy_control": vfn is not None}
    if mlff:
        if val_set is not None:
            write_manifest(folder, dict(manifest), files)
            info.update(src.int8_check(_load(folder, threads), val_set, max_drop, threads))
            log(f"INT8 top-1 accuracy on {val_set.description}: {info['before']:.4f} -> {info['after']:.4f} "
                f"(drop {info['drop']:+.4f})")
        return info
    if val_set is not None:
        from edgekit.eval.evaluate import evaluate

        write_manifest(folder, dict(manifest), files)
        before = evaluate(src.reference_runner(threads), val_set, show_progress=False)["overall"][metric]
        after = evaluate(_load(folder, threads), val_set, show_progress=False)["overall"][metric]
        drop = (after - before) if metric == "mae" else (before - after)
        info.update(metric=metric, validation=val_set.description, before=before, after=after, drop=drop,
                    max_drop=max_drop)
        log(f"INT8 {metric} on {val_set.description}: {before:.4f} -> {after:.4f} (drop {drop:+.4f})")
        if max_drop is not None and drop > max_drop:
            raise EdgekitError(f"INT8 {metric} drops by {drop:.4f} ({before:.4f} -> {after:.4f}), over --max-drop "
                               f"{max_drop}; nothing written")
    return info


def _validation_items(dataset: SegDataset, spec: PreprocessSpec):
    items = []
    for s in dataset.samples:
        img, mask = s.load()
        if mask is not None:
            items.append((preprocess([img], spec), mask))
    if not items:
        raise EdgekitError(f"{dataset.description}: no masks to validate against")
    return items


def make_validation_fn(metric: str, backend: str):
    """NNCF's validation callback: (model, items) -> (higher-is-better score, per-item scores)."""
    from edgekit.eval.metrics import SegMetrics, image_scores

    def run(model):
        if backend == "openvino":
            return lambda x: model(x)[0]
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]

    def validate(model, items):
        infer = run(model)
        m, per_item = SegMetrics(), []
        for x, mask in items:
            prob = resize_probs(np.asarray(infer(x))[0, 0], mask.shape)
            m.add(prob, mask)
            mae, iou, _, _ = image_scores(prob, mask)
            per_item.append(-mae if metric == "mae" else iou)
        score = m.summary()["overall"][metric]
        return (-score if metric == "mae" else score), per_item

    return validate
