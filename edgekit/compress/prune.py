"""Structured channel pruning of GMBINet with Torch-Pruning, the GMBI module as one pruning unit.

Torch-Pruning traces the network and groups every layer whose channels must go together (the
residual stream of a stage runs through its DownBlock, every GMBI module, the decoder's skip sums
and a side head). It cannot trace *into* a GMBI module: the cross-group gating
``sigmoid(y_i) * x_{i+1}`` ties channel ``c`` of group ``i`` to channel ``c`` of group ``i+1``,
which its index mapping does not know. So a GMBI module is registered as a customised layer:

* :class:`GMBIPruner` removes channels from its depthwise convs, their BNs, the 1x1 fusion conv
  (in and out) and its BN, and the residual, all at once (the module's input and output channel
  ``c`` are the same stream channel, so ``prune_in_channels is prune_out_channels``);
* it reports ``scales`` channel groups, so Torch-Pruning averages importance over the four groups
  and removes the same in-group positions from each: every group keeps the same size, and the
  gating chain still pairs channel ``c`` of one group with channel ``c`` of the next;
* :class:`GMBIAwareImportance` adds the GMBI weights (which Torch-Pruning's magnitude importance
  cannot see inside a customised layer) to the ranking.

The result is a plain GMBINet whose per-stage channel counts are its config's ``widths``: the
residual stream, the decoder sums and the GMBI groups tie all other channel counts to those five
numbers, so a pruned model is saved as an ordinary edgekit checkpoint and loads with
``torch.load(weights_only=True)`` (no pickled module).
"""
from __future__ import annotations

import contextlib
import copy
import math
import types
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.models.gmbinet import GMBI, GMBINet, GMBINetConfig
from edgekit.progress import stage

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - exercised by the missing-backend test
    tp = None


def _require_tp():
    if tp is None:
        raise MissingBackendError("edgekit prune", "torch-pruning", "prune")
    return tp


