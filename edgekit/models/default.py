"""Which model a command uses: the one named, or the embedded default checkpoint (GMBINet trained by
edgekit's own recipe, shipped in the package). Light: no torch import."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from edgekit.errors import EdgekitError
from edgekit.export.artifact import MANIFEST as MANIFEST_NAME

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "gmbinet_edgekit.pt"
# File names a model argument may have: checkpoints, and plain ONNX / OpenVINO IR files.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
PLAIN_MODEL_SUFFIXES = (".onnx", ".xml")


def looks_like_model(path: str) -> bool:
    """A path that names a model rather than an image: by suffix (even when missing), or an artifact folder."""
    p = Path(path)
    return p.suffix.lower() in CHECKPOINT_SUFFIXES + PLAIN_MODEL_SUFFIXES or (p / MANIFEST_NAME).is_file()


def not_an_artifact(folder: Path) -> EdgekitError:
    """The one error every command gives for a folder that is not an artifact."""
    return EdgekitError(f"{folder} is a folder without {MANIFEST_NAME}, so not an edgekit artifact "
                        "(edgekit compile writes those); give a checkpoint file, an artifact folder, "
                        "or a .onnx / .xml model file")


def resolve_model(path: str | None, note: Optional[Callable[[str], None]] = None,
                  registry_ok: bool = False) -> str:
    """The model path a command should use: the one given, or the embedded default (said through ``note``).

    A folder must be an artifact (``manifest.json``), or, where ``registry_ok``, an MLFF adapter registry.
    """
    if path:
        p = Path(path)
        if not registry_ok and not p.exists():  # (with registry_ok a name such as efficientnet-lite0 is a model too)
            raise EdgekitError(f"model not found: {p}")
        if p.is_dir() and not (p / MANIFEST_NAME).is_file():
            if registry_ok:
                from edgekit.train.continual import REGISTRY_NAME

                if (p / REGISTRY_NAME).is_file():
                    return path
            raise not_an_artifact(p)
        return path
    if not DEFAULT_CHECKPOINT.is_file():
        raise EdgekitError("no model given and the embedded default checkpoint is not installed; "
                           "name a checkpoint or artifact folder")
    if note is not None:
        note(f"note: no model given; using the embedded default checkpoint {DEFAULT_CHECKPOINT} "
             "(GMBINet trained by edgekit's own recipe; name a checkpoint or artifact to use another)")
    return str(DEFAULT_CHECKPOINT)
