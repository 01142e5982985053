"""Continual learning with MLFF adapters: a local adapter registry, cached backbone features, rehearsal
and distillation. Behind ``edgekit adapt`` / ``edgekit adapters``.

The registry folder's format is ``edgekit.mlff.registry``; this module trains what goes into it.

Backbone features are computed once per image and cached on disk under
``<cache>/<backbone id>-<weights sha256[:12]>-<preprocess hash>/<image sha256>.npy``; a cached feature
is the same float32 vector that recomputing gives. Training then runs on the cached vectors only.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.models.mlff import SETTINGS, MLFFAdapter
from edgekit.mlff.registry import Registry
from edgekit.utils import atomic_write, sha256_file

SD900_PREFIX = {"In": "inclusion", "Pa": "patches", "Sc": "scratches"}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

@dataclass
class TaskData:
    """Images of one task: paths, a label index per image, and the class names."""
    paths: List[Path]
    labels: List[int]
    classes: List[str]

    def __post_init__(self):
        if not self.paths:
            raise EdgekitError("no images for this task")
        if len(self.paths) != len(self.labels):
            raise EdgekitError("task data: one label per image needed")

    def limited(self, n: Optional[int]) -> "TaskData":
        """At most ``n`` images, taken round-robin over the classes (``--limit``: every class keeps images,
        in each class the first ones in folder order)."""
        if not n or n >= len(self.paths):
            return self
        queues = [[i for i, y in enumerate(self.labels) if y == c] for c in range(len(self.classes))]
        keep: List[int] = []
        while len(keep) < n:
            for q in queues:
                if q and len(keep) < n:
                    keep.append(q.pop(0))
        keep.sort()
        return TaskData([self.paths[i] for i in keep], [self.labels[i] for i in keep], self.classes)


RESERVED_FOLDERS = ("inbox",)  # a station's review inbox (edgekit.mlff.drift.ReviewFolder): unlabelled images


def task_data_from_folder(root: str | os.PathLike, classes: Optional[Sequence[str]] = None) -> TaskData:
    """Class-per-folder images (``root/<class>/*``), or the SD-Saliency-900 layout
    (``root/Source Images/{In,Pa,Sc}_*.bmp``: classes by file-name prefix).

    A folder named ``inbox`` is not a class: it is reserved for the images a station's review folder
    (``edgekit station --review DIR``) copied and nobody has labelled yet; labelling moves them into
    ``DIR/<class>/``, and then DIR is read as it is."""
    from edgekit.data.datasets import load_class_folders
    from edgekit.data.images import is_image_name

    root = Path(root)
    if not root.is_dir():
        raise EdgekitError(f"data folder not found: {root}")
    src = root / "Source Images"
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and is_image_name(p))
        by_cls: Dict[str, List[Path]] = {}
        for p in files:
            name = SD900_PREFIX.get(p.stem.split("_")[0])
            if name:
                by_cls.setdefault(name, []).append(p)
        names = list(classes) if classes else sorted(by_cls)
        missing = [c for c in names if c not in by_cls]
        if missing or not names:
            raise EdgekitError(f"no images of class {', '.join(missing) or '(any)'} in {src}")
        paths, labels = [], []
        for i, c in enumerate(names):
            paths += by_cls[c]
            labels += [i] * len(by_cls[c])
        return TaskData(paths, labels, names)
    reserved = sorted(set(classes or ()) & set(RESERVED_FOLDERS))
    if reserved:
        raise EdgekitError(f"'{reserved[0]}' is not a class name: {root}/{reserved[0]} is reserved for a review "
                           "folder's unlabelled images")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in RESERVED_FOLDERS)
    if not folders:
        skipped = [n for n in RESERVED_FOLDERS if (root / n).is_dir()]
        why = (f"; {root}/{skipped[0]} holds unlabelled review images and is not read: move them into "
               f"{root}/<class>/ first" if skipped else "")
        raise EdgekitError(f"no class folders in {root} (expected {root}/<class>/<images>){why}")
    samples, names = load_class_folders(root, classes or folders)
    return TaskData([s.path for s in samples], [s.label for s in samples], list(names))


# --------------------------------------------------------------------------------------------------
# features, with an on-disk cache
# --------------------------------------------------------------------------------------------------

def _cache_folder(backbone, cache_dir: Path) -> Path:
    spec = hashlib.sha256(json.dumps(backbone.input_spec, sort_keys=True).encode()).hexdigest()[:8]
    pools = "".join(k[0] for k in backbone.pools)
    return Path(cache_dir) / f"{backbone.id}-{backbone.weights_sha256[:12]}-{spec}-{pools}"


def extract_features(backbone, paths: Sequence[Path], cache_dir: Optional[str | os.PathLike] = None,
                     batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """Pooled tap features ``N x backbone.feature_dim`` (float32) for image files, cached when ``cache_dir``;
    ``progress``: a bar over the images not in the cache (``edgekit.progress``'s rules)."""
    from edgekit.data.images import read_gray
    from edgekit.progress import progress as progress_bar

    folder = _cache_folder(backbone, Path(cache_dir)) if cache_dir else None
    out = np.zeros((len(paths), backbone.feature_dim), dtype=np.float32)
    todo = []
    for i, p in enumerate(paths):
        key = sha256_file(p) if folder else None
        f = folder / f"{key}.npy" if folder else None
        if f is not None and f.is_file():
            try:
                v = np.load(f, allow_pickle=False)
                if v.shape == (backbone.feature_dim,):
                    out[i] = v
                    continue
            except (OSError, ValueError):
                pass  # unreadable cache entry: recompute it
        todo.append((i, p, f))
    cached = f" ({len(paths) - len(todo)} cached)" if len(todo) < len(paths) else ""
    with progress_bar(len(todo), f"adapt: backbone features{cached}", enabled=progress and bool(todo)) as bar:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            x = backbone.preprocess([read_gray(p) for _, p, _ in chunk])
            with torch.inference_mode():
                v = backbone.pooled(x).float().numpy()
            for (i, _, f), row in zip(chunk, v):
                out[i] = row
                if f is not None:
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(row), allow_pickle=False)
                    with atomic_write(f) as fh:
                        fh.write(buf.getvalue())
            bar.update(len(chunk))
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------

def train_adapter(adapter: MLFFAdapter, feats: torch.Tensor, heads: torch.Tensor, labels: torch.Tensor, *,
                  epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                  weight_decay: float = 1e-4, teacher: Optional[MLFFAdapter] = None, distill: float = 0.0,
                  balanced: bool = True, progress: bool = True) -> float:
    """Train ``adapter`` (all its parameters) on feature vectors; each sample names its head and label.

    ``teacher`` + ``distill``: add ``distill * MSE(embed, teacher.embed)`` on every batch (the previous
    adapter's fused embedding). ``balanced``: weight the loss so each (head, class) counts the same, so a
    rehearsal buffer of K images per old class is not drowned out by the new task. ``progress``: a bar over
    the epochs (``edgekit.progress``'s rules). Returns seconds.
    """
    from edgekit.progress import track

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = feats.shape[0]
    keys = heads * 100000 + labels
    uniq, inv, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    w = (n / (len(uniq) * counts.float()))[inv] if balanced else torch.ones(n)
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, (n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    if teacher is not None:
        teacher.eval()
    adapter.train()
    for _ in track(range(epochs), epochs, "adapt: training the adapter", enabled=progress, unit="epoch"):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            if len(idx) < 2:  # BatchNorm1d needs two samples
                continue
            x, h, y, wi = feats[idx], heads[idx], labels[idx], w[idx]
            z = adapter.embed(x)
            loss = torch.zeros(())
            for head in torch.unique(h).tolist():
                m = h == head
                ce = F.cross_entropy(adapter.heads[head](z[m]), y[m], reduction="none")
                loss = loss + (ce * wi[m]).sum()
            loss = loss / wi.sum()
            if teacher is not None and distill > 0:
                with torch.no_grad():
                    zt = teacher.embed(x)
                loss = loss + distill * F.mse_loss(z, zt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    adapter.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def predict_heads(adapter: MLFFAdapter, feats: torch.Tensor, head: int) -> torch.Tensor:
    adapter.eval()
    return adapter(feats, head).argmax(dim=1)


def select_exemplars(labels: Sequence[int], k: int, seed: int) -> List[int]:
    """``k`` indices per class, chosen at random with a fixed seed (all of a class if it has fewer)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        out += sorted(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return out


@torch.no_grad()
def _fit_drift(adapter: MLFFAdapter, method: str, percentile: float, x_fit: torch.Tensor, h_fit: torch.Tensor,
               y_fit: torch.Tensor, x_cal: torch.Tensor):
    """The drift statistics of a trained adapter (``edgekit.mlff.drift``): fitted on what it trained on (this
    task's images and the rehearsal exemplars of earlier classes), the threshold calibrated on ``x_cal`` (held
    out of training) or, when there is none, on the training images. Returns (adapter.json's "drift" field,
    {file name: bytes})."""
    from edgekit.mlff.drift import DriftScorer

    t0 = time.perf_counter()
    adapter.eval()
    z_fit = adapter.embed(x_fit).float().numpy()
    groups = (h_fit * 100000 + y_fit).numpy()  # one mean per (head, class)
    scorer = DriftScorer.fit(method, z_fit, groups)

    def scores(x, z=None):
        if len(x) == 0:
            return np.zeros(0)
        z = adapter.embed(x) if z is None else torch.from_numpy(z)
        logits = torch.cat([h(z) for h in adapter.heads], dim=1).float().numpy()
        return scorer.score(logits=logits, embedding=z.float().numpy())

    held_out = len(x_cal) > 0
    cal = scores(x_cal) if held_out else scores(x_fit, z_fit)
    scorer.calibrate(cal, percentile)
    info = scorer.meta(fitted_on=int(len(x_fit)), calibrated_on=int(len(cal)),
                       calibration="held-out images" if held_out else "training images",
                       calibration_flag_rate=round(float(scorer.flagged(cal).mean()), 4),
                       # on training images the rate on new images is higher than the percentile says: unknown
                       expected_flag_rate=scorer.info["expected_flag_rate"] if held_out else None)
    data = scorer.to_bytes()
    info["bytes"] = len(data)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info, {info["file"]: data}


def add_task(registry: str | os.PathLike, backbone, task: str, data: TaskData, *,
             setting: str = "class-incremental", rehearsal: int = 20, distill: float = 0.0, epochs: int = 30,
             seed: int = 0, fc_dim: int = 160, cache_dir: Optional[str | os.PathLike] = "default",
             lr: float = 2e-3, batch_size: int = 64, feats: Optional[torch.Tensor] = None,
             drift: Optional[str] = "mahalanobis-embedding", drift_holdout: float = 0.1,
             drift_percentile: float = 99.0) -> dict:
    """Add one task to a registry: features (cached), train the adapter with rehearsal/distillation, save.

    ``drift``: the out-of-distribution statistics saved beside the adapter (``edgekit.mlff.drift``; None: none).
    ``drift_holdout`` of each class's images (when that makes ``drift.MIN_CALIBRATION`` images or more) are
    kept out of the adapter's training and the statistics: the threshold is the ``drift_percentile`` of their
    scores. Returns a summary (task, classes, trainable parameters, seconds, adapter folder and bytes, drift).
    """
    from edgekit.mlff import drift as drift_mod
    from edgekit.mlff.adapter import save_adapter
    from edgekit.mlff.names import check_name

    if setting not in SETTINGS:
        raise EdgekitError(f"--setting must be one of {', '.join(SETTINGS)}, not {setting!r}")
    check_name(task, "task name")
    if rehearsal < 0 or distill < 0 or epochs < 1:
        raise EdgekitError("--rehearsal and --distill must be >= 0 and --epochs >= 1")
    if drift is not None and drift not in drift_mod.METHODS:
        raise EdgekitError(f"drift method must be one of {', '.join(drift_mod.METHODS)}, not {drift!r}")
    if not 0 <= drift_holdout < 1 or not 50 <= drift_percentile < 100:
        raise EdgekitError("--drift-holdout must be in [0, 1) and the drift percentile in [50, 100)")
    reg = Registry.open_or_create(registry, backbone, setting, fc_dim)
    if any(t["task"] == task for t in reg.tasks):
        raise EdgekitError(f"task {task!r} is already in registry {reg.folder}; pick a new task name")
    if reg.tasks and reg.meta["backbone_sha256"] != backbone.weights_sha256:
        raise EdgekitError(f"backbone weights changed since registry {reg.folder} was made (sha256 differs)")
    seen = [c for t in reg.tasks for c in t["classes"]]
    if setting == "class-incremental":
        dup = sorted(set(seen) & set(data.classes))
        if dup:
            raise EdgekitError(f"class-incremental: class {', '.join(dup)} already belongs to an earlier task; "
                               "give new classes (or use --setting task-incremental)")
    fc_dim = int(reg.meta["fc_dim"])
    if cache_dir == "default":
        cache_dir = reg.folder / "cache"

    if feats is None:
        feats = extract_features(backbone, data.paths, cache_dir)
    labels = torch.tensor(data.labels, dtype=torch.long)
    old = reg.load_adapter()
    step = len(reg.tasks)
    torch.manual_seed(seed)  # the new adapter / head initialisation is reproducible from --seed
    if old is None:
        adapter = MLFFAdapter(backbone.tap_dims, fc_dim)
        adapter.add_head(len(data.classes))
    else:
        adapter = copy.deepcopy(old)
        if setting == "class-incremental":
            adapter.grow_head(len(data.classes), 0)
        else:
            adapter.add_head(len(data.classes))
    if setting == "class-incremental":
        heads = torch.zeros_like(labels)
        targets = labels + len(seen)
    else:
        heads = torch.full_like(labels, step)
        targets = labels
    # the drift threshold's held-out images: not trained on, so they score as new images of these classes do
    fit_idx, cal_idx = (drift_mod.calibration_split(data.labels, drift_holdout, seed) if drift is not None
                        else (np.arange(len(data.labels)), np.arange(0)))
    fit_t = torch.from_numpy(fit_idx)
    ex = reg.load_exemplars()
    x_all, h_all, y_all = feats[fit_t], heads[fit_t], targets[fit_t]
    if ex is not None and rehearsal > 0:
        x_all = torch.cat([x_all, ex["features"]])
        h_all = torch.cat([h_all, ex["heads"]])
        y_all = torch.cat([y_all, ex["labels"]])
    teacher = old if (old is not None and distill > 0) else None
    seconds = train_adapter(adapter, x_all, h_all, y_all, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                            teacher=teacher, distill=distill)
    drift_info, drift_files = None, {}
    if drift is not None:
        drift_info, drift_files = _fit_drift(adapter, drift, drift_percentile, x_all, h_all, y_all,
                                             feats[torch.from_numpy(cal_idx)])
        if drift_info.get("classes", 0) < sum(adapter.head_sizes) and drift == drift_mod.MAHALANOBIS:
            # class-incremental without rehearsal: the earlier classes have no features here, so their images
            # score as novel; said in adapt's note
            drift_info["covers"] = f"{drift_info['classes']} of {sum(adapter.head_sizes)} classes"

    # rehearsal buffer: K exemplars of each class of this task, added to the earlier ones (drawn from all its
    # images, the drift calibration part too: later adapters may train on those)
    if rehearsal > 0:
        keep = torch.tensor(select_exemplars(data.labels, rehearsal, seed), dtype=torch.long)
        new = {"features": feats[keep], "heads": heads[keep], "labels": targets[keep]}
        if ex is not None:
            new = {k: torch.cat([ex[k], new[k]]) for k in new}
        reg.folder.mkdir(parents=True, exist_ok=True)
        reg.save_exemplars(new)

    tasks = [{"task": t["task"], "classes": t["classes"]} for t in reg.tasks] + [{"task": task, "classes": list(data.classes)}]
    all_classes = [c for t in tasks for c in t["classes"]]
    rel = f"adapters/{step + 1:02d}-{task}"
    config = {"setting": setting, "fc_dim": fc_dim, "tap_dims": backbone.tap_dims, "tap_names": backbone.tap_names,
              "pools": backbone.pools, "head_sizes": adapter.head_sizes, "tasks": tasks}
    meta = {"task": task, "classes": all_classes if setting == "class-incremental" else list(data.classes),
            "backbone": backbone.id, "backbone_sha256": backbone.weights_sha256, "input": backbone.input_spec,
            "config": config, "model": "mlff-adapter",
            "training": {"rehearsal": rehearsal, "distill": distill, "epochs": epochs, "seed": seed,
                         "images": len(fit_idx), "seconds": round(seconds, 3)}}
    if drift_info is not None:
        meta["drift"] = drift_info
    save_adapter(reg.folder / rel, adapter.state_dict(), meta, files=drift_files)
    nbytes = sum(f.stat().st_size for f in (reg.folder / rel).iterdir() if f.is_file())
    entry = {"task": task, "classes": list(data.classes), "adapter": rel, "images": len(data.paths),
             "rehearsal": rehearsal, "distill": distill, "epochs": epochs, "seed": seed,
             "train_seconds": round(seconds, 3), "trainable_parameters": adapter.trainable_parameters(),
             "adapter_bytes": nbytes, **({"drift": drift_info} if drift_info is not None else {}),
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    reg.meta["tasks"].append(entry)
    reg.save()
    return {**entry, "adapter_folder": str(reg.folder / rel), "setting": setting, "backbone": backbone.id,
            "model": adapter}
