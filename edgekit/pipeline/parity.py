"""Comparing a transformed model with its source on real images (kept apart from loaders/runners).

Parity is a gate, not only a record: it fails closed. A NaN or Inf anywhere (a reference activation,
the reference output, the candidate output) refuses the build, naming the side and, on the PyTorch
side, the first layer that produced it; and a float candidate must stay within its precision's
budget (``PARITY_BUDGETS``). A NaN compares false with everything, so before these checks one NaN
probability recorded "max |diff| 0.0, mask IoU 1.0".
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np

from edgekit.data.datasets import SegDataset, limit_samples
from edgekit.data.preprocess import preprocess
from edgekit.errors import EdgekitError
from edgekit.backends.base import Runner
from edgekit.progress import track

# Budgets per candidate precision, from benchmarks/parity_budget.py on 64 SD-900 test images with the
# published checkpoint (benchmarks/out/parity_budget.json; "decisive" as defined below):
#   fp32 (onnx, ort, openvino, executorch, cpu-fused): max |diff| 3.5e-5..4.5e-5, mean |diff| <= 1.9e-8,
#        mask agreement 1.0 on every image (decisive too);
#   fp16 (openvino fp16; PyTorch in float16): max |diff| 0.11-0.12, mean |diff| 3.0e-5-5.4e-5, mask
#        agreement 0.9995-0.9996 (worst image 0.9964), decisive 0.9999-1.0 (worst image 0.9988);
#   bf16 (openvino bf16; PyTorch in bfloat16): max |diff| 0.46-0.75, mean |diff| 2.2e-4-7.1e-4, mask
#        agreement 0.992-0.998 (worst image 0.976), decisive 0.994-0.999 (worst image 0.981).
# Headroom: fp32 22x on max |diff|, 500x on mean; fp16 3x on max, 18x on mean, >= 25x on decisive
# disagreement; bf16 14x on mean, 3.4x on decisive disagreement (mean and worst image).
# Masks are compared on *decisive* pixels: those whose reference probability is at least
# ``decision_margin`` away from the threshold. A pixel at 0.5 +- 0.001 has no decision a reduced
# precision could keep (a random-weight test model sits there everywhere: bf16 flipped 57 % of its
# "mask" while its mean |diff| was 5e-4). For fp32 the margin is the max |diff| budget itself, so
# there the difference budgets are the gate. A bf16 probability near a steep logit moves by up to
# 0.75 on one pixel, so its max |diff| is not gated; its mean and its masks are.
# INT8 is held to --max-drop on --val instead (non-finite values are refused at every precision).
PARITY_BUDGETS = {
    "fp32": {"max_abs_diff": 1e-3, "mean_abs_diff": 1e-5, "decision_margin": 1e-3,
             "decisive_mask_agreement": 0.999, "min_decisive_mask_agreement": 0.99},
    "fp16": {"max_abs_diff": 0.35, "mean_abs_diff": 1e-3, "decision_margin": 0.02,
             "decisive_mask_agreement": 0.995, "min_decisive_mask_agreement": 0.97},
    "bf16": {"max_abs_diff": None, "mean_abs_diff": 0.01, "decision_margin": 0.05,
             "decisive_mask_agreement": 0.98, "min_decisive_mask_agreement": 0.93},
}
PARITY_BUDGETS["default"] = PARITY_BUDGETS["bf16"]  # OpenVINO's default may run bf16 (AMX CPUs)


def _nonfinite_kind(a: np.ndarray) -> Optional[str]:
    nan = int(np.isnan(a).sum())
    inf = int(np.isinf(a).sum())
    if not (nan or inf):
        return None
    return " and ".join(w for w, c in (("NaN", nan), ("Inf", inf)) if c) + f" ({nan + inf:,} of {a.size:,} values)"


@contextlib.contextmanager
def first_nonfinite_layer(model):
    """While active, records in the yielded dict (key ``"layer"``) the name of the first module, in
    execution order, whose output holds a NaN or Inf. Forward hooks only: the model is unchanged."""
    import torch

    found: dict = {}
    handles = []

    def hook(name):
        def check(_module, _inputs, out):
            if "layer" in found:
                return
            for t in (out if isinstance(out, (list, tuple)) else (out,)):
                # A finite sum proves every element finite (a NaN or Inf makes the sum NaN or Inf), at a
                # twentieth of isfinite().all()'s cost on the CPU; a non-finite sum (possibly overflow
                # of large finite values) gets the exact check.
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.sum())) \
                        and not bool(torch.isfinite(t).all()):
                    found["layer"] = f"{name} ({type(_module).__name__})"
                    found["kind"] = _nonfinite_kind(t.detach().float().cpu().numpy())
                    return
        return check

    # Leaves only (convolutions, BatchNorms, activations, ...): a container's output is its last
    # leaf's, or a functional op's whose NaN reaches the next leaf; and hooks on every container
    # doubled the reference's time.
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            handles.append(m.register_forward_hook(hook(name or "model")))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def parity(reference: Runner, candidate: Runner, dataset: SegDataset, limit: int = 16, threshold: float = 0.5,
           budget: Optional[dict] = None) -> dict:
    """Max/mean absolute difference of probabilities and mean IoU of the two thresholded masks,
    at the network's output resolution, image by image. Refuses (``EdgekitError``) a non-finite
    value on either side and a result outside ``budget`` (keys as in ``PARITY_BUDGETS``)."""
    import torch.nn as nn

    max_abs, mean_abs, agree, decisive = 0.0, [], [], []
    margin = (budget or {}).get("decision_margin", 0.0)
    samples = limit_samples(dataset.samples, limit)  # every class, not the first class only
    model = getattr(reference, "model", None)
    watch = first_nonfinite_layer(model) if isinstance(model, nn.Module) else contextlib.nullcontext({})
    with watch as found:
        for s in track(samples, len(samples), f"parity: {_label(candidate)} vs the source model"):
            x = preprocess([s.image()], reference.spec)
            a = reference.infer(x)[0, 0]
            bad = _nonfinite_kind(a)
            if found.get("layer") or bad:
                where = f"; first at layer {found['layer']}: {found['kind']}" if found.get("layer") else ""
                raise EdgekitError(f"parity: the reference ({reference.describe()}) gives non-finite values on "
                                   f"{s.name}{where}{'' if where else ': ' + str(bad)}; nothing written")
            b = candidate.infer(x)[0, 0]
            bad = _nonfinite_kind(b)
            if bad:
                raise EdgekitError(f"parity: the candidate ({candidate.name} {candidate.precision}) output holds {bad} on {s.name} "
                                   f"(the reference's is finite); nothing written")
            d = np.abs(a.astype(np.float64) - b)
            max_abs = max(max_abs, float(d.max()))
            mean_abs.append(float(d.mean()))
            ma, mb = a >= threshold, b >= threshold
            agree.append(_iou(ma, mb))
            sure = np.abs(a - threshold) >= margin
            decisive.append(_iou(ma & sure, mb & sure))
    if not samples:
        raise EdgekitError(f"parity: {dataset.description} has no images to compare on")
    result = {"images": len(samples), "data": dataset.description, "reference": reference.describe(),
              "input_size": list(reference.spec.input_size),  # what both ran at (compile --input-size)
              "max_abs_diff": max_abs, "mean_abs_diff": float(np.mean(mean_abs)),
              "mask_iou_agreement": float(np.mean(agree)), "min_mask_iou_agreement": float(np.min(agree))}
    if budget is not None:
        result.update(decision_margin=margin, decisive_mask_agreement=float(np.mean(decisive)),
                      min_decisive_mask_agreement=float(np.min(decisive)))
        check_budget(result, budget, f"{candidate.name} {candidate.precision}")
        result["budget"] = dict(budget)
    return result


def _label(runner) -> str:
    """``target precision`` of a runner, for a progress bar (a runner without them: its class name)."""
    parts = [getattr(runner, k, None) for k in ("name", "precision")]
    return " ".join(str(p) for p in parts if p) or type(runner).__name__


def _iou(ma: np.ndarray, mb: np.ndarray) -> float:
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0


def check_budget(result: dict, budget: dict, what: str) -> None:
    """Refuse, in one line, the first figure of ``result`` outside ``budget``."""
    for key, limit in budget.items():
        if limit is None or key == "decision_margin":
            continue
        value = result[key]
        higher_is_better = "agreement" in key
        if (value < limit) if higher_is_better else (value > limit):
            op = ">=" if higher_is_better else "<="
            raise EdgekitError(f"parity: {what} misses the budget: {key.replace('_', ' ')} {value:.3g} (needs {op} "
                               f"{limit:g}) on {result['images']} images of {result['data']}; nothing written")
