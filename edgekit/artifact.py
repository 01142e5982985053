"""Artifact folders: model files plus a ``manifest.json`` that says what they are.

Every compiled model, whatever the backend, is one folder::

    model.onnx | model.xml + model.bin | ...     the files the backend loads
    manifest.json                                what, from where, how, and how well

The manifest records the model kind and config, input spec and preprocessing, the source
checkpoint's sha256, target and precision, tool versions, the sha256 of every model file, and
the parity figures measured against the source model at compile time. ``read_manifest`` checks
the file hashes, so a corrupted or mismatched folder is refused before anything runs.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.utils import default_permissions, sha256_file

MANIFEST = "manifest.json"
FORMAT = "edgekit-artifact"
FORMAT_VERSION = 1


def tool_versions(*packages: str) -> Dict[str, str]:
    """edgekit's version and those of ``packages`` (the ones a backend declares it builds with)."""
    out = {"edgekit": __version__}
    for p in dict.fromkeys(packages):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[p] = importlib.metadata.version(p)
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def not_an_artifact(folder: str | os.PathLike) -> EdgekitError:
    """The one error every command gives for a folder, named as a model, that has no manifest."""
    return EdgekitError(f"{folder} is a folder without {MANIFEST}, so not an edgekit artifact (edgekit compile "
                        "writes those); give a checkpoint, an artifact folder or a model file (.onnx, .xml)")


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise not_an_artifact(folder)
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError):
        raise EdgekitError(f"{mpath}: corrupt manifest (not JSON)") from None
    if manifest.get("format") != FORMAT:
        raise EdgekitError(f"{mpath}: not an edgekit artifact manifest")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            f = folder / name
            if not f.is_file():
                raise EdgekitError(f"{folder}: file {name} listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise EdgekitError(f"{folder}: {name} does not match its sha256 in the manifest (corrupt or replaced)")
    return manifest


def check_out(out: str | os.PathLike, force: bool = False) -> None:
    """Refuse an output folder before any work starts (``artifact_writer`` checks again at the end)."""
    out = Path(out)
    if out.exists() and not force:
        raise EdgekitError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a folder")


@contextlib.contextmanager
def artifact_writer(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    A failure leaves no partial folder, and an existing ``out`` untouched (replaced only with
    ``force``, and only once the new one is complete).
    """
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, default_permissions(directory=True))  # mkdtemp makes it 0700; the user's umask decides
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict, model_files) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now_utc(), **manifest}
    manifest["files"] = {name: sha256_file(folder / name) for name in model_files}
    manifest["size_bytes"] = sum((folder / n).stat().st_size for n in model_files)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