def _keep(n: int, idxs: Sequence[int]) -> List[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


def _take(p: torch.Tensor, keep: List[int], dim: int = 0) -> nn.Parameter | torch.Tensor:
    t = torch.index_select(p.data, dim, torch.as_tensor(keep, dtype=torch.long, device=p.device)).contiguous()
    return nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t


def _prune_bn(bn: nn.BatchNorm2d, keep: List[int]) -> None:
    bn.num_features = len(keep)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(bn, name, _take(getattr(bn, name), keep))
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(bn, name, _take(getattr(bn, name), keep))


def _prune_depthwise(conv: nn.Conv2d, keep: List[int]) -> None:
    conv.weight = _take(conv.weight, keep)
    if conv.bias is not None:
        conv.bias = _take(conv.bias, keep)
    conv.in_channels = conv.out_channels = conv.groups = len(keep)


def prune_gmbi(module: GMBI, idxs: Sequence[int]) -> GMBI:
    """Remove stream channels ``idxs`` from a GMBI module: the same count from every group."""
    sizes = module.split_sizes()
    total = sum(sizes)
    keep = _keep(total, idxs)
    per_group, start = [], 0
    for g in sizes:
        per_group.append([c - start for c in keep if start <= c < start + g])
        start += g
    if len({len(k) for k in per_group}) != 1 or not per_group[0]:
        raise EdgekitError(f"GMBI pruning would leave unequal or empty groups "
                           f"({', '.join(str(len(k)) for k in per_group)} channels); "
                           "prune the same number from every group")
    for conv_seq, k in zip(module.group_convs, per_group):
        _prune_depthwise(conv_seq[0], k)
        _prune_bn(conv_seq[1], k)
    fusion, fbn = module.fusion[0], module.fusion[1]
    fusion.weight = _take(_take(fusion.weight, keep, 0), keep, 1)
    if fusion.bias is not None:
        fusion.bias = _take(fusion.bias, keep)
    fusion.in_channels = fusion.out_channels = len(keep)
    _prune_bn(fbn, keep)
    return module


if tp is not None:
    class GMBIPruner(tp.pruner.BasePruningFunc):
        """Torch-Pruning handler for a whole GMBI module (registered as a customised layer)."""

        TARGET_MODULES = (GMBI,)

        def prune_out_channels(self, layer: GMBI, idxs: Sequence[int]) -> GMBI:
            return prune_gmbi(layer, idxs)

        prune_in_channels = prune_out_channels  # in and out are one stream channel (residual)

        def get_out_channels(self, layer: GMBI) -> int:
            return sum(layer.split_sizes())

        get_in_channels = get_out_channels

        def get_out_channel_groups(self, layer: GMBI) -> int:
            return layer.scales

        get_in_channel_groups = get_out_channel_groups

    class GMBIAwareImportance(tp.importance.GroupMagnitudeImportance):
        """Group L2 magnitude, plus the GMBI modules' own weights per stream channel.

        Torch-Pruning's importance only looks at conv/BN layers it traced; the layers inside a
        customised GMBI unit are invisible to it. Both parts are mean-normalised and added.
        """

        @torch.no_grad()
        def __call__(self, group):
            base = super().__call__(group)
            acc, seen = None, set()
            for i, (dep, idxs) in enumerate(group):
                layer = dep.layer
                if not isinstance(layer, GMBI) or id(layer) in seen:
                    continue
                seen.add(id(layer))
                local = gmbi_channel_importance(layer, self.p)[list(idxs)]
                root = group[i].root_idxs
                if acc is None:
                    n = len(base) if base is not None else self_len(group)
                    acc = torch.zeros(n, dtype=torch.float32)
                acc.scatter_add_(0, torch.as_tensor(root, dtype=torch.long), local.float())
            if acc is None:
                return base
            acc = acc / acc.mean().clamp_min(1e-12)
            return acc if base is None else base + acc
else:  # pragma: no cover
    GMBIPruner = GMBIAwareImportance = None


def self_len(group) -> int:
    """Channels of a group's root layer (the length an importance vector must have)."""
    return len(group[0][1])


def gmbi_channel_importance(m: GMBI, p: int = 2) -> torch.Tensor:
    """Per stream channel: |dw weights|^p + |dw BN gamma|^p + |fusion column and row|^p + |BN gamma|^p."""
    parts = []
    for conv_seq in m.group_convs:
        w = conv_seq[0].weight.detach().flatten(1).abs().pow(p).sum(1)
        parts.append(w + conv_seq[1].weight.detach().abs().pow(p))
    dw = torch.cat(parts)
    fw = m.fusion[0].weight.detach().flatten(1) if m.fusion[0].weight.dim() == 2 else m.fusion[0].weight.detach()[:, :, 0, 0]
    return dw + fw.abs().pow(p).sum(0) + fw.abs().pow(p).sum(1) + m.fusion[1].weight.detach().abs().pow(p)


class _OpaqueStream(torch.autograd.Function):
    """Identity with one autograd node: what a GMBI module looks like to the dependency tracer."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


@contextlib.contextmanager
def opaque_gmbi(model: nn.Module):
    """While tracing, run every GMBI module as one opaque same-shape op.

    Torch-Pruning skips the *layers* inside a customised module but still walks its functional
    ops (split, sigmoid, mul, cat), and its split/cat index mapping then fails. Seen from outside,
    a GMBI module maps stream channel c to stream channel c, which is all the tracer needs.
    """
    mods = [m for m in model.modules() if isinstance(m, GMBI)]
    for m in mods:
        m.forward = types.MethodType(lambda self, x: _OpaqueStream.apply(x), m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


# ----------------------------------------------------------------------------------------------

@dataclass
class PruneReport:
    ratio: float
    widths_before: List[int]
    widths_after: List[int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    importance: str = "magnitude"
    # None: the widths the ratio gives (exact); else how they were rounded to a channel multiple
    # (see plan_kept_channels): {"channel_multiple", "widths_exact", "head_width_exact", "head_width", "notes"}
    rounding: Optional[dict] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def widths_of(model: GMBINet) -> List[int]:
    """The five stage widths, read off the weights (not the config) of a possibly pruned model."""
    w = [model.encoder1[0].out_channels]
    for s in range(2, 6):
        w.append(getattr(model, f"encoder{s}")[0].conv[3].out_channels)
    return w


def _prunable_copy(model: GMBINet) -> GMBINet:
    """A copy without the published model's unused extras (never called, so never traced)."""
    cfg = GMBINetConfig.from_dict({**model.config.to_dict(), "upstream_extras": False})
    m = GMBINet(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k in m.state_dict()}
    m.load_state_dict(sd, strict=True)
    return m


IMPORTANCES = ("magnitude", "magnitude-gmbi", "taylor")


def kept_per_group(group_size: int, ratio: float) -> int:
    """Channels of one channel group that Torch-Pruning's local pruning keeps at ``ratio``:
    ``int(group_size * (1 - ratio))`` (``MetaPruner``: ``n_pruned = n - int(n * (1 - ratio))``)."""
    return int(group_size * (1 - ratio))


def plan_kept_channels(channels: int, groups: int, ratio: float, multiple: int) -> tuple[int, int, Optional[str]]:
    """(exact, kept, note) for a dependency group of ``channels`` channels split into ``groups`` equal
    channel groups (4 for a GMBI stage, 1 otherwise) pruned at ``ratio``.

    ``exact`` is what the ratio alone keeps; ``kept`` is the smallest count >= ``exact`` that is both a
    multiple of ``groups`` (every group keeps the same number) and of ``multiple`` (what every backend
    compiles), so the number *removed* is rounded down. Only when the source width has no such count
    at or above ``exact`` (the source itself is not a multiple) is ``kept`` the largest one below it,
    said in ``note``; when there is none at all, one error line."""
    size = channels // groups
    k_exact = kept_per_group(size, ratio)
    step = multiple // math.gcd(multiple, groups)  # kept = groups * k is a multiple of ``multiple`` iff step | k
    k = max(step, -(-k_exact // step) * step)
    note = None
    if k > size:
        k = (size // step) * step
        if k == 0:
            raise EdgekitError(f"{channels} channels cannot keep a multiple of {multiple} "
                               f"(what every registered backend compiles); prune with --exact")
        note = (f"{channels} channels are not a multiple of {multiple}: kept {groups * k}, "
                f"{groups * (k_exact - k)} fewer than the ratio gives")
    return groups * k_exact, groups * k, note


def _pruning_groups(pruner):
    """The dependency groups ``pruner`` prunes (as ``MetaPruner._prune`` enumerates them)."""
    return [g for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                 root_module_types=pruner.root_module_types)
            if pruner._check_pruning_ratio(g)]


def _group_of(pruner, groups, module):
    """The group among ``groups`` that prunes ``module``'s output channels (each output channel
    count belongs to exactly one group)."""
    for g in groups:
        if any(dep.target.module is module and pruner.DG.is_out_channel_pruning_fn(dep.handler) for dep, _ in g):
            return g
    return None


def _channel_count_modules(model: GMBINet) -> List[tuple]:
    """(label, module) for every free channel count of a GMBINet: the layer whose output channels are
    stage s's width (as :func:`widths_of` reads them), and DF1's output (the head width)."""
    mods = [("stage 1", model.encoder1[0])]
    mods += [(f"stage {s}", getattr(model, f"encoder{s}")[0].conv[3]) for s in range(2, 6)]
    return mods + [("head", model.DF1.conv[3])]


def _round_groups(pruner, model: GMBINet, ratio: float, multiple: int) -> tuple[dict, dict]:
    """(rounding record, Torch-Pruning ``pruning_ratio_dict``) that make every dependency group keep
    its :func:`plan_kept_channels` count instead of the ratio's.

    Each group gets its own ratio, keyed by its root layer (a local scope of its own): one that makes
    ``int(size * (1 - r))`` land half a channel above the planned per-group count, so float rounding
    cannot truncate it to one less. The ranking inside each group is unchanged."""
    groups = _pruning_groups(pruner)
    counted = []
    for label, mod in _channel_count_modules(model):
        g = _group_of(pruner, groups, mod)
        if g is None:
            raise RuntimeError(f"no Torch-Pruning group prunes the {label} channels")
        counted.append((label, g))
    labels = {id(g): label for label, g in counted}
    planned, ratio_dict = {}, {}
    for g in groups:
        root = g[0].dep.target.module
        n = pruner.DG.get_out_channels(root)
        ch_groups = pruner._get_channel_groups(g)
        try:
            exact, kept, note = plan_kept_channels(n, ch_groups, ratio, multiple)
        except EdgekitError as e:
            raise EdgekitError(f"{labels.get(id(g), 'a dependency group')}: {e}") from None
        size, k = n // ch_groups, kept // ch_groups
        ratio_dict[root] = 0.0 if k == size else (size - k - 0.5) / size
        planned[id(g)] = (exact, kept, note)
    exact_w, kept_w, notes = [], [], []
    for label, g in counted:
        exact, kept, note = planned[id(g)]
        exact_w.append(exact)
        kept_w.append(kept)
        if note:
            notes.append(f"{label}: {note}")
    record = {"channel_multiple": multiple, "widths_exact": exact_w[:5], "head_width_exact": exact_w[5],
              "head_width": kept_w[5], "notes": notes, "planned": kept_w[:5]}
    return record, ratio_dict


def prune_gmbinet(model: GMBINet, ratio: float, *, example_size: int = 64, macs_size: int = 512,
                  importance: str = "magnitude", grad_batches=None, criterion=None,
                  channel_multiple: Optional[int] = None) -> tuple[GMBINet, PruneReport]:
    """Structured-prune ``ratio`` of the channels of every stage (same ratio per stage).

    ``importance``: ``magnitude`` (group L2 norm of the traced layers' weights), ``magnitude-gmbi``
    (plus the weights inside the GMBI units) or ``taylor`` (first-order Taylor, |w * dL/dw|, with
    the gradients of ``criterion``, the training loss, over ``grad_batches``: (images, masks) pairs).

    ``channel_multiple``: every kept channel count (the stage widths and the head width) is rounded to
    a multiple of it, removing fewer channels than the ratio gives where needed (:func:`plan_kept_channels`);
    the report's ``rounding`` says what changed. None or 1: the ratio's widths, exactly.

    Returns a fresh :class:`GMBINet` built from the pruned widths with the pruned weights loaded
    strictly (which proves the config describes the pruned network completely) and a report.
    """
    _require_tp()
    if not 0.0 <= ratio < 1.0:
        raise EdgekitError(f"--ratio must be in [0, 1), got {ratio}")
    from edgekit.models.summary import count_macs

    src = _prunable_copy(model).eval()
    size = (1, src.config.in_channels, example_size, example_size)
    macs_before = count_macs(src, (1, src.config.in_channels, macs_size, macs_size))["macs"]
    params_before = src.inference_parameter_count()
    widths_before = widths_of(src)

    work = copy.deepcopy(src)
    rounding = None
    work.all_heads = True  # trace the side heads too: they consume stage channels
    if importance not in IMPORTANCES:
        raise EdgekitError(f"unknown importance {importance!r} (choose: {', '.join(IMPORTANCES)})")
    if ratio > 0:
        heads = [getattr(work, f"conv_out{i}")[1] for i in range(1, 6)]
        ignored = heads  # their one output channel is the prediction
        if importance == "taylor":
            if grad_batches is None or criterion is None:
                raise EdgekitError("taylor importance needs training images (--data)")
            _accumulate_loss_gradients(work, grad_batches, criterion)
            imp = tp.importance.GroupTaylorImportance()
        elif importance == "magnitude-gmbi":
            imp = GMBIAwareImportance(p=2)
        else:
            imp = tp.importance.GroupMagnitudeImportance(p=2)

        def make_pruner(ratio_dict=None):
            return tp.pruner.MetaPruner(
                work, torch.randn(size), importance=imp, pruning_ratio=ratio, ignored_layers=ignored,
                customized_pruners={GMBI: GMBIPruner()}, pruning_ratio_dict=ratio_dict, global_pruning=False)

        with opaque_gmbi(work), stage(f"prune: removing {ratio:g} of every stage's channels ({importance} ranking, "
                                      "Torch-Pruning)"):
            pruner = make_pruner()
            if channel_multiple and channel_multiple > 1:
                rounding, ratio_dict = _round_groups(pruner, work, ratio, int(channel_multiple))
                pruner = make_pruner(ratio_dict)  # the same groups, each with the ratio that keeps its rounded count
            pruner.step()
    work.all_heads = None
    work.zero_grad(set_to_none=True)
    widths = widths_of(work)
    if rounding is not None:
        planned = rounding.pop("planned")
        if (widths, work.DF1.conv[3].out_channels) != (planned, rounding["head_width"]):  # the per-group ratios missed
            raise RuntimeError(f"pruning kept widths {widths} (head {work.DF1.conv[3].out_channels}), not the planned "
                               f"{planned} (head {rounding['head_width']})")
    for s, w in enumerate(widths[1:], start=2):
        for m in getattr(work, f"encoder{s}")[1:]:
            if len(set(m.split_sizes())) != 1 or sum(m.split_sizes()) != w:
                raise EdgekitError(f"pruning left stage {s} inconsistent: groups {m.split_sizes()} vs width {w}")
    head_width = work.DF1.conv[3].out_channels
    cfg = GMBINetConfig.from_dict({**src.config.to_dict(), "widths": widths,
                                   "head_width": None if head_width == widths[0] else head_width})
    out = GMBINet(cfg)
    out.load_state_dict(work.state_dict(), strict=True)  # every key and shape: the config says it all
    out.eval()
    report = PruneReport(ratio=ratio, widths_before=widths_before, widths_after=widths,
                         params_before=params_before, params_after=out.inference_parameter_count(),
                         macs_before=macs_before, macs_after=count_macs(out, (1, src.config.in_channels, macs_size, macs_size))["macs"],
                         importance=importance, rounding=rounding)
    return out, report


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running mean/variance of every BatchNorm the eval-mode forward pass reaches,
    from ``batches`` (forward passes only, no weight changes); returns the number of images seen.

    Why: pruning removes inputs of the layers that follow, so the statistics the BNs stored
    describe activations that no longer exist ("adaptive BN", Li et al., EagleEye, ECCV 2020).
    Measured on the published checkpoint (magnitude + GMBI-weight ranking, RESULTS.md 6b): val IoU
    of the one-shot pruned model 0.00 -> 0.39 at ratio 0.25 and 0.08 -> 0.71 at 0.125. BNs the forward pass does not
    reach (the training-only side heads) keep their statistics, as do all of them on an error.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training, {k: v.clone() for k, v in m.named_buffers()}) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches, not an exponential one
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += int(x.shape[0])
        if not seen:
            raise EdgekitError("BatchNorm recalibration: no images")
    except BaseException:
        for m, (_, _, bufs) in zip(bns, saved):
            for k, v in bufs.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, (momentum, training, _) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    for m, (_, _, bufs) in zip(bns, saved):
        if int(m.num_batches_tracked) == 0:  # not reached: keep what it had
            for k, v in bufs.items():
                getattr(m, k).copy_(v)
    return seen


def _accumulate_loss_gradients(model: GMBINet, batches, criterion) -> None:
    """Gradients of ``criterion`` (the training loss: deep supervision over all heads) summed over
    ``batches``, in eval mode (stored BN statistics, no dropout: the ranking is deterministic)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        criterion(model(x), y).backward()
        seen += int(x.shape[0])
    if not seen:
        raise EdgekitError("taylor importance: no training images")


def prune_checkpoint(ck, ratio: float, bn_batches=None, bn_record=None, **kw):
    """A pruned edgekit :class:`~edgekit.models.checkpoint.Checkpoint` of ``ck`` (not fine-tuned).

    ``bn_batches`` (preprocessed image batches): recalibrate the pruned model's BatchNorm statistics
    on them (see :func:`recalibrate_batchnorm`); ``bn_record`` says what they were, for the provenance."""
    from edgekit.models.checkpoint import Checkpoint

    if ck.model_name != "gmbinet":
        raise EdgekitError(f"edgekit prune handles GMBINet checkpoints, not {ck.model_name!r}")
    pruned, report = prune_gmbinet(ck.build(), ratio, **kw)
    bn = None
    if bn_batches is not None and ratio > 0:
        bn = {**(bn_record or {}), "images": recalibrate_batchnorm(pruned, bn_batches)}
    provenance = {
        "source": "edgekit prune", "pruned_from": str(ck.path) if ck.path else None,
        "pruned_from_sha256": ck.sha256 or None, "prune": report.to_dict(), "bn_recalibration": bn,
        "parent_provenance": ck.provenance or None,
    }
    return Checkpoint.from_model(pruned, preprocess=ck.preprocess, classes=list(ck.classes),
                                 provenance=provenance, metrics={}), report
