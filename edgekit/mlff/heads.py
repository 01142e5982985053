"""MLFF adapter heads in numpy: the forward of ``edgekit.models.mlff.MLFFAdapter`` (eval mode) from the
adapter's safetensors weights, so a station without torch classifies and health-checks on a compiled backbone.

The adapter is small (per tap: Linear + BatchNorm1d + ReLU; the fusion Linear + BatchNorm1d + ReLU; one
Linear per head): float32 matrix products, BatchNorm with its running statistics, as PyTorch computes
them in eval mode. ``tests/test_mlff_heads.py`` holds them to the PyTorch heads on real NEU images.
"""
from __future__ import annotations

from typing import List, Mapping, Optional

import numpy as np

from edgekit.models.mlff_spec import BN_EPS, check_adapter_arrays


class NumpyAdapter:
    """``embed(feats)`` and ``head_logits(feats)`` of an MLFF adapter; ``feats`` is the backbone's pooled taps
    concatenated (``N x sum(tap_dims)``), float32."""

    def __init__(self, arrays: Mapping[str, np.ndarray], config: dict):
        self.tap_dims, self.fc_dim, self.head_sizes = check_adapter_arrays(arrays, config)
        f32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items() if v.dtype.kind == "f"}

        def block(prefix: str):
            w, b = f32[f"{prefix}.0.weight"], f32[f"{prefix}.0.bias"]
            mean, var = f32[f"{prefix}.1.running_mean"], f32[f"{prefix}.1.running_var"]
            gamma, beta = f32[f"{prefix}.1.weight"], f32[f"{prefix}.1.bias"]
            inv_std = (np.float32(1) / np.sqrt(var + np.float32(BN_EPS))).astype(np.float32)
            return np.ascontiguousarray(w.T), b, mean, inv_std * gamma, beta

        self.proj = [block(f"proj.{i}") for i in range(len(self.tap_dims))]
        self.fuse = block("fuse")
        self.heads = [(np.ascontiguousarray(f32[f"heads.{h}.weight"].T), f32[f"heads.{h}.bias"])
                      for h in range(len(self.head_sizes))]

    def eval(self) -> "NumpyAdapter":  # the interface of the PyTorch module, which MLFFClassifier calls
        return self

    @staticmethod
    def _block(x: np.ndarray, p) -> np.ndarray:
        wt, b, mean, scale, beta = p
        y = x @ wt + b
        return np.maximum((y - mean) * scale + beta, np.float32(0))

    def embed(self, feats: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(feats, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != sum(self.tap_dims):
            raise ValueError(f"adapter input is {list(x.shape)}, expected N x {sum(self.tap_dims)} pooled features")
        parts = np.split(x, np.cumsum(self.tap_dims)[:-1], axis=1)
        with np.errstate(over="ignore", invalid="ignore"):  # as PyTorch: inf/NaN flow through, callers check outputs
            return self._block(np.concatenate([self._block(p, w) for p, w in zip(parts, self.proj)], axis=1),
                               self.fuse)

    def head_logits(self, feats: np.ndarray, z: Optional[np.ndarray] = None) -> List[np.ndarray]:
        """Logits of every head (a list of ``N x head_size`` float32 arrays)."""
        z = self.embed(feats) if z is None else z
        with np.errstate(over="ignore", invalid="ignore"):
            return [(z @ wt + b).astype(np.float32, copy=False) for wt, b in self.heads]


def head_logits(adapter, feats) -> List[np.ndarray]:
    """Logits of every head as numpy arrays, for a ``NumpyAdapter`` or the PyTorch ``MLFFAdapter`` (torch is
    imported only for the latter); ``feats`` a numpy array or a CPU tensor."""
    if hasattr(feats, "detach"):
        feats = feats.detach().float().cpu().numpy()
    if isinstance(adapter, NumpyAdapter):
        return adapter.head_logits(feats)
    import torch

    with torch.inference_mode():
        z = adapter.embed(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)))
        return [h(z).float().numpy() for h in adapter.heads]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
