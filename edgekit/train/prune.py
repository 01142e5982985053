"""The data-driven steps of ``edgekit prune``: channel ranking from the training loss (Taylor),
BatchNorm recalibration on training images, and the source-vs-pruned check on the val split.

The pruning itself (Torch-Pruning, GMBI as one unit) is ``edgekit.compress.prune``; this module
feeds it real images and the training loss, which is why it lives with training.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from edgekit.compress.prune import prune_checkpoint, recalibrate_batchnorm
from edgekit.errors import EdgekitError


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
    for i in range(0, len(samples), batch):
        yield torch.from_numpy(preprocess([s.image() for s in samples[i:i + batch]], spec))


def taylor_batches(dataset, spec, images: int, batch: int = 8):
    """(images, masks) batches of ``images`` samples of ``dataset`` (across its classes), at the
    network's input size, preprocessed as at inference."""
    from edgekit.data.datasets import limit_samples
    from edgekit.data.preprocess import preprocess
    from edgekit.train.data import resize_masks

    samples = limit_samples(dataset.samples, images)
    for i in range(0, len(samples), batch):
        chunk = [s.load() for s in samples[i:i + batch]]
        if any(m is None for _, m in chunk):
            raise EdgekitError(f"{dataset.description}: taylor importance needs ground-truth masks")
        x = torch.from_numpy(preprocess([img for img, _ in chunk], spec))
        y = torch.stack([resize_masks(torch.from_numpy(m.astype("float32"))[None], spec.input_size,
                                      spec.resize)[0]
                         for _, m in chunk])
        yield x, y


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


def compare_on(source, pruned, dataset) -> dict:
    """Source and pruned model on the same images (the pruning's verification)."""
    from edgekit.eval.evaluate import evaluate
    from edgekit.backends.torch_eager import TorchRunner

    a = evaluate(TorchRunner(source), dataset, show_progress=False)["overall"]
    b = evaluate(TorchRunner(pruned), dataset, show_progress=False)["overall"]
    return {"data": dataset.description, "images": len(dataset.samples),
            "source_iou": a["iou"], "pruned_iou": b["iou"], "source_mae": a["mae"], "pruned_mae": b["mae"]}
