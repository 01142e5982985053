"""The station's models: the device's backbone once, the serving adapter and a trial on canary hold on the same
pooled features, an optional segmentation artifact and an optional drift scorer; all numpy, no torch.

The install root is the one source of truth (``edgekit.device.state``): ROOT/current is the serving adapter, a trial
with trial["phase"] == "canary" the one to shadow. ``refresh()`` (called by the worker between two batches) notices
a change of state.json or ROOT/current cheaply (stat and readlink), loads what changed BESIDE what runs, and only then
swaps: the batch before ran entirely on the old adapters, the batch after entirely on the new, so no image is dropped
or run twice by a swap. Every adapter folder is checked against its package manifest (sizes and sha256) and against
the backbone (``check_backbone_match``) before it is used.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from edgekit.device.state import CURRENT_LINK, STATE_NAME, InstallRoot
from edgekit.errors import EdgekitError, first_line


@dataclass
class LoadedAdapter:
    version: str
    dir: str  # versions/<name>, as state.json records it
    folder: Path
    meta: dict
    adapter: object  # NumpyAdapter
    classifier: object  # MLFFClassifier (numpy heads on the compiled backbone)
    drift: object = None  # a DriftScorer, or None when the adapter carries no drift statistics

    def predict(self, feats: np.ndarray) -> List[dict]:
        return self.classifier.predict_features(feats)


def _manifest_id(folder: Path) -> str:
    """An artifact's identity in results: the sha256 of its manifest (which hashes every file), first 16 digits."""
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()[:16]


