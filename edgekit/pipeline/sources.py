"""What ``compile_model`` compiles: a source answers every question the pipeline asks of it.

Two kinds: a GMBINet checkpoint or float artifact (``GMBINetSource``, segmentation: parity is the
probability difference and mask IoU agreement on image/mask sets), and the frozen backbone of MLFF
adapters (``edgekit.pipeline.mlff_source.BackboneSource``: pooled tap features, parity is the feature
difference and the adapters' top-1 agreement). The pipeline never asks which kind it has; what
differs is a method here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from edgekit.artifact import is_artifact, read_manifest
from edgekit.backends.base import Runner
from edgekit.data.datasets import SegDataset, limit_samples, open_segmentation
from edgekit.data.preprocess import PreprocessSpec, preprocess, resize_probs
from edgekit.errors import EdgekitError
from edgekit.pipeline.onnx_export import INPUT_NAME, export_onnx
from edgekit.pipeline.parity import PARITY_BUDGETS, parity
from edgekit.progress import track

METRICS = ("iou", "mae", "max_f")


class GMBINetSource:
    """A GMBINet checkpoint, or an existing (float) artifact folder of one."""

    kind = "gmbinet"

    def __init__(self, path: Path, spec: PreprocessSpec, base: dict, checkpoint=None, manifest: Optional[dict] = None):
        self.path, self.spec, self.base = path, spec, base
        self.checkpoint, self.manifest = checkpoint, manifest

    @classmethod
    def open(cls, path: str, input_size: Optional[Tuple[int, int]] = None,
             resize: Optional[str] = None) -> "GMBINetSource":
        """``input_size`` (height, width) / ``resize`` (stretch, letterbox): build for this input instead of
        the checkpoint's own (a GMBINet is fully convolutional); recorded in the artifact's preprocess,
        and the parity check runs the source model at it too. An artifact's input is fixed: refused there
        unless it is what the artifact has."""
        p = Path(path)
        if is_artifact(p):
            man = read_manifest(p)
            if man.get("model", {}).get("kind") == "mlff-backbone":
                raise EdgekitError(f"{p} is a compiled MLFF backbone; compile from its registry or backbone instead")
            if man.get("precision") == "int8":
                raise EdgekitError(f"{p} is already INT8; start from a checkpoint or a float artifact")
            keep = ("model", "input", "output", "preprocess", "classes", "source")
            base = {k: man[k] for k in keep if k in man}
            base["source"] = {**man.get("source", {}), "artifact": str(p), "artifact_target": man["target"]}
            spec = PreprocessSpec.from_dict(man["preprocess"])
            _check_artifact_input(p, spec, input_size, resize)
            return cls(p, spec, base, manifest=man)
        from edgekit.models.checkpoint import load_checkpoint

        ck = load_checkpoint(p)
        if input_size is not None or resize is not None:  # the reference runner (TorchRunner) reads ck.preprocess
            ck.preprocess = dataclasses.replace(ck.preprocess, input_size=tuple(input_size or ck.preprocess.input_size),
                                                resize=resize or ck.preprocess.resize)
        base = {
            "model": {"kind": ck.model_name, "config": ck.config},
            "input": {"name": INPUT_NAME, "shape": ["batch", ck.preprocess.channels, *ck.preprocess.input_size],
                      "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "mask", "meaning": "defect probability (sigmoid), N x 1 x H x W"},
            "preprocess": ck.preprocess.to_dict(), "classes": ck.classes,
            "source": {"path": str(p), "sha256": ck.sha256, "provenance": ck.provenance},
        }
        return cls(p, ck.preprocess, base, checkpoint=ck)

    # -- the model ----------------------------------------------------------------------------------
    @property
    def artifact_target(self) -> Optional[str]:
        return self.manifest["target"] if self.manifest is not None else None

    def torch_module(self):
        if self.checkpoint is None:
            raise EdgekitError(f"{self.path} is an artifact folder; this target builds from the checkpoint")
        return self.checkpoint.build()

    def model_file(self, tmp: Path) -> Path:
        """The float model to build from: a fresh ONNX export, or the source artifact's file."""
        if self.checkpoint is not None:
            spec = self.spec
            return export_onnx(self.checkpoint.build(), (1, spec.channels, *spec.input_size), tmp / "export.onnx")
        return self.path / self.manifest["model_file"]

    def reference_runner(self, threads=None) -> Runner:
        from edgekit import runtime

        if self.checkpoint is not None:
            from edgekit.backends.torch_eager import TorchRunner

            return TorchRunner(self.checkpoint, threads=threads)
        return runtime.load(self.path, threads=threads)

    # -- data ---------------------------------------------------------------------------------------
    def parity_data(self, data: str) -> SegDataset:
        return open_segmentation(data, "test")

    def calibration_data(self, calib: str) -> SegDataset:
        return open_segmentation(calib, "train")

    def validation_data(self, val: str) -> SegDataset:
        return open_segmentation(val, "val")

    def calibration_batches(self, dataset: SegDataset, limit: int) -> List[np.ndarray]:
        samples = limit_samples(dataset.samples, limit)  # every class, not the first class only
        if not samples:
            raise EdgekitError(f"{dataset.description}: no calibration images")
        batches = [preprocess([s.image()], self.spec)
                   for s in track(samples, len(samples), "INT8: reading the calibration images")]
        for s, x in zip(samples, batches):  # every INT8 quantizer (NNCF or a builder's) takes these statistics
            if not np.isfinite(x).all():
                raise EdgekitError(f"calibration image {s.name} of {dataset.description} preprocesses to NaN or Inf")
        return batches

    def check_batches(self, dataset: SegDataset, limit: int = 16) -> List[np.ndarray]:
        """A few preprocessed real images, for checks a builder makes before the pipeline's parity."""
        return [preprocess([s.image()], self.spec) for s in limit_samples(dataset.samples, limit)]

    # -- verification -------------------------------------------------------------------------------
    def parity(self, candidate: Runner, dataset: SegDataset, threads=None, limit: int = 16) -> dict:
        """Parity with the source model, enforced: non-finite values on either side, or a float
        candidate outside its precision's ``PARITY_BUDGETS``, refuse the build (INT8 has --max-drop)."""
        budget = PARITY_BUDGETS.get(getattr(candidate, "precision", None))
        return parity(self.reference_runner(threads), candidate, dataset, limit=limit, budget=budget)

    def nncf_validation(self, dataset: SegDataset, metric: str, model_format: str):
        """(items, fn) for NNCF's accuracy-controlled quantization on ``dataset``."""
        return _validation_items(dataset, self.spec), make_validation_fn(metric, model_format, self.spec)

    def int8_check(self, candidate: Runner, val: SegDataset, max_drop: Optional[float], threads=None,
                   metric: str = "iou", log=print) -> dict:
        """The metric on ``val`` before (the source model) and after (the INT8 artifact); refuses over budget."""
        from edgekit.eval.evaluate import evaluate

        before = evaluate(self.reference_runner(threads), val, desc="INT8 budget: source model on --val")["overall"][metric]
        after = evaluate(candidate, val, desc="INT8 budget: INT8 artifact on --val")["overall"][metric]
        drop = (after - before) if metric == "mae" else (before - after)
        if max_drop is not None and drop > max_drop:  # the refusal is the one line (with the figures), no note before it
            raise EdgekitError(f"INT8 {metric} on {val.description} drops by {drop:.4f} ({before:.4f} -> {after:.4f}), "
                               f"over --max-drop {max_drop}; nothing written")
        log(f"INT8 {metric} on {val.description}: {before:.4f} -> {after:.4f} (drop {drop:+.4f})")
        return {"metric": metric, "validation": val.description, "before": before, "after": after, "drop": drop,
                "max_drop": max_drop}

    def summary(self, out: str, manifest: dict) -> str:
        p = manifest["parity"]
        return (f"wrote {out}: {manifest['target']} {manifest['precision']}, parity vs {p['reference']}: "
                f"max |diff| {p['max_abs_diff']:.2e}, mask IoU agreement {p['mask_iou_agreement']:.4f} "
                f"on {p['images']} images" + (f", within the {manifest['precision']} budget" if "budget" in p else ""))


