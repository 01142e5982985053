"""Drift / novelty flag for MLFF adapters, in numpy (a station runs it without torch), and the bounded review
folder the flagged images go to.

**The score.** ``edgekit adapt`` fits, on the adapter's own fused embedding (``MLFFAdapter.embed``: the
``fc_dim``-wide vector its heads read) of the images it trained on, one mean per class and ONE shared covariance
(plus a small ridge). An image's out-of-distribution score is its squared Mahalanobis distance to the nearest
class mean. Chosen by measurement (``benchmarks/drift_auroc.py``, benchmarks/RESULTS.md "Drift flag (issue 22)"):
on NEU-CLS with one class left out it separates the left-out class from the held-out images of the other five
at a mean AUROC of 0.995, against 0.977 for the energy score on the logits, and 0.95-0.96 for the same
Mahalanobis score on a PCA of the raw pooled backbone features (whose projection alone would be hundreds of KB).
``method="energy"`` (``-logsumexp`` of the logits; no statistics) is kept as the measured alternative.

**The threshold** is the ``percentile`` (default 99; ``calibrate``) of the scores of held-out in-distribution
images: a split
of the task's images (``calibration_split``, default 10 % of each class) that the adapter is NOT trained on,
because the embedding is fitted to its training images and scores them lower than new images of the same
classes (calibrated on training images, the 99th percentile flagged about 9 % of new in-distribution images on
NEU). The 99th: about 1 % of in-distribution images are flagged, so the review folder gets ~10 images per 1,000
to label, while most images of a new product/defect (AUROC 0.995) lie above it. When the task is too small to
hold out ``MIN_CALIBRATION`` images, the threshold is calibrated on the training images and the metadata says
so (``"calibration": "training images"``): it then flags more than 1 % of new in-distribution images.

**The file.** ``drift.safetensors`` beside the adapter weights: ``means`` (classes x dim, float32) and
``whiten`` (the lower-triangular Cholesky factor L of the shared precision matrix, packed row by row: dim*(dim+1)/2
float32; score = min_c ||(z - m_c) L||^2). For the default 160-wide embedding and 6 classes: about 55 KB. It is
described in adapter.json's ``"drift"`` field (``drift_meta``), so ``adapter_files`` lists it and ``edgekit
package`` hashes it into the signed manifest like the weights.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edgekit.errors import EdgekitError

DRIFT_NAME = "drift.safetensors"
MAHALANOBIS = "mahalanobis-embedding"
ENERGY = "energy-logits"
METHODS = (MAHALANOBIS, ENERGY)
DEFAULT_PERCENTILE = 99.0
DEFAULT_CALIBRATION = 0.1
MIN_CALIBRATION = 20  # fewer held-out images than this: calibrate on the training images (and say so)
RIDGE = 1e-3  # shared covariance + RIDGE * (mean variance) * I: keeps it invertible (dead ReLU units)


def calibration_split(labels: Sequence[int], fraction: float = DEFAULT_CALIBRATION, seed: int = 0,
                      minimum: int = MIN_CALIBRATION) -> Tuple[np.ndarray, np.ndarray]:
    """``(fit, calibration)`` index arrays: ``round(fraction * n)`` images of each class (seeded, at least one of
    a class with 2+ images) for calibration, the rest to fit on. No calibration part (everything fits) when
    ``fraction`` is 0 or the calibration part would be smaller than ``minimum`` images."""
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    if fraction <= 0:
        return everything, everything[:0]
    rng = np.random.default_rng(seed)
    cal = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        k = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        if k > 0:
            cal += rng.choice(idx, size=k, replace=False).tolist()
    if len(cal) < minimum:
        return everything, everything[:0]
    cal = np.array(sorted(cal))
    return np.setdiff1d(everything, cal), cal


def _pack_tril(m: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(m[np.tril_indices(m.shape[0])], dtype=np.float32)


def _unpack_tril(packed: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((dim, dim), dtype=np.float32)
    out[np.tril_indices(dim)] = packed
    return out


def energy(logits: np.ndarray) -> np.ndarray:
    """``-logsumexp`` over each row of the logits (every head's, concatenated): high = unlike the training data."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return -(np.log(np.exp(x - top).sum(axis=1)) + top[:, 0])


class DriftScorer:
    """Per-image out-of-distribution score and its calibrated threshold (see the module docstring).

    ``score(feats, logits)``: ``feats`` the backbone's pooled features ``N x feature_dim`` (the adapter input),
    ``logits`` every head's logits concatenated ``N x sum(head sizes)``; either may be None when the method does
    not need it (``embedding=``: the adapter's embedding of ``feats`` when the caller already has it).
    ``flagged(scores)``: score above the threshold.
    """

    def __init__(self, method: str, threshold: float, percentile: float = DEFAULT_PERCENTILE,
                 means: Optional[np.ndarray] = None, whiten: Optional[np.ndarray] = None, embed=None,
                 info: Optional[Mapping[str, Any]] = None):
        if method not in METHODS:
            raise EdgekitError(f"drift: unknown method {method!r} (known: {', '.join(METHODS)})")
        self.method = method
        self.threshold = float(threshold)
        self.percentile = float(percentile)
        self.means = None if means is None else np.ascontiguousarray(means, dtype=np.float32)
        self.whiten = None if whiten is None else np.ascontiguousarray(whiten, dtype=np.float32)
        self.embed = embed  # feats -> embedding (a NumpyAdapter's embed); needed by score(feats) only
        self.info = dict(info or {})
        if method == MAHALANOBIS:
            if self.means is None or self.whiten is None:
                raise EdgekitError("drift: the Mahalanobis method needs class means and the whitening matrix")
            self._means_w = self.means.astype(np.float64) @ self.whiten.astype(np.float64)

    @property
    def dim(self) -> int:
        return 0 if self.means is None else int(self.means.shape[1])

    # --- fitting (adapt time) -------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, method: str = MAHALANOBIS, embeddings: Optional[np.ndarray] = None,
            groups: Optional[Sequence[int]] = None, embed=None) -> "DriftScorer":
        """Statistics from the training images: ``embeddings`` ``N x dim`` and ``groups`` (one class id per row:
        the (head, class) it belongs to). The threshold is NaN until ``calibrate``."""
        if method == ENERGY:
            return cls(ENERGY, float("nan"), embed=embed)
        if method != MAHALANOBIS:
            raise EdgekitError(f"drift: unknown method {method!r} (known: {', '.join(METHODS)})")
        z = np.asarray(embeddings, dtype=np.float64)
        g = np.asarray(groups)
        if z.ndim != 2 or len(z) != len(g) or len(z) < 2:
            raise EdgekitError("drift: need two or more embeddings, one group id each")
        ids = np.unique(g)
        means = np.stack([z[g == k].mean(axis=0) for k in ids])
        resid = z - means[np.searchsorted(ids, g)]
        cov = resid.T @ resid / len(z)
        cov += RIDGE * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
        precision = np.linalg.inv(cov)
        whiten = np.linalg.cholesky((precision + precision.T) / 2)  # precision = L L^T
        # stored as float32: the fitted scorer uses the very numbers the file holds, so a reload scores the same
        return cls(MAHALANOBIS, float("nan"), means=means.astype(np.float32), whiten=whiten.astype(np.float32),
                   embed=embed)

    def calibrate(self, scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> "DriftScorer":
        """Set the threshold to the ``percentile`` of in-distribution ``scores`` (held-out images)."""
        s = np.asarray(scores, dtype=np.float64)
        if s.size == 0 or not np.all(np.isfinite(s)):
            raise EdgekitError("drift: calibration needs finite scores of one or more images")
        self.percentile = float(percentile)
        # the (n+1)p-th smallest score ("weibull" plotting position): a new in-distribution image lies above it
        # with probability 1 - p in expectation; numpy's default (n-1)p rule flags more when n is small (14 %
        # instead of 10 % at p=90, n=20). With fewer than 1/(1-p) - 1 images it is the largest score, and the
        # expected rate is 1/(n+1): ``expected_flag_rate``.
        self.threshold = float(np.percentile(s, percentile, method="weibull"))
        self.info["expected_flag_rate"] = round(max(1 - self.percentile / 100, 1 / (s.size + 1)), 4)
        return self

    # --- scoring (station) ------------------------------------------------------------------------------------------

    def score_embedding(self, z: np.ndarray) -> np.ndarray:
        zw = np.asarray(z, dtype=np.float64) @ self.whiten.astype(np.float64)
        best = np.full(len(zw), np.inf)
        for m in self._means_w:  # a loop over classes: N x dim at a time, never N x classes x dim
            np.minimum(best, ((zw - m) ** 2).sum(axis=1), out=best)
        return best

    def score(self, feats: Optional[np.ndarray] = None, logits: Optional[np.ndarray] = None,
              embedding: Optional[np.ndarray] = None) -> np.ndarray:
        """One float64 score per image (higher = more unlike the adapter's training images)."""
        if self.method == ENERGY:
            if logits is None:
                raise EdgekitError("drift: the energy score needs the logits")
            return energy(logits)
        if embedding is None:
            if feats is None or self.embed is None:
                raise EdgekitError("drift: the Mahalanobis score needs the features and the adapter (or the embedding)")
            embedding = self.embed(np.asarray(feats, dtype=np.float32))
        with np.errstate(over="ignore", invalid="ignore"):
            s = self.score_embedding(embedding)
        return np.where(np.isfinite(s), s, np.inf)  # a NaN feature is as novel as it gets, never "in distribution"

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    # --- the file -------------------------------------------------------------------------------------------------

    def to_arrays(self) -> Dict[str, np.ndarray]:
        if self.method == ENERGY:
            return {"threshold": np.array([self.threshold], dtype=np.float64)}
        return {"means": self.means, "whiten": _pack_tril(self.whiten),
                "threshold": np.array([self.threshold], dtype=np.float64)}

    def to_bytes(self) -> bytes:
        import safetensors.numpy

        return safetensors.numpy.save(self.to_arrays())

    def meta(self, **extra) -> dict:
        """The ``"drift"`` field of adapter.json."""
        out = {"file": DRIFT_NAME, "method": self.method, "threshold": self.threshold, "percentile": self.percentile,
               "dim": self.dim}
        if self.means is not None:
            out["classes"] = int(self.means.shape[0])
        out.update(extra)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any], embed=None) -> "DriftScorer":
        """The scorer from the drift file's arrays and adapter.json's ``"drift"`` field; checked: shapes, finite
        values, the threshold the file and adapter.json both record."""
        method = info.get("method")
        if method not in METHODS:
            raise EdgekitError(f"drift: unknown method {method!r} (known: {', '.join(METHODS)})")
        thr = arrays.get("threshold")
        if thr is None or thr.shape != (1,) or not np.isfinite(thr[0]):
            raise EdgekitError("drift file: no finite threshold")
        if not isinstance(info.get("threshold"), (int, float)) or float(thr[0]) != float(info["threshold"]):
            raise EdgekitError("drift file: its threshold differs from adapter.json's")
        pct = info.get("percentile", DEFAULT_PERCENTILE)
        if method == ENERGY:
            return cls(ENERGY, float(thr[0]), pct, embed=embed, info=info)
        dim = info.get("dim")
        means, packed = arrays.get("means"), arrays.get("whiten")
        if not isinstance(dim, int) or not 1 <= dim <= 16384:
            raise EdgekitError(f"drift: dim {dim!r} is not an integer in 1..16384")
        if means is None or means.ndim != 2 or means.shape[1] != dim or not 1 <= means.shape[0] <= 100_000:
            raise EdgekitError(f"drift file: means must be classes x {dim}")
        if packed is None or packed.shape != (dim * (dim + 1) // 2,):
            raise EdgekitError(f"drift file: whiten must hold {dim * (dim + 1) // 2} values (a packed {dim}x{dim} "
                               "triangle)")
        if means.dtype != np.float32 or packed.dtype != np.float32:
            raise EdgekitError("drift file: means and whiten must be float32")
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(packed))):
            raise EdgekitError("drift file: non-finite values")
        return cls(MAHALANOBIS, float(thr[0]), pct, means=means, whiten=_unpack_tril(packed, dim), embed=embed,
                   info=info)

    @classmethod
    def from_adapter(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                     drift_arrays: Optional[Mapping[str, np.ndarray]] = None) -> Optional["DriftScorer"]:
        """The scorer of an adapter: ``arrays`` its weights (``load_adapter_arrays``), ``meta`` its adapter.json
        fields. The drift arrays are ``drift_arrays`` or read from ``meta["folder"]`` (the adapter folder) /
        the file adapter.json names. None when the adapter carries no drift statistics (saved before they
        existed): the station then reports drift as unavailable. EdgekitError for a file that is there but
        broken."""
        info = meta.get("drift")
        if not info:
            return None
        if not isinstance(info, Mapping):
            raise EdgekitError("adapter.json: 'drift' must be an object")
        if drift_arrays is None:
            folder = meta.get("folder")
            if folder is None:
                raise EdgekitError("drift: the adapter folder is not known (pass drift_arrays or meta['folder'])")
            path = Path(folder) / str(info.get("file", DRIFT_NAME))
            try:
                data = path.read_bytes()
            except OSError as e:
                raise EdgekitError(f"drift file {path} is not readable ({e.strerror or e})") from None
            from edgekit.mlff.adapter import load_weights_bytes

            drift_arrays = load_weights_bytes(path.name, data)
        embed = None
        if info.get("method") == MAHALANOBIS:
            from edgekit.mlff.heads import NumpyAdapter

            adapter = NumpyAdapter(arrays, meta["config"])
            if adapter.fc_dim != info.get("dim"):
                raise EdgekitError(f"drift: dim {info.get('dim')} differs from the adapter's embedding "
                                   f"({adapter.fc_dim})")
            embed = adapter.embed
        return cls.from_arrays(drift_arrays, info, embed=embed)


