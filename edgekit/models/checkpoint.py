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
import math
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
from edgekit.models.gmbinet import config_from_state_dict
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
        """The model with the weights loaded (every key matched), in eval mode. The config is checked
        against the tensors on the meta device before any real module is allocated."""
        check_architecture(self.model_name, self.config, self.state_dict)
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


def state_dict_diff(own: Dict[str, tuple], sd: Dict[str, torch.Tensor]) -> Optional[str]:
    """The keys that differ between an architecture's expected shapes and ``sd``, in one phrase
    (``edgekit.models.mlff_spec.shape_diff``, the torch-free one the station's adapter check uses)."""
    from edgekit.models.mlff_spec import shape_diff

    return shape_diff(own, sd)


# The most tensors and values a checkpoint may hold: GMBINet has 726 tensors and 0.2 M values;
# the largest config GMBINetConfig's bounds allow is checked against MAX_VALUES too.
MAX_TENSORS = 20_000
MAX_VALUES = 64 << 20
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensors(sd) -> None:
    """The state_dict's structure, checked before any value is read: names are strings, values are
    dense floating tensors (integer counters only for ``num_batches_tracked``), and each tensor's
    shape and strides stay inside its own storage without re-reading an element (a stride-0 view
    lets a 1 KB file describe a 65,536 x 65,536 tensor)."""
    if not isinstance(sd, dict) or not sd:
        raise EdgekitError("state_dict must be a non-empty mapping of names to tensors")
    if len(sd) > MAX_TENSORS:
        raise EdgekitError(f"state_dict holds {len(sd):,} tensors (more than {MAX_TENSORS:,})")
    total = 0
    for k, t in sd.items():
        name = str(k)[:120]
        if not isinstance(k, str):
            raise EdgekitError(f"state_dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise EdgekitError(f"{name} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_quantized or t.device.type not in ("cpu", "meta"):
            what = "a quantized tensor" if t.is_quantized else f"{t.layout} on {t.device}"
            raise EdgekitError(f"{name} is not a dense floating CPU tensor ({what})")
        counter = k.endswith("num_batches_tracked")
        if counter and (t.dtype != torch.int64 or t.dim() != 0):
            raise EdgekitError(f"{name} must be an int64 scalar, not {t.dtype} {list(t.shape)}")
        if not counter and t.dtype not in _WEIGHT_DTYPES:
            raise EdgekitError(f"{name} has dtype {t.dtype}; weights must be floating point")
        if t.dim() > 8:
            raise EdgekitError(f"{name} has {t.dim()} dimensions")
        n = t.numel()
        if n:
            if any(st < 0 for st in t.stride()):
                raise EdgekitError(f"{name} has a negative stride {list(t.stride())}")
            extent = t.storage_offset() + sum((d - 1) * st for d, st in zip(t.shape, t.stride())) + 1
            stored = t.untyped_storage().nbytes() // t.element_size()
            # Every element must have its own place in the storage (no stride-0 or overlapping
            # views that multiply a small file into a huge tensor) and stay inside it.
            if extent > stored or n > stored:
                raise EdgekitError(f"{name} claims shape {list(t.shape)} (strides {list(t.stride())}) over a storage "
                                   f"of {stored:,} values")
        total += n
        if total > MAX_VALUES:
            raise EdgekitError(f"state_dict holds more than {MAX_VALUES:,} values")


def nonfinite_report(sd: Dict[str, torch.Tensor]) -> Optional[str]:
    """``"<tensor> holds NaN (3 of 288 values)"`` for the first tensor (in state_dict order) with a
    NaN or infinite value, or None when every value is finite. Checked tensors: ``check_tensors``."""
    for k, t in sd.items():
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        bad = ~torch.isfinite(t)
        n = int(bad.sum())
        if n:
            nan, inf = int(torch.isnan(t).sum()), n - int(torch.isnan(t).sum())
            kind = " and ".join(w for w, c in (("NaN", nan), ("Inf", inf)) if c)
            return f"{k} holds {kind} ({n:,} of {t.numel():,} values)"
    return None


def check_architecture(model_name: str, config: dict, sd: Dict[str, torch.Tensor]) -> nn.Module:
    """The model ``config`` describes, built on the meta device (no memory for weights), with every
    expected key present in ``sd`` at the exact shape the config implies. The config's own bounds
    are checked by its constructor first. Returns the meta model (for counts that need no values)."""
    with torch.device("meta"):
        try:
            model = create_model(model_name, **config)
        except TypeError as e:  # a config key the builder does not take
            raise EdgekitError(f"{model_name} config: {e}"[:300]) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if sum(math.prod(s) for s in expected.values()) > MAX_VALUES:
        raise EdgekitError(f"{model_name} config describes more than {MAX_VALUES:,} weights")
    diff = state_dict_diff(expected, sd)
    if diff:
        raise EdgekitError("state_dict does not match the architecture; " + diff)
    return model


# The pickle that describes a checkpoint's structure (names, shapes, strides; the values live beside
# it). Unpickling costs time per tensor, and stride-0 views let a small file hold many: the
# published checkpoint's is 108 KB for 726 tensors; 2 MB bounds torch.load's work at ~19,000.
MAX_PICKLE_BYTES = 2 << 20


def _check_pickle_size(path: Path) -> None:
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy pickle: its file size is its structure's size, read at a bounded rate
        with zipfile.ZipFile(path) as zf:
            sizes = [i.file_size for i in zf.infolist() if i.filename.endswith("data.pkl")]
    except (zipfile.BadZipFile, OSError):
        return  # torch.load's own error, described by describe_unloadable
    if sizes and max(sizes) > MAX_PICKLE_BYTES:
        raise EdgekitError(f"{path}: its structure (data.pkl) is {max(sizes):,} bytes, more than the "
                           f"{MAX_PICKLE_BYTES:,} a checkpoint of this project's models needs; refused before unpickling")


def _torch_load(path: Path):
    if not path.exists():
        raise EdgekitError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise EdgekitError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise EdgekitError(f"{path} is an empty file (0 bytes), not a PyTorch checkpoint")
    _check_pickle_size(path)
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


def load_checkpoint(path: str | os.PathLike, allow_nonfinite: bool = False) -> Checkpoint:
    """Read an edgekit checkpoint, or import a plain GMBINet ``state_dict`` (the published format).

    Everything is validated before any model is built: the tensors' structure (``check_tensors``),
    the config's bounds and its agreement with every tensor's shape (``check_architecture``), the
    preprocessing spec, and (unless ``allow_nonfinite``, for ``info``) that every value is finite.
    """
    path = Path(path)
    obj = _torch_load(path)
    digest = sha256_file(path)
    try:
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            version = obj.get("format_version", 0)
            if isinstance(version, bool) or not isinstance(version, int):
                raise EdgekitError(f"format_version {str(version)[:40]!r} is not an integer")
            if version > FORMAT_VERSION:
                raise EdgekitError(f"{path} was written by a newer edgekit (format {version})")
            try:
                for k in ("model", "config", "state_dict"):
                    obj[k]
                if not isinstance(obj["config"], dict) or not isinstance(obj["state_dict"], dict):
                    raise EdgekitError("config and state_dict must be mappings")
                check_tensors(obj["state_dict"])
                ck = Checkpoint(
                    model_name=str(obj["model"]), config=dict(obj["config"]), state_dict=dict(obj["state_dict"]),
                    preprocess=PreprocessSpec.from_dict(obj.get("preprocess", {})),
                    classes=list(obj.get("classes", [])), provenance=dict(obj.get("provenance", {})),
                    metrics=dict(obj.get("metrics", {})), path=path, sha256=digest)
            except KeyError as e:
                raise EdgekitError(f"edgekit checkpoint lacks {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                raise EdgekitError(f"malformed edgekit checkpoint ({e})"[:300]) from None
            model = check_architecture(ck.model_name, ck.config, ck.state_dict)
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            check_tensors(obj)
            ck = import_state_dict(obj, source=path, sha256=digest)
            model = check_architecture(ck.model_name, ck.config, ck.state_dict)
        else:
            raise EdgekitError("neither an edgekit checkpoint nor a GMBINet state_dict")
        cin = getattr(getattr(model, "config", None), "in_channels", None)
        if cin is not None and cin != ck.preprocess.channels:
            raise EdgekitError(f"preprocess feeds {ck.preprocess.channels} channels but the model takes {cin}")
        if not allow_nonfinite:
            bad = nonfinite_report(ck.state_dict)
            if bad:
                raise EdgekitError(f"{bad}; a model with non-finite weights cannot give a trustworthy mask")
    except EdgekitError as e:
        msg = str(e)
        raise EdgekitError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return ck


def import_state_dict(sd: Dict[str, torch.Tensor], source: Path | str = "", sha256: str = "") -> Checkpoint:
    """Wrap a plain GMBINet ``state_dict`` (e.g. the authors' published file) as a Checkpoint.

    The architecture is read off the tensor shapes; the weights must then load with every key matched.
    """
    check_tensors(sd)
    cfg = config_from_state_dict(sd)
    check_architecture("gmbinet", cfg.to_dict(), sd)  # names and shapes, on the meta device
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
