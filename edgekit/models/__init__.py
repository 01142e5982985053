"""Model families register themselves with ``edgekit.models.registry`` on import."""
from edgekit.models import gmbinet  # noqa: F401  (registers "gmbinet")
from edgekit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
