"""Model registry: one small file per model family registers a builder here (timm style)."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch.nn as nn

from edgekit.errors import EdgekitError

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: ``@register_model("gmbinet")`` on a ``build(**config) -> nn.Module`` function."""

    def wrap(fn):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return wrap


def create_model(name: str, **config: Any) -> nn.Module:
    if name not in _BUILDERS:
        raise EdgekitError(f"unknown model {name!r} (known: {', '.join(sorted(_BUILDERS))})")
    return _BUILDERS[name](**config)


def list_models():
    return sorted(_BUILDERS)
