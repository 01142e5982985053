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


def load(path: str | os.PathLike, backend: str | None = None, trusted_keys=None, **options) -> Runner:
    """A runner for a checkpoint file or an artifact folder.

    ``backend`` runs a checkpoint with another backend that loads checkpoints directly (e.g.
    ``cuda-fused``); ``options`` (threads, device, ...) go to the backend, which must declare each one
    (``BackendSpec.load_options``; None counts as not given): any other is an ``EdgekitError`` naming it and
    the options the backend accepts, never dropped silently.

    ``trusted_keys`` (public key files, loaded Ed25519 public keys or ``TrustedKey``s; default: the files
    in ``EDGEKIT_TRUSTED_KEYS``): the artifact must carry a signature by one of them. Either way the
    folder is verified (``edgekit.artifact.verify_artifact``: signature, path rules, every file's hash)
    before the backend opens any of its files, and the runner takes its files from that verified record.
    With trusted keys, a checkpoint or a plain model file (which carry no signature) is refused.
    """
    from edgekit.artifact import (MANIFEST, TRUSTED_KEYS_ENV, VerifiedArtifact, not_an_artifact, trusted_keys_from_env,
                                  verify_artifact)

    if isinstance(path, VerifiedArtifact) and trusted_keys is None:  # verified by the caller (e.g. compile, unsigned yet)
        spec = spec_for_folder(path.folder, path.manifest) if backend is None else get_backend(backend)
        return spec.load(path, **spec.load_kwargs(options))
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"model not found: {p}")
    from_env = trusted_keys is None
    keys = trusted_keys_from_env() if from_env else trusted_keys
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise not_an_artifact(p)
        verified = verify_artifact(p, keys, use_env=False)
        spec = spec_for_folder(p, verified.manifest) if backend is None else get_backend(backend)
        return spec.load(verified, **spec.load_kwargs(options))
    if keys is not None:
        why = f"{TRUSTED_KEYS_ENV} is set" if from_env else "trusted keys were given"
        raise EdgekitError(f"{p}: {why}, so only a signed artifact folder runs, and a checkpoint or plain model "
                           "file carries no signature (compile it with edgekit compile --sign KEY)")
    if p.suffix.lower() in CHECKPOINT_SUFFIXES:
        spec = get_backend(backend or "torch")
        return spec.load(p, **spec.load_kwargs(options))
    spec = spec_for_model_file(p) if backend is None else get_backend(backend)
    if spec is not None:  # a plain model file (model.onnx, model.xml): the runner states the preprocessing it assumes
        return spec.load(p, **spec.load_kwargs(options))
    raise EdgekitError(f"{p}: not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}), model file "
                       f"({', '.join(model_file_suffixes())}) or artifact folder")


__all__ = ["Runner", "backends", "get_backend", "load"]
