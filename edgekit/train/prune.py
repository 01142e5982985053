"""What ``edgekit prune`` does, start to end: channel ranking from the training loss (Taylor),
BatchNorm recalibration on training images, the source-vs-pruned check on the val split, and the
optional fine-tuning with a recipe (:func:`prune_and_finetune`; the command only parses and prints).

The pruning itself (Torch-Pruning, GMBI as one unit) is ``edgekit.compress.prune``; this module
feeds it real images and the training loss, which is why it lives with training. Every step that
takes seconds shows progress on stderr (``edgekit.progress``).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from edgekit.compress.prune import prune_checkpoint, recalibrate_batchnorm
from edgekit.errors import EdgekitError
from edgekit.progress import track


def recalibrate_on_dataset(model: nn.Module, dataset, spec, images: int, batch: int = 8) -> dict:
    """:func:`recalibrate_batchnorm` on ``images`` images of ``dataset`` (taken across its classes),
    preprocessed exactly as at inference; returns what to record in the provenance."""
    from edgekit.data.datasets import limit_samples
    from edgekit.data.preprocess import preprocess

    samples = limit_samples(dataset.samples, images)

    def batches():  # lazily: 200 images at 512x512 would be ~600 MB at once
        for i in range(0, len(samples), batch):
            yield torch.from_numpy(preprocess([s.image() for s in samples[i:i + batch]], spec))

    seen = recalibrate_batchnorm(model, batches())
    return {"images": seen, "data": dataset.description}


def bn_batches(dataset, spec, images: int, batch: int = 8):
    """Preprocessed batches of ``images`` images of ``dataset`` (across its classes), lazily."""
    from edgekit.data.datasets import limit_samples
    from edgekit.data.preprocess import preprocess

    samples = limit_samples(dataset.samples, images)

    def batches():
        for i in range(0, len(samples), batch):
            yield torch.from_numpy(preprocess([s.image() for s in samples[i:i + batch]], spec))

    yield from track(batches(), len(samples), "prune: BatchNorm recalibration", count=len)


def taylor_batches(dataset, spec, images: int, batch: int = 8):
    """(images, masks) batches of ``images`` samples of ``dataset`` (across its classes), at the
    network's input size, preprocessed as at inference."""
    from edgekit.data.datasets import limit_samples
    from edgekit.data.preprocess import preprocess
    from edgekit.train.data import resize_masks

    samples = limit_samples(dataset.samples, images)

    def batches():
        for i in range(0, len(samples), batch):
            chunk = [s.load() for s in samples[i:i + batch]]
            if any(m is None for _, m in chunk):
                raise EdgekitError(f"{dataset.description}: taylor importance needs ground-truth masks")
            x = torch.from_numpy(preprocess([img for img, _ in chunk], spec))
            y = torch.stack([resize_masks(torch.from_numpy(m.astype("float32"))[None], spec.input_size,
                                                      spec.resize)[0]
                             for _, m in chunk])
            yield x, y

    yield from track(batches(), len(samples), "prune: taylor importance (loss gradients)",
                     count=lambda xy: len(xy[0]))


def prune_with_data(ck, ratio: float, data: Optional[str] = None, *, importance: str = "auto",
                    taylor_images: int = 32, bn_images: int = 200, val_limit: Optional[int] = None,
                    exact: bool = False):
    """What ``edgekit prune`` does before any fine-tuning: rank the channels (Taylor when ``data``
    is given, else magnitude), prune, recalibrate BatchNorm on ``data``'s train split and compare
    source and pruned model on its val split. Returns (pruned Checkpoint, PruneReport); the
    recalibration and the check are in the checkpoint's provenance.

    Unless ``exact``, the kept channel counts are rounded up to what every registered backend compiles
    (the registry's :func:`~edgekit.backends.registry.common_channel_multiple`), so a pruned model
    compiles for every target; the report's ``rounding`` (also in the provenance) says what changed
    and which backends asked for it."""
    from edgekit.backends.registry import common_channel_multiple
    from edgekit.data.datasets import limit_samples, open_segmentation
    from edgekit.train.losses import DeepSupervisionLoss

    train = val = None
    if data:
        train = open_segmentation(data, "train")  # an SD-900 folder: its train split
        val = open_segmentation(data, "val")
        val.samples = limit_samples(val.samples, val_limit)
    if importance == "auto":
        importance = "taylor" if train is not None else "magnitude"
    if importance == "taylor" and train is None:
        raise EdgekitError("--importance taylor needs training images: pass --data DIR")
    grads = taylor_batches(train, ck.preprocess, taylor_images) if importance == "taylor" else None
    bn = bn_batches(train, ck.preprocess, bn_images) if (train is not None and bn_images) else None
    multiple, required_by = (1, {}) if exact else common_channel_multiple()
    pruned, report = prune_checkpoint(ck, ratio, bn_batches=bn, bn_record={"data": train.description} if bn else None,
                                      importance=importance, grad_batches=grads, criterion=DeepSupervisionLoss(),
                                      channel_multiple=multiple)
    if report.rounding is not None:
        report.rounding = {**report.rounding, "required_by": required_by}
        pruned.provenance["prune"] = report.to_dict()
    if val is not None and any(s.mask_path is not None or s._mask is not None for s in val.samples):
        pruned.provenance["check"] = compare_on(ck, pruned, val)
    return pruned, report