def _artifact_kind(path) -> Optional[str]:
    """The ``model.kind`` an artifact folder's manifest records (None for a bare model file or no kind)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        model = json.loads(manifest.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None  # runtime.load has already verified it; nothing more to say here
    return model.get("kind") if isinstance(model, dict) else None


def _mask_output_shape(runner) -> Optional[str]:
    """None when ``runner`` gives a probability mask (1 x 1 x H x W for one input); otherwise its output shape as
    text. One zero image through the model: the only kind check a bare model file (no manifest) allows."""
    try:
        out = np.asarray(runner.infer(np.zeros((1, *runner.input_shape), np.float32)))
    except Exception as e:  # noqa: BLE001 - a model that cannot run one image is refused in one line, not a crash
        return f"an error on a blank image ({e.__class__.__name__}: {first_line(e)})"
    if out.ndim == 4 and out.shape[:2] == (1, 1) and min(out.shape[2:]) > 1:
        return None
    return " x ".join(map(str, out.shape)) or "a scalar"


class StationModels:
    """``run(images)`` -> one dict per image: {"classification", "trial", "ood", "segment_probs"};
    ``prepare(images)``: the backbone's input tensor, which ``run(images, prepared)`` takes instead of computing it.

    The backbone is loaded once, here, and never swapped (``refresh`` replaces adapters only): so a tensor
    prepared before a swap is still the right input after it."""

    def __init__(self, root: str | os.PathLike, backbone_artifact: Optional[str | os.PathLike] = None,
                 segment: Optional[str | os.PathLike] = None, threads: Optional[int] = None, drift: bool = True):
        self.root = InstallRoot(root)
        if not self.root.path.is_dir():
            raise EdgekitError(f"install root {root} does not exist")
        self.threads, self.use_drift = threads, drift
        self.trial: Optional[LoadedAdapter] = None
        self.trial_error: Optional[tuple] = None  # (version, reason): a held trial the station could not load
        self._stamp = self._state_stamp()
        state = self.root.read()
        if state.current is None:
            raise EdgekitError(f"no adapter is in service at {root} (edgekit update or edgekit install puts one there)")
        self.backbone = self._load_backbone(backbone_artifact)
        self.backbone_folder = Path(self.backbone.folder)
        self.serving = self._load_adapter(state.current)
        self._load_trial(state.held)
        self.segment = self.segment_id = None
        if segment is not None:
            from edgekit import runtime

            self.segment = runtime.load(segment, threads=threads)
            self.segment_id = _manifest_id(segment) if Path(segment).is_dir() else None
            # another kind of artifact (the MLFF backbone, say) loads and runs, but its outputs are no mask: every
            # image would then be an ERROR row; refuse it here, once, instead
            kind = _artifact_kind(segment)
            if kind not in (None, "gmbinet"):
                self.close()
                raise EdgekitError(f"--segment {segment}: a {kind!r} artifact, not a GMBINet segmentation artifact "
                                   "(edgekit compile a GMBINet checkpoint for it)")
            if kind is None:  # a bare model file (or a folder whose manifest names no kind): ask the model itself
                shape = _mask_output_shape(self.segment)
                if shape is not None:
                    self.close()
                    raise EdgekitError(f"--segment {segment}: its output is {shape}, not a mask (N x 1 x H x W): not "
                                       "a segmentation model (edgekit compile a GMBINet checkpoint for it)")

    # --- loading -------------------------------------------------------------------------------------------------

    def _load_backbone(self, artifact):
        from edgekit.fleet.backbone import read_device_backbone
        from edgekit.mlff.runner import CompiledBackbone

        if artifact is None:
            identity = read_device_backbone(self.root.path)
            if identity is None:
                raise EdgekitError(f"{self.root.path} records no backbone (ROOT/backbone.json, written by edgekit "
                                   "update --backbone); give the deployed one with --backbone-artifact DIR")
            if identity.kind != "artifact":
                raise EdgekitError(f"{self.root.path} records backbone weights ({identity.ref}); a station runs a "
                                   "compiled backbone artifact without torch: give it with --backbone-artifact DIR")
            artifact = identity.ref
            bb = CompiledBackbone(artifact, threads=self.threads)
            if (bb.id, bb.weights_sha256) != (identity.id, identity.sha256):
                raise EdgekitError(f"backbone {artifact} changed since it was recorded in {self.root.path} (now "
                                   f"{bb.id}, sha256 {bb.weights_sha256[:16]}…)")
            return bb
        return CompiledBackbone(artifact, threads=self.threads)

    def _load_adapter(self, entry: dict) -> LoadedAdapter:
        from edgekit.mlff.adapter import load_adapter_arrays
        from edgekit.mlff.classifier import MLFFClassifier
        from edgekit.mlff.heads import NumpyAdapter
        from edgekit.mlff.runner import check_backbone_match
        from edgekit.ota.install import check_version_folder

        folder = self.root.folder(entry)
        try:
            check_version_folder(folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgekitError(f"{entry['version']} at {folder} cannot be checked against its manifest ({e})") \
                from None
        arrays, meta = load_adapter_arrays(folder)
        check_backbone_match(self.backbone.manifest, meta, f"adapter {entry['version']} at {folder}",
                             self.backbone.folder)
        adapter = NumpyAdapter(arrays, meta["config"])
        return LoadedAdapter(entry["version"], entry["dir"], folder, meta, adapter,
                             MLFFClassifier(self.backbone, adapter, meta), self._drift(folder, arrays, meta))

    def _drift(self, folder: Path, arrays, meta):
        """The adapter's drift scorer (``edgekit.mlff.drift``), or None: no statistics in the package, or the
        module absent; drift is then reported as unavailable, never an error."""
        if not self.use_drift or not meta.get("drift"):
            return None
        try:
            from edgekit.mlff.drift import DriftScorer
        except ImportError:
            return None
        try:
            return DriftScorer.from_adapter(arrays, {**meta, "folder": str(folder)})
        except (EdgekitError, OSError, ValueError, KeyError, TypeError):
            return None

    def _load_trial(self, held: Optional[dict]) -> None:
        self.trial, self.trial_error = None, None
        self._trial_dir = (held["dir"], held.get("held")) if held else None  # a folder name may come back later
        if held is None:
            return
        try:
            self.trial = self._load_adapter(held)
        except EdgekitError as e:
            self.trial_error = (held["version"], str(e))

    def _state_stamp(self):
        """What changes whenever a transition happens: state.json's (mtime_ns, size, inode) and ROOT/current's
        target; read without a lock and without parsing anything."""
        try:
            st = os.stat(self.root.path / STATE_NAME)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        try:
            link = os.readlink(self.root.path / CURRENT_LINK)
        except OSError:
            link = None
        return stamp, link

    # --- the swap ------------------------------------------------------------------------------------------------

    def refresh(self) -> Optional[str]:
        """Take a committed version or a canary trial that changed since the last call; returns what was swapped
        ("serving 1.0.0 -> 1.1.0", "trial none -> 1.2.0", ...), or None. The new adapters are loaded before
        anything is replaced; a version that cannot be loaded leaves the serving one in place (EdgekitError for
        the serving side; a held trial that cannot be loaded is ``trial_error``, for the canary to reject)."""
        stamp = self._state_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # taken before reading: a change racing this read shows up as a new stamp next time
        state = self.root.read()
        changes = []
        new_serving = self.serving
        if state.current is not None and state.current["dir"] != self.serving.dir:
            if self.trial is not None and self.trial.dir == state.current["dir"]:
                new_serving = self.trial  # the trial was promoted: the very adapter that ran in shadow
            else:
                new_serving = self._load_adapter(state.current)
            changes.append(f"serving {self.serving.version} -> {new_serving.version}")
        held = state.held
        if ((held["dir"], held.get("held")) if held else None) != self._trial_dir:
            old = self.trial.version if self.trial else (self.trial_error[0] if self.trial_error else None)
            self._load_trial(held)
            changes.append(f"trial {old or 'none'} -> {held['version'] if held else 'none'}")
        self.serving = new_serving
        return "; ".join(changes) or None

    # --- running -------------------------------------------------------------------------------------------------

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The backbone's input tensor for ``images`` (``N x C x H x W`` float32): the part of ``run`` that
        depends on the backbone only. The station computes it on its prepare thread for the next batch while the
        worker runs this one, and possibly before a swap that happens between the two: that is safe because a
        swap only ever replaces adapters (serving, trial); the backbone, and so its preprocessing, is loaded once
        in ``__init__`` and never changes for the life of a StationModels."""
        return self.backbone.preprocess(list(images))

    def run(self, images: Sequence[np.ndarray], prepared: Optional[np.ndarray] = None) -> List[dict]:
        """One backbone pass for the batch, then every head on the same features. Per image: "classification"
        ({"class", "prob", "task"?} of the serving adapter), "trial" (the same for the trial, or None), "ood"
        ({"score", "threshold", "flagged"} or None) and "segment_probs" (the mask's probability map at the image's
        size, or None). ``prepared``: ``prepare(images)`` computed earlier (None: computed here)."""
        if not images:
            return []
        if prepared is None:
            prepared = self.prepare(images)
        feats = np.asarray(self.backbone.pooled(prepared), dtype=np.float32)
        serving = self.serving.predict(feats)
        trial = self.trial.predict(feats) if self.trial is not None else [None] * len(images)
        ood = [None] * len(images)
        if self.serving.drift is not None:
            logits = np.concatenate(self.serving.adapter.head_logits(feats), axis=1)
            scores = np.asarray(self.serving.drift.score(feats, logits), dtype=np.float64)
            thr = float(self.serving.drift.threshold)
            ood = [{"score": float(s), "threshold": thr, "flagged": bool(s > thr)} for s in scores]
        probs = [None] * len(images)
        if self.segment is not None:
            from edgekit.eval.evaluate import predict_probs

            probs = predict_probs(self.segment, list(images))
        return [{"classification": s, "trial": t, "ood": o, "segment_probs": p}
                for s, t, o, p in zip(serving, trial, ood, probs)]

    def versions(self) -> dict:
        return {"serving": self.serving.version, "trial": self.trial.version if self.trial else None,
                "backbone": self.backbone.id, "segment": self.segment_id}

    def close(self) -> None:
        for r in (getattr(self.backbone, "runner", None), self.segment):
            if r is not None and hasattr(r, "close"):
                r.close()
