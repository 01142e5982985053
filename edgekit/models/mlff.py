"""MLFF: multi-level feature fusion adapters on a frozen backbone, for continual learning.

The backbone (``edgekit.models.backbones``) gives feature maps at several depths; each is pooled to a
vector (max-pool shallow, average-pool deep). The adapter projects each vector (Linear + BN1d + ReLU
to ``fc_dim // levels``), concatenates, fuses (Linear + BN1d + ReLU to ``fc_dim``) and classifies with
one head (class-incremental: one growing head over all classes) or one head per task
(task-incremental). Only the adapter trains.

``load_mlff(registry)`` gives an ``MLFFClassifier`` that runs backbone + adapter on images.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from edgekit.errors import EdgekitError
# the config's bounds, torch-free (a station checks adapters with them too, edgekit.models.mlff_spec)
from edgekit.models.mlff_spec import ADAPTER_LIMITS, check_adapter_config  # noqa: F401

SETTINGS = ("class-incremental", "task-incremental")


class MLFFAdapter(nn.Module):
    """Input: the backbone's pooled taps concatenated (``N x sum(tap_dims)``)."""

    def __init__(self, tap_dims: Sequence[int], fc_dim: int = 160, head_sizes: Sequence[int] = ()):
        super().__init__()
        self.tap_dims = [int(d) for d in tap_dims]
        levels = len(self.tap_dims)
        if fc_dim < levels:
            raise EdgekitError(f"fc_dim {fc_dim} is smaller than the {levels} levels")
        self.fc_dim = int(fc_dim)
        per = self.fc_dim // levels
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(d, per), nn.BatchNorm1d(per), nn.ReLU(inplace=True)) for d in self.tap_dims)
        self.fuse = nn.Sequential(nn.Linear(per * levels, self.fc_dim), nn.BatchNorm1d(self.fc_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(self.fc_dim, int(n)) for n in head_sizes)

    @property
    def head_sizes(self) -> List[int]:
        return [h.out_features for h in self.heads]

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        parts = torch.split(feats, self.tap_dims, dim=1)
        return self.fuse(torch.cat([p(x) for p, x in zip(self.proj, parts)], dim=1))

    def forward(self, feats: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
        z = self.embed(feats)
        return self.heads[-1 if head is None else head](z)

    def add_head(self, n: int) -> None:
        self.heads.append(nn.Linear(self.fc_dim, int(n)))

    def grow_head(self, n_new: int, head: int = 0) -> None:
        """Add ``n_new`` outputs to a head, keeping the old rows (old classes) as they are."""
        old = self.heads[head]
        new = nn.Linear(self.fc_dim, old.out_features + int(n_new))
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.heads[head] = new

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def check_adapter_tensors(tensors: Dict[str, torch.Tensor], config: dict) -> None:
    """The adapter's tensors against its config, before a real module is built: structure and
    dtypes (``check_tensors``), every expected key at the exact shape the config implies (on the
    meta device), and finite values, naming the first tensor that is not."""
    from edgekit.models.checkpoint import check_tensors, nonfinite_report, state_dict_diff

    tap_dims, fc_dim, heads = check_adapter_config(config)
    check_tensors(dict(tensors))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MLFFAdapter(tap_dims, fc_dim, heads).state_dict().items()}
    diff = state_dict_diff(expected, tensors)
    if diff:
        raise EdgekitError(f"adapter weights do not match its config; {diff}")
    bad = nonfinite_report(tensors)
    if bad:
        raise EdgekitError(f"adapter weight {bad}")


def adapter_from_tensors(tensors: Dict[str, torch.Tensor], config: dict) -> MLFFAdapter:
    """The PyTorch adapter from its weights (torch tensors, or the numpy arrays ``load_adapter_arrays`` gives)."""
    import numpy as np

    tensors = {k: torch.from_numpy(np.asarray(v, order="C")) if isinstance(v, np.ndarray) else v
               for k, v in tensors.items()}
    check_adapter_tensors(tensors, config)
    ad = MLFFAdapter(config["tap_dims"], config["fc_dim"], config["head_sizes"])
    try:
        ad.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise EdgekitError(f"adapter weights do not match its config ({str(e).splitlines()[0][:160]})") from None
    return ad.eval()
