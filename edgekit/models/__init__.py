"""Model families register themselves with ``edgekit.models.registry`` on import.

The names below load on first use (PEP 562), so importing a light submodule such as
``edgekit.models.default`` does not pull in torch.
"""
__all__ = ["create_model", "list_models", "register_model"]


def __getattr__(name):
    if name in __all__:
        from edgekit.models import gmbinet  # noqa: F401  (registers "gmbinet")
        from edgekit.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'edgekit.models' has no attribute {name!r}")
