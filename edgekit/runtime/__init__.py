"""``edgekit.runtime.load(path).infer(batch)``: one interface for every model source.

A checkpoint file runs with PyTorch (the ``torch`` backend); an artifact folder runs with the
backend its manifest names, looked up in the registry (``edgekit.backends.registry``), so a backend
whose optional package is missing only fails when one of its artifacts is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from edgekit.backends.base import Runner
from edgekit.backends.registry import backends, get_backend, model_file_suffixes, spec_for_folder, spec_for_model_file
from edgekit.errors import EdgekitError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load(path: str | os.PathLike, backend: str | None = None, **options) -> Runner:
    """A runner for a checkpoint file or an artifact folder.

    ``backend`` runs a checkpoint with another backend that loads checkpoints directly (e.g.
    ``cuda-fused``); ``options`` (threads, device, ...) go to the backend that declares them.
    """
    from edgekit.artifact import MANIFEST, not_an_artifact, read_manifest

    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"model not found: {p}")
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise not_an_artifact(p)
        manifest = read_manifest(p, verify=False)  # the runner verifies the hashes
        spec = spec_for_folder(p, manifest) if backend is None else get_backend(backend)
        return spec.load(p, **spec.load_kwargs(options))
    if p.suffix.lower() in CHECKPOINT_SUFFIXES:
        spec = get_backend(backend or "torch")
        return spec.load(p, **spec.load_kwargs(options))
    spec = spec_for_model_file(p) if backend is None else get_backend(backend)
    if spec is not None:  # a plain model file (model.onnx, model.xml): the runner states the preprocessing it assumes
        return spec.load(p, **spec.load_kwargs(options))
    raise EdgekitError(f"{p}: not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}), model file "
                       f"({', '.join(model_file_suffixes())}) or artifact folder")


__all__ = ["Runner", "backends", "get_backend", "load"]