def _check_artifact_input(path: Path, spec: PreprocessSpec, input_size, resize) -> None:
    """An artifact's model file has its input size built in: another size (or resize) needs the checkpoint."""
    if input_size is not None and tuple(input_size) != tuple(spec.input_size):
        h, w = spec.input_size
        raise EdgekitError(f"{path} is an artifact built for {h}x{w} input; --input-size "
                           f"{input_size[0]}x{input_size[1]} needs the checkpoint it came from")
    if resize is not None and resize != spec.resize:
        raise EdgekitError(f"{path} is an artifact checked with resize {spec.resize}; --resize {resize} needs the "
                           "checkpoint it came from")


def open_source(path: str, as_backbone: bool = False, input_size: Optional[Tuple[int, int]] = None,
                resize: Optional[str] = None):
    """The source for ``path``: an MLFF backbone (registry folder, backbone name, or any ref with
    ``as_backbone``), else a GMBINet checkpoint or float artifact (built for ``input_size`` / ``resize``
    where given: ``GMBINetSource.open``)."""
    from edgekit.pipeline.mlff_source import BackboneSource, is_mlff_source

    if is_mlff_source(path, as_backbone):
        if input_size is not None or resize is not None:
            raise EdgekitError("--input-size and --resize are for GMBINet checkpoints; an MLFF backbone keeps the "
                               "input its adapters were trained on")
        return BackboneSource.open(path)
    return GMBINetSource.open(path, input_size=input_size, resize=resize)


def _validation_items(dataset: SegDataset, spec: PreprocessSpec):
    items = []
    for s in dataset.samples:
        img, mask = s.load()
        if mask is not None:
            items.append((preprocess([img], spec), mask))
    if not items:
        raise EdgekitError(f"{dataset.description}: no masks to validate against")
    return items


def make_validation_fn(metric: str, model_format: str, spec: Optional[PreprocessSpec] = None):
    """NNCF's validation callback: (model, items) -> (higher-is-better score, per-item scores); the
    outputs mapped back to the mask's size as ``spec`` says (letterbox: padding cut off first)."""
    from edgekit.eval.metrics import SegMetrics, image_scores

    def run(model):
        if model_format == "openvino":
            return lambda x: model(x)[0]
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]

    def validate(model, items):
        infer = run(model)
        m, per_item = SegMetrics(), []
        for x, mask in items:
            prob = resize_probs(np.asarray(infer(x))[0, 0], mask.shape, spec)
            m.add(prob, mask)
            mae, iou, _, _ = image_scores(prob, mask)
            per_item.append(-mae if metric == "mae" else iou)
        score = m.summary()["overall"][metric]
        return (-score if metric == "mae" else score), per_item

    return validate
