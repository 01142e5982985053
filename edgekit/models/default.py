"""The embedded default checkpoint: GMBINet trained by edgekit's own recipe, shipped in the package."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from edgekit.errors import EdgekitError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "gmbinet_edgekit.pt"


def resolve_model(path: str | None, note: Optional[Callable[[str], None]] = None) -> str:
    """The model path a command should use: the one given, or the embedded default (said through ``note``)."""
    if path:
        return path
    if not DEFAULT_CHECKPOINT.is_file():
        raise EdgekitError("no model given and the embedded default checkpoint is not installed; "
                           "name a checkpoint or artifact folder")
    if note is not None:
        note(f"note: no model given; using the embedded default checkpoint {DEFAULT_CHECKPOINT} "
             "(GMBINet trained by edgekit's own recipe; name a checkpoint or artifact to use another)")
    return str(DEFAULT_CHECKPOINT)
