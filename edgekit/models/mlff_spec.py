"""An MLFF adapter's config and weights, checked without torch: the bounds on a config read from a file, the
exact tensor shapes a config implies, and the checks of loaded weight arrays (numpy) against them.

``edgekit.models.mlff`` (the PyTorch module) uses the same bounds; a station, which has no torch, checks an
adapter with ``check_adapter_arrays`` before ``edgekit.mlff.heads.NumpyAdapter`` runs it.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from edgekit.errors import EdgekitError

# Bounds on an adapter config read from a file (inclusive): ResNet-50's deepest tap has 2,048
# channels, EfficientNet-Lite0's head 1,280; the default fc_dim is 160.
ADAPTER_LIMITS = {"levels": 16, "tap_dim": 8192, "fc_dim": 16384, "heads": 1024, "head_size": 100_000}
BN_EPS = 1e-5  # torch.nn.BatchNorm1d's default, which MLFFAdapter uses
MAX_VALUES = 64 << 20  # as edgekit.models.checkpoint.MAX_VALUES


def _ints(name: str, values, lo: int, hi: int, most: int) -> List[int]:
    if not isinstance(values, (list, tuple)) or len(values) > most:
        raise EdgekitError(f"adapter config: {name} must be a list of at most {most} integers")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise EdgekitError(f"adapter config: {name} holds {v!r}, not an integer in {lo}..{hi}"[:200])
        out.append(int(v))
    return out


def check_adapter_config(config) -> tuple:
    """``(tap_dims, fc_dim, head_sizes)`` of an adapter config, each within ``ADAPTER_LIMITS``: checked
    before any layer is sized from them (an fc_dim of 10^9 would allocate 8 GB per layer)."""
    if not isinstance(config, dict):
        raise EdgekitError("adapter config must be an object")
    try:
        tap_dims = _ints("tap_dims", config["tap_dims"], 1, ADAPTER_LIMITS["tap_dim"], ADAPTER_LIMITS["levels"])
        fc_dim = _ints("fc_dim", [config["fc_dim"]], 1, ADAPTER_LIMITS["fc_dim"], 1)[0]
        heads = _ints("head_sizes", config["head_sizes"], 1, ADAPTER_LIMITS["head_size"], ADAPTER_LIMITS["heads"])
    except KeyError as e:
        raise EdgekitError(f"adapter config lacks {e.args[0]!r}") from None
    if not tap_dims:
        raise EdgekitError("adapter config: tap_dims is empty")
    return tap_dims, fc_dim, heads


def adapter_shapes(tap_dims, fc_dim: int, head_sizes) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of ``MLFFAdapter(tap_dims, fc_dim, head_sizes).state_dict()`` and its shape, in that order
    (per tap: Linear + BatchNorm1d to ``fc_dim // levels``; the fusion Linear + BatchNorm1d; one Linear per
    head). tests/test_mlff_heads.py checks it against the PyTorch module's state_dict."""
    levels = len(tap_dims)
    if fc_dim < levels:
        raise EdgekitError(f"fc_dim {fc_dim} is smaller than the {levels} levels")
    per = fc_dim // levels

    def block(prefix: str, n_in: int, n_out: int) -> Dict[str, Tuple[int, ...]]:
        bn = {f"{prefix}.1.{k}": (n_out,) for k in ("weight", "bias", "running_mean", "running_var")}
        return {f"{prefix}.0.weight": (n_out, n_in), f"{prefix}.0.bias": (n_out,), **bn,
                f"{prefix}.1.num_batches_tracked": ()}

    shapes: Dict[str, Tuple[int, ...]] = {}
    for i, d in enumerate(tap_dims):
        shapes.update(block(f"proj.{i}", int(d), per))
    shapes.update(block("fuse", per * levels, int(fc_dim)))
    for h, n in enumerate(head_sizes):
        shapes.update({f"heads.{h}.weight": (int(n), int(fc_dim)), f"heads.{h}.bias": (int(n),)})
    return shapes


def shape_diff(own: Mapping[str, tuple], arrays: Mapping[str, object]) -> Optional[str]:
    """The keys that differ between the expected shapes and ``arrays`` (anything with ``.shape``), in one
    phrase: the wording of ``edgekit.models.checkpoint.state_dict_diff``."""
    missing = [k for k in own if k not in arrays]
    unexpected = [k for k in arrays if k not in own]
    shape = [k for k in own if k in arrays and tuple(own[k]) != tuple(arrays[k].shape)]
    if not (missing or unexpected or shape):
        return None
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            if label == "wrong shape":
                keys = [f"{k} {list(arrays[k].shape)}, config implies {list(own[k])}" for k in keys]
            parts.append(f"{label}: {', '.join(str(k)[:120] for k in keys[:3])}{more}")
    return "; ".join(parts)


def check_adapter_arrays(arrays: Mapping[str, np.ndarray], config) -> Tuple[List[int], int, List[int]]:
    """An adapter's weights (numpy arrays, as ``safetensors.numpy`` loads them) against its config: the config's
    bounds, every expected key at the exact shape the config implies, floating weights (``num_batches_tracked``
    an int64 scalar), and finite values, naming the first tensor that is not. Returns the config's
    ``(tap_dims, fc_dim, head_sizes)``."""
    tap_dims, fc_dim, heads = check_adapter_config(config)
    if not isinstance(arrays, Mapping) or not arrays:
        raise EdgekitError("adapter weights must be a non-empty mapping of names to arrays")
    total = 0
    for k, a in arrays.items():
        name = str(k)[:120]
        if not isinstance(k, str) or not isinstance(a, np.ndarray):
            raise EdgekitError(f"adapter weight {name} is a {type(a).__name__}, not an array")
        if k.endswith("num_batches_tracked"):
            if a.dtype != np.int64 or a.ndim != 0:
                raise EdgekitError(f"{name} must be an int64 scalar, not {a.dtype} {list(a.shape)}")
        elif a.dtype.kind != "f":
            raise EdgekitError(f"{name} has dtype {a.dtype}; weights must be floating point")
        total += a.size
        if total > MAX_VALUES:
            raise EdgekitError(f"adapter weights hold more than {MAX_VALUES:,} values")
    diff = shape_diff(adapter_shapes(tap_dims, fc_dim, heads), arrays)
    if diff:
        raise EdgekitError(f"adapter weights do not match its config; {diff}")
    for k, a in arrays.items():
        if a.dtype.kind != "f":
            continue
        bad = ~np.isfinite(a)
        n = int(bad.sum())
        if n:
            nan = int(np.isnan(a).sum())
            kind = " and ".join(w for w, c in (("NaN", nan), ("Inf", n - nan)) if c)
            raise EdgekitError(f"adapter weight {k} holds {kind} ({n:,} of {a.size:,} values)")
    return tap_dims, fc_dim, heads
