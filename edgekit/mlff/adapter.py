"""The on-disk adapter format: what ``edgekit package`` ships and what a device loads.

An adapter is a folder::

    adapter.json            metadata (below), written last so a complete adapter.json means a complete folder
    adapter.safetensors     the weights; safetensors only (no pickle, so loading runs no code)

``adapter.json``::

    {"format": "edgekit-adapter", "format_version": 1,
     "task": "steel-defects", "classes": ["inclusion", "patches", "scratches"],
     "version": "1.2.0",                      # optional; the package version is authoritative
     "backbone": "gmbinet-sd900",             # id of the frozen backbone the adapter sits on
     "backbone_sha256": "<64 hex>",           # sha256 of that backbone's weights file (edgekit.fleet.backbone)
     "input": {"shape": [3, 512, 512], ...},  # input spec
     "config": {...},                         # optional model config of the adapter head
     "weights": ["adapter.safetensors"],      # weight files, all safetensors, keys unique across files
     "drift": {"file": "drift.safetensors", "method": ..., "threshold": ..., ...},  # optional (edgekit.mlff.drift):
                                              # the out-of-distribution statistics, shipped and hashed like weights
     ...any other JSON fields are kept}
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.mlff.names import RULE as NAME_RULE, is_safe_name
from edgekit.mlff.version import parse_version
from edgekit.utils import atomic_write

ADAPTER_FORMAT = "edgekit-adapter"
ADAPTER_FORMAT_VERSION = 1
META_NAME = "adapter.json"
WEIGHTS_NAME = "adapter.safetensors"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
# Payload file names are plain names: no folders, no hidden files, nothing a shell or archive could misread.
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.match(value))


def is_plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_FILE_NAME_RE.match(name))


def validate_adapter_meta(meta: Mapping[str, Any], where: str = META_NAME) -> Dict[str, Any]:
    """Check the fields every adapter must have; returns a plain-dict copy. One EdgekitError per problem."""
    if not isinstance(meta, Mapping):
        raise EdgekitError(f"{where}: expected a JSON object")
    meta = dict(meta)

    def need(cond: bool, what: str):
        if not cond:
            raise EdgekitError(f"{where}: {what}")

    need(meta.get("format", ADAPTER_FORMAT) == ADAPTER_FORMAT,
         f"format is {meta.get('format')!r}, not {ADAPTER_FORMAT!r}")
    fv = meta.get("format_version", ADAPTER_FORMAT_VERSION)
    need(isinstance(fv, int) and fv <= ADAPTER_FORMAT_VERSION,
         f"format_version {fv!r} is newer than this edgekit reads ({ADAPTER_FORMAT_VERSION}); upgrade edgekit")
    need(is_safe_name(meta.get("task")), f"'task' {meta.get('task')!r} must be {NAME_RULE}")
    classes = meta.get("classes")
    need(isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes),
         "'classes' must be a non-empty list of class names")
    need(len(set(classes)) == len(classes), "'classes' has duplicate names")
    if meta.get("version") is not None:
        parse_version(meta["version"])
    need(isinstance(meta.get("backbone"), str) and meta["backbone"].strip() != "",
         "'backbone' must be the backbone id string")
    if isinstance(meta.get("backbone_sha256"), str):
        meta["backbone_sha256"] = meta["backbone_sha256"].strip().lower()
    need(is_sha256(meta.get("backbone_sha256")), "'backbone_sha256' must be a sha256 (64 hex digits)")
    need(isinstance(meta.get("input"), dict), "'input' must be an object (the input spec)")
    need(isinstance(meta.get("config", {}), dict), "'config' must be an object")
    weights = meta.get("weights", [WEIGHTS_NAME])
    need(isinstance(weights, list) and weights, "'weights' must be a non-empty list of file names")
    for name in weights:
        need(is_plain_file_name(name) and name.endswith(".safetensors"),
             f"weight file {name!r} must be a plain file name ending in .safetensors")
    need(len(set(weights)) == len(weights), "'weights' lists a file twice")
    if meta.get("drift") is not None:
        from edgekit.mlff.drift import check_drift_meta

        check_drift_meta(meta["drift"], where)
        need(meta["drift"]["file"] not in weights and meta["drift"]["file"] != META_NAME,
             f"drift file {meta['drift']['file']!r} is also a weight file")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise EdgekitError(f"{where}: not plain JSON ({e})") from None
    return meta


def _to_torch(name: str, value):
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"adapter tensor {name!r} is a {type(value).__name__}, not a torch.Tensor or numpy array")
    # clone: safetensors refuses tensors that share storage (e.g. tied weights or views)
    return value.detach().cpu().contiguous().clone()


def save_adapter(folder: str | os.PathLike, tensors: Mapping[str, Any], meta: Mapping[str, Any],
                 files: Optional[Mapping[str, bytes]] = None) -> Path:
    """Write ``tensors`` (name -> torch.Tensor or numpy array) and ``meta`` as an adapter folder.

    ``meta`` needs task, classes, backbone, backbone_sha256 and input (see the module docstring);
    format, format_version and weights are filled in. ``files``: the other payload files ``meta`` names
    (the drift statistics: ``{meta["drift"]["file"]: bytes}``), written before adapter.json; a ``meta`` read from
    another adapter whose drift file is not given loses its "drift" field (those statistics belong to the
    weights they were fitted with). Returns the folder.
    """
    folder = Path(folder)
    if not tensors:
        raise EdgekitError("an adapter needs at least one tensor")
    meta = dict(meta)
    files = dict(files or {})
    if isinstance(meta.get("drift"), Mapping) and meta["drift"].get("file") not in files:
        meta.pop("drift")
    meta.update(format=ADAPTER_FORMAT, format_version=ADAPTER_FORMAT_VERSION, weights=[WEIGHTS_NAME])
    meta = validate_adapter_meta(meta)
    extra = sorted(set(adapter_files(meta)) - {META_NAME, WEIGHTS_NAME})
    if sorted(files) != extra:
        raise EdgekitError(f"save_adapter: adapter.json names the files {extra}, but {sorted(files)} were given")
    import safetensors.torch  # the build side (edgekit adapt) writes adapters from torch tensors

    data = safetensors.torch.save({str(k): _to_torch(str(k), v) for k, v in tensors.items()})
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / WEIGHTS_NAME) as f:
        f.write(data)
    for name, content in files.items():
        with atomic_write(folder / name) as f:
            f.write(content)
    with atomic_write(folder / META_NAME, "w") as f:  # last: it names the weights, so it marks the folder complete
        json.dump(meta, f, indent=2)
        f.write("\n")
    return folder


def read_adapter_meta(folder: str | os.PathLike) -> Dict[str, Any]:
    """The validated ``adapter.json`` of an adapter folder."""
    path = Path(folder) / META_NAME
    if not Path(folder).is_dir():
        raise EdgekitError(f"adapter folder {folder} not found")
    if not path.is_file():
        raise EdgekitError(f"{folder} is not an adapter folder: no {META_NAME}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgekitError(f"{path}: not readable JSON ({e})") from None
    return validate_adapter_meta(meta, str(path))


def load_weights_bytes(name: str, data: bytes) -> Dict[str, np.ndarray]:
    """Parse one safetensors file's bytes into numpy arrays (no torch: a station reads adapters and health
    samples with this); a clear error if it is not safetensors."""
    import safetensors.numpy

    try:
        return safetensors.numpy.load(data)
    except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
        raise EdgekitError(f"weight file {name} is not a valid safetensors file ({type(e).__name__})") from None


def load_adapter_arrays(folder: str | os.PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(arrays, meta)`` of an adapter folder: numpy arrays by name, checked against the config (shapes,
    dtypes, finite values) when it is edgekit's MLFF adapter, and the adapter.json fields. Needs no torch."""
    folder = Path(folder)
    meta = read_adapter_meta(folder)
    arrays: Dict[str, np.ndarray] = {}
    for name in meta.get("weights", [WEIGHTS_NAME]):
        path = folder / name
        if not path.is_file():
            raise EdgekitError(f"{folder}: weight file {name} named in {META_NAME} is missing")
        for key, value in load_weights_bytes(name, path.read_bytes()).items():
            if key in arrays:
                raise EdgekitError(f"{folder}: tensor {key!r} appears in more than one weight file")
            arrays[key] = value
    if "tap_dims" in meta.get("config", {}):  # a head from edgekit's MLFF: its shapes are known before building
        from edgekit.models.mlff_spec import check_adapter_arrays

        try:
            check_adapter_arrays(arrays, meta["config"])
        except EdgekitError as e:
            raise EdgekitError(f"{folder}: {e}") from None
    return arrays, meta


def load_adapter(folder: str | os.PathLike):
    """``(tensors, meta)`` of an adapter folder: torch tensors by name (``load_adapter_arrays``, then
    ``torch.from_numpy``), and the adapter.json fields. The PyTorch side's loader; a station uses
    ``load_adapter_arrays``."""
    import torch

    arrays, meta = load_adapter_arrays(folder)
    return {k: torch.from_numpy(np.asarray(v, order="C")) for k, v in arrays.items()}, meta


def adapter_files(meta: Mapping[str, Any]) -> list:
    """The files that make up an adapter: adapter.json, its weight files and its drift statistics (if any)."""
    drift = meta.get("drift")
    return [META_NAME, *meta.get("weights", [WEIGHTS_NAME]), *([drift["file"]] if isinstance(drift, Mapping) else [])]