def check_drift_meta(info: Any, where: str) -> None:
    """adapter.json's ``"drift"`` field: an object naming a plain .safetensors file, a known method and a finite
    threshold (the contents are checked when the file is loaded)."""
    from edgekit.mlff.adapter import is_plain_file_name

    if not isinstance(info, Mapping):
        raise EdgekitError(f"{where}: 'drift' must be an object")
    name = info.get("file")
    if not (is_plain_file_name(name) and name.endswith(".safetensors")):
        raise EdgekitError(f"{where}: drift file {name!r} must be a plain file name ending in .safetensors")
    if info.get("method") not in METHODS:
        raise EdgekitError(f"{where}: drift method {info.get('method')!r} is not one of {', '.join(METHODS)}")
    thr = info.get("threshold")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not np.isfinite(thr):
        raise EdgekitError(f"{where}: drift threshold {thr!r} is not a finite number")


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of "out" scoring above "in" (ties count half): the probability that a random
    out-of-distribution image scores higher than a random in-distribution one."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    s = np.concatenate([a, b])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_in, n_out = len(a), len(b)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


# --------------------------------------------------------------------------------------------------------------------
# the review folder
# --------------------------------------------------------------------------------------------------------------------

INBOX = "inbox"  # reserved: `edgekit adapt --data DIR` ignores DIR/inbox (unlabelled images waiting for a class)
REVIEW_LOG = "review.jsonl"
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"),
          (b"MM\x00*", ".tif"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _json_safe(value):
    """Non-finite floats (an infinite score) as null: review.jsonl stays plain JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _plain_name(name: str, data: bytes) -> str:
    """A plain file name for a copied image: only ``A-Z a-z 0-9 . _ -``, no leading dot, at most 100 characters,
    ending in an image extension (taken from the bytes when the name has none, so ``edgekit adapt`` reads it)."""
    from edgekit.data.images import is_image_name

    base = _UNSAFE.sub("_", Path(str(name)).name).lstrip(".-") or "image"
    base = base[-100:]
    if not is_image_name(base):
        ext = next((e for magic, e in _MAGIC if data.startswith(magic)), ".img")
        base += ext
    return base


class ReviewFolder:
    """Flagged images for an operator to label, bounded.

    ``offer(image, name, info)`` copies the image (a path or its encoded bytes) to
    ``DIR/inbox/<UTC time>-<name>`` (written to a hidden temporary file, then renamed: a file under its final name
    is complete) and appends one JSON line to ``DIR/inbox/review.jsonl`` (``file``, ``name``, ``time`` and the
    ``info`` dict: scores, the serving class, versions). At most ``max_files`` images / ``max_bytes`` bytes
    (default 1,000 / 200 MiB) wait in the inbox: past that ``offer`` copies nothing, returns False and counts it
    (``refused``); labelling (moving files out of the inbox) makes room again. An image that cannot be read or
    written (vanished source, full disk) is also False, counted in ``errors``: a station never stops for it.

    Labelling = moving images into ``DIR/<class>/``; then ``edgekit adapt --data DIR`` takes DIR as it is:
    ``inbox`` is a reserved folder name the class-folder reader skips.
    """

    RESCAN_S = 5.0  # when full, look at the inbox again at most this often (the operator may have moved files)

    def __init__(self, folder: str | os.PathLike, max_files: int = 1000, max_bytes: int = 200 * 1024 * 1024):
        if max_files < 1 or max_bytes < 1:
            raise EdgekitError("review folder: max_files and max_bytes must be >= 1")
        self.folder = Path(folder)
        self.inbox = self.folder / INBOX
        self.log = self.inbox / REVIEW_LOG
        self.max_files, self.max_bytes = int(max_files), int(max_bytes)
        try:
            self.inbox.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EdgekitError(f"review folder {self.inbox} cannot be created ({e.strerror or e})") from None
        self._lock = threading.Lock()
        self.copied = self.refused = self.errors = 0
        self._scan()

    def _scan(self) -> None:
        files = n = 0
        for p in self.inbox.iterdir():
            if p.name == REVIEW_LOG or p.name.startswith(".") or not p.is_file():
                continue
            files += 1
            n += p.stat().st_size
        self.files, self.bytes, self._scanned = files, n, time.monotonic()

    def _room(self, size: int) -> bool:
        return self.files + 1 <= self.max_files and self.bytes + size <= self.max_bytes

    def offer(self, image: Union[bytes, bytearray, str, os.PathLike], name: str,
              info: Optional[Mapping[str, Any]] = None) -> bool:
        """Copy one image into the inbox; False (counted in ``refused``) when the inbox is full."""
        try:
            data = bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        except OSError:
            with self._lock:
                self.errors += 1
            return False
        with self._lock:
            if not self._room(len(data)) and time.monotonic() - self._scanned >= self.RESCAN_S:
                self._scan()
            if not self._room(len(data)):
                self.refused += 1
                return False
            now = datetime.now(timezone.utc)
            fname = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{_plain_name(name, data)}"
            final = self.inbox / fname
            k = 1
            while final.exists():
                final = self.inbox / f"{Path(fname).stem}-{k}{Path(fname).suffix}"
                k += 1
            tmp = self.inbox / f".{final.name}.tmp"
            line = {"file": final.name, "name": str(name), "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "bytes": len(data), **dict(info or {})}
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                with open(self.log, "a", encoding="utf-8") as f:  # one write per line: lines never interleave
                    f.write(json.dumps(_json_safe(line), default=str, allow_nan=False) + "\n")
            except OSError:
                for leftover in (tmp,):
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass
                self.errors += 1
                return False
            self.files += 1
            self.bytes += len(data)
            self.copied += 1
            return True

    def stats(self) -> dict:
        with self._lock:
            return {"folder": str(self.folder), "files": self.files, "bytes": self.bytes, "copied": self.copied,
                    "refused": self.refused, "errors": self.errors, "max_files": self.max_files,
                    "max_bytes": self.max_bytes}