def prune_and_finetune(ck, ratio: float, out: str | Path, *, data: Optional[str] = None, recipe=None,
                       importance: str = "auto", taylor_images: int = 32, bn_images: int = 200,
                       limit_images: Optional[int] = None, exact: bool = False, iterations: Optional[int] = None,
                       budget_s: Optional[float] = None, work_dir: Optional[str] = None,
                       note: Callable[[str], None] = print, log: Optional[Callable[[str], None]] = None) -> dict:
    """``edgekit prune``: prune ``ck`` (:func:`prune_with_data`), fine-tune the result with ``recipe``
    (a loaded :class:`~edgekit.train.recipe.Recipe`) when given, and save the checkpoint to ``out``.
    ``data`` defaults to the recipe's ``data.path``. Returns the result (the command's ``--json``).

    ``note`` gets the rounding notes (once the widths are known, before any fine-tuning), ``log`` the
    fine-tuning's lines. The fine-tuning runs in ``work_dir`` (kept: last.pt, best.pt, report.json) or in a
    temporary folder removed afterwards; the recipe's ``loss.distill`` > 0 distils from the unpruned model."""
    from edgekit.models.checkpoint import load_checkpoint

    data = data or (recipe.data_path() if recipe is not None else None)
    pruned, report = prune_with_data(ck, ratio, data, importance=importance, taylor_images=taylor_images,
                                     bn_images=bn_images, val_limit=limit_images, exact=exact)
    for line in rounding_notes(report):
        note(line)
    result = {"source": str(ck.path), "ratio": ratio, **{k: v for k, v in report.to_dict().items() if k != "ratio"},
              "bn_recalibration": pruned.provenance["bn_recalibration"]}
    if "check" in pruned.provenance:
        result["check"] = pruned.provenance["check"]
    out = Path(out)
    if recipe is None:
        pruned.save(out)
        result["out"] = str(out)
        return result
    from edgekit.train.loop import train

    keep = work_dir is not None
    run_dir = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="edgekit-prune-"))
    try:
        teacher = ck.build() if recipe.loss.distill > 0 else None  # the unpruned model
        res = train(recipe, data=data, out_dir=str(run_dir), iterations=iterations, limit_images=limit_images,
                    init=pruned, teacher=teacher, log=log, budget_s=budget_s)
        tuned = load_checkpoint(res.best)
        tuned.provenance = {**pruned.provenance, "finetune": tuned.provenance}
        tuned.save(out)
        result["finetune"] = {"recipe": recipe.name, "profile": recipe.profile, "iterations": res.iteration,
                              "distill": recipe.loss.distill, "budget": tuned.provenance["finetune"].get("budget"),
                              "best_iteration": res.best_iteration, "val_iou": res.best_val_iou,
                              "test": res.test["overall"], "wall_s": round(res.wall_s, 1),
                              "run": str(run_dir) if keep else None}
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    result["out"] = str(out)
    return result


def rounding_notes(report) -> list:
    """The ``note:`` lines for the rounding of the kept channel counts: one when it changed a width the
    ratio gives, one per note of :func:`~edgekit.compress.prune.plan_kept_channels`; none with ``--exact``."""
    r = report.rounding
    if r is None:
        return []
    lines = []
    who = ", ".join(f"{name} {m}" for name, m in r["required_by"].items())
    if r["widths_exact"] != report.widths_after or r["head_width_exact"] != r["head_width"]:
        lines.append(f"note: kept channel counts rounded up to multiples of {r['channel_multiple']} so that every "
                     f"target compiles them ({who}): widths {r['widths_exact']} -> {report.widths_after}, head width "
                     f"{r['head_width_exact']} -> {r['head_width']}; --exact keeps the ratio's widths")
    lines += [f"note: {n}" for n in r["notes"]]
    return lines


def compare_on(source, pruned, dataset) -> dict:
    """Source and pruned model on the same images (the pruning's verification)."""
    from edgekit.eval.evaluate import evaluate
    from edgekit.backends.torch_eager import TorchRunner

    a = evaluate(TorchRunner(source), dataset, desc="prune: check, source model")["overall"]
    b = evaluate(TorchRunner(pruned), dataset, desc="prune: check, pruned model")["overall"]
    return {"data": dataset.description, "images": len(dataset.samples),
            "source_iou": a["iou"], "pruned_iou": b["iou"], "source_mae": a["mae"], "pruned_mae": b["mae"]}
