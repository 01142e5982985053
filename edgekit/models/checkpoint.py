"""edgekit's checkpoint format, and the importer for plain GMBINet ``state_dict`` files.

An edgekit checkpoint is a dict of plain Python values and tensors, so it loads with
``torch.load(path, weights_only=True)``::

    {"format": "edgekit-checkpoint", "format_version": 1,
     "model": "gmbinet", "config": {...architecture...},
     "state_dict": {...}, "preprocess": {...}, "classes": [...],
     "provenance": {"source": ..., "source_sha256": ..., ...}, "metrics": {...}}
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from edgekit import __version__
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError
from edgekit.models.gmbinet import GMBINet, config_from_state_dict
from edgekit.models.registry import create_model
from edgekit.utils import atomic_write, sha256_file

FORMAT = "edgekit-checkpoint"
FORMAT_VERSION = 1
SD900_CLASSES = ["inclusion", "patches", "scratches"]


@dataclass
class Checkpoint:
    model_name: str
    config: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    classes: List[str] = field(default_factory=list)
    provenance: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None
    sha256: str = ""

    def build(self) -> nn.Module:
        """The model with the weights loaded (every key matched), in eval mode."""
        model = create_model(self.model_name, **self.config)
        load_state_dict_strict(model, self.state_dict)
        return model.eval()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": self.model_name, "config": self.config,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "preprocess": self.preprocess.to_dict(), "classes": list(self.classes),
            "provenance": self.provenance, "metrics": self.metrics,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_write(path, "wb") as f:
            torch.save(self.to_dict(), f)
        return path

    @classmethod
    def from_model(cls, model: nn.Module, name: str = "gmbinet", **kw) -> "Checkpoint":
        cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        return cls(model_name=name, config=cfg, state_dict=dict(model.state_dict()), **kw)


def load_state_dict_strict(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Load with every key matched; on mismatch, one error naming the keys that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise EdgekitError("state_dict does not match the architecture; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _torch_load(path: Path):
    if not path.exists():
        raise EdgekitError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise EdgekitError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise EdgekitError(f"{path} is an empty file (0 bytes), not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error below says more
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises KeyError/IndexError/RuntimeError/... on foreign bytes: say what it is
        raise EdgekitError(f"{path}: {describe_unloadable(path, e)}") from None


def describe_unloadable(path: Path, error: Exception) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused is, in a few words (nothing is executed)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if isinstance(error, pickle.UnpicklingError) and head.startswith((b"\x80", b"PK")):
        found = re.findall(r"GLOBAL ([\w.]+)", str(error)) or _pickle_globals(path, head)
        names = f" ({', '.join(dict.fromkeys(found))})" if found else ""
        return ("refused: contains objects other than tensors and plain values" + names +
                "; edgekit loads checkpoints only with torch.load(weights_only=True), which never runs pickled code")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                if not any(n.endswith("/data.pkl") for n in zf.namelist()):
                    return "a zip archive, not a PyTorch checkpoint (no data.pkl inside)"
        except (zipfile.BadZipFile, OSError):
            pass
        return "truncated or damaged PyTorch checkpoint (its zip archive cannot be read)"
    if head[:1] == b"\x80":  # a pickle (the legacy torch.save format)
        return "truncated or damaged pickle (legacy PyTorch format)"
    try:
        text = path.read_bytes().decode("utf-8") if path.stat().st_size < (16 << 20) else None
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            json.loads(text)
            return "a JSON file, not a PyTorch checkpoint"
        except ValueError:
            return "a text file, not a PyTorch checkpoint"
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def _pickle_globals(path: Path, head: bytes) -> list:
    """The classes a plain pickle names, read with pickletools (which parses and never executes)."""
    if not head.startswith(b"\x80"):
        return []
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged pickle: name what was read so far
        pass
    return names[:3]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an edgekit checkpoint, or import a plain GMBINet ``state_dict`` (the published format)."""
    path = Path(path)
    obj = _torch_load(path)
    digest = sha256_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise EdgekitError(f"{path} was written by a newer edgekit (format {obj['format_version']})")
        try:
            ck = Checkpoint(
                model_name=obj["model"], config=dict(obj["config"]), state_dict=dict(obj["state_dict"]),
                preprocess=PreprocessSpec.from_dict(obj.get("preprocess", {})),
                classes=list(obj.get("classes", [])), provenance=dict(obj.get("provenance", {})),
                metrics=dict(obj.get("metrics", {})), path=path, sha256=digest)
        except KeyError as e:
            raise EdgekitError(f"{path}: edgekit checkpoint lacks {e.args[0]!r}") from None
        return ck
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return import_state_dict(obj, source=path, sha256=digest)
    raise EdgekitError(f"{path} is neither an edgekit checkpoint nor a GMBINet state_dict")


def import_state_dict(sd: Dict[str, torch.Tensor], source: Path | str = "", sha256: str = "") -> Checkpoint:
    """Wrap a plain GMBINet ``state_dict`` (e.g. the authors' published file) as a Checkpoint.

    The architecture is read off the tensor shapes; the weights must then load with every key matched.
    """
    cfg = config_from_state_dict(sd)
    load_state_dict_strict(GMBINet(cfg), sd)  # validates names and shapes now, with a clear error
    return Checkpoint(
        model_name="gmbinet", config=cfg.to_dict(), state_dict=dict(sd),
        preprocess=PreprocessSpec(), classes=list(SD900_CLASSES),
        provenance={
            "source": str(source), "source_sha256": sha256, "imported_by": f"edgekit {__version__}",
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "format": "plain GMBINet state_dict (upstream module names)",
        },
        path=Path(source) if source else None, sha256=sha256)


def parameter_count(sd: Dict[str, torch.Tensor], model: nn.Module | None = None) -> int:
    """Learnable parameters (BN running statistics excluded), counted from the weights."""
    if model is not None:
        return sum(p.numel() for p in model.parameters())
    return sum(v.numel() for k, v in sd.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
