"""The embedded default checkpoint: GMBINet trained by edgekit's own recipe, shipped in the package."""
from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "gmbinet_edgekit.pt"


def resolve_model(path: str | None) -> str:
    """The model path a command should use: the one given, or the embedded default."""
    if path:
        return path
    if not DEFAULT_CHECKPOINT.is_file():
        raise EdgekitError("no model given and the embedded default checkpoint is not installed; "
                           "name a checkpoint or artifact folder")
    return str(DEFAULT_CHECKPOINT)
