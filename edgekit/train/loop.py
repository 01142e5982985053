"""The training loop behind ``edgekit train``.

Writes into the output folder:

* ``last.pt``  - the full training state (model, optimizer, scheduler, grad scaler, iteration, RNG
  states, best-so-far, history and the recipe), saved atomically every ``train.checkpoint_every``
  iterations and at the end; ``--resume`` continues from it;
* ``best.pt``  - an edgekit ``Checkpoint`` of the weights with the best val IoU so far, with the
  preprocess spec at the training input size, classes, provenance and metrics (at the end also the
  test split's MAE / IoU / max F);
* ``report.json`` - the final evaluation of ``best.pt`` on the test split, overall and per class.

Batches and augmentation are pure functions of (seed, iteration) and the global RNG states are
saved, so on the CPU a resumed run reproduces an uninterrupted one bit for bit.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from edgekit import __version__
from edgekit.data.datasets import SegDataset, open_segmentation
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError
from edgekit.models.checkpoint import Checkpoint, load_checkpoint, load_state_dict_strict
from edgekit.models.gmbinet import GMBINet, GMBINetConfig
from edgekit.data.datasets import limit_samples
from edgekit.train import distributed
from edgekit.train.data import EpochSampler, batch_generator, build_trainset, make_batch, preload
from edgekit.train.losses import DeepSupervisionLoss
from edgekit.train.recipe import Recipe
from edgekit.utils import atomic_write

STATE_FORMAT = "edgekit-train-state"
STATE_VERSION = 1


class CosineSchedule:
    """Linear warm-up, then cosine annealing from the optimizer's base lr to ``min_lr`` at ``total``.

    Closed form in the iteration (no recursive updates), so its whole state is ``iteration``.
    ``name="constant"`` keeps the base lr after the warm-up.
    """

    def __init__(self, optimizer, base_lr: float, min_lr: float, total: int, warmup: int = 0, name: str = "cosine"):
        self.optimizer, self.base_lr, self.min_lr = optimizer, float(base_lr), float(min_lr)
        self.total, self.warmup, self.name = int(total), int(warmup), name
        self.iteration = 0
        self._apply()

    def lr_at(self, it: int) -> float:
        if self.warmup and it < self.warmup:
            return self.base_lr * (it + 1) / self.warmup
        if self.name == "constant":
            return self.base_lr
        span = max(1, self.total - self.warmup)
        t = min(1.0, max(0, it - self.warmup) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def _apply(self):
        lr = self.lr_at(self.iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self):
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"name": self.name, "iteration": self.iteration, "total": self.total, "warmup": self.warmup,
                "base_lr": self.base_lr, "min_lr": self.min_lr}

    def load_state_dict(self, d: dict) -> None:
        # The schedule's shape comes from the recipe (a resumed run may extend ``iterations``).
        self.iteration = int(d["iteration"])
        self._apply()


@dataclass
class TrainResult:
    out_dir: Path
    best: Optional[Path]
    last: Path
    report: Optional[Path]
    iteration: int
    best_val_iou: float
    best_iteration: int
    test: Optional[dict] = None
    stopped_early: bool = False
    wall_s: float = 0.0


# ----------------------------------------------------------------------------------------------
# helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _resolve_device(recipe: Recipe) -> torch.device:
    want = recipe.train.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        prof = f"profile {recipe.profile!r} " if recipe.profile else "the recipe "
        raise EdgekitError(f"{prof}trains on CUDA (train.device: cuda) but no CUDA device is available; "
                           "use --profile cpu")
    return torch.device(want)


def _split_file_sha(data: str) -> Optional[str]:
    p = Path(data) / "split.json"
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return None


def _config_diff(a: dict, b: dict) -> List[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if _norm(a.get(k)) != _norm(b.get(k))]


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def load_train_state(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"resume: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgekitError(f"resume: cannot read {path} ({first[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise EdgekitError(f"resume: {path} is not a training state (use the run's last.pt; "
                           "best.pt and imported checkpoints hold weights only)")
    if state.get("format_version", 0) > STATE_VERSION:
        raise EdgekitError(f"resume: {path} was written by a newer edgekit")
    return state


def _validate(model: torch.nn.Module, dataset: SegDataset, spec: PreprocessSpec, device: torch.device,
              batch: int) -> dict:
    from edgekit.eval.evaluate import evaluate
    from edgekit.backends.torch_eager import TorchRunner

    # Builds a fresh model (weight init draws from the global RNG): keep the training RNG untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ck = Checkpoint.from_model(model, preprocess=spec)
        runner = TorchRunner(ck, device=str(device))
        return evaluate(runner, dataset, batch_size=batch, show_progress=False)


def _subset(ds: SegDataset, n: Optional[int], what: str) -> SegDataset:
    samples = preload(limit_samples(ds.samples, n), ds.description)
    desc = ds.description if len(samples) == len(ds.samples) else f"{ds.description}, first {len(samples)} (limit)"
    return SegDataset(samples, sorted({s.cls for s in samples}), desc, ds.synthetic)


def _progress(total: int, initial: int, enabled: bool = True):
    from tqdm import tqdm

    disabled = bool(os.environ.get("EDGEKIT_NO_PROGRESS")) or not enabled
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc="train", unit="it", file=sys.stderr, disable=disabled,
                dynamic_ncols=True, mininterval=0.5 if tty else 30.0, smoothing=0.05)


# ----------------------------------------------------------------------------------------------
# the loop


def train(recipe: Recipe, data: Optional[str] = None, out_dir: Optional[str] = None, resume: Optional[str] = None,
          seed: Optional[int] = None, iterations: Optional[int] = None, limit_images: Optional[int] = None,
          stop_after: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
          init: Optional[Checkpoint] = None, teacher: Optional[torch.nn.Module] = None) -> TrainResult:
    """Train ``recipe`` (a resolved profile). ``stop_after`` ends the run after that iteration,
    saving ``last.pt`` (as an interruption would), without the final test evaluation.

    ``init`` fine-tunes a checkpoint instead of training from scratch: its architecture replaces
    the recipe's model section (a pruned model keeps its own widths) and its weights are the start.
    ``teacher`` (an eval-mode model) adds ``loss.distill`` x BCE towards its main-head probabilities.

    Uses ``train.threads`` CPU threads and restores the caller's thread count afterwards."""
    threads = torch.get_num_threads()
    try:
        if init is not None:
            _adopt_init(recipe, init)
        return _train(recipe, data, out_dir, resume, seed, iterations, limit_images, stop_after, log, init, teacher)
    finally:
        torch.set_num_threads(threads)
        distributed.shutdown()


def _adopt_init(r: Recipe, init: Checkpoint) -> None:
    """Point the recipe's model section at ``init``'s architecture; refuse other preprocessing."""
    if init.model_name != r.model.name:
        raise EdgekitError(f"--init: a {init.model_name} checkpoint cannot fine-tune under a {r.model.name} recipe")
    cfg = dict(init.config)
    cfg.pop("upstream_extras", None)
    for k, v in cfg.items():
        if not hasattr(r.model, k):
            raise EdgekitError(f"--init: the recipe's model section has no key {k!r} for this checkpoint")
        setattr(r.model, k, list(v) if isinstance(v, (list, tuple)) else v)
    p = init.preprocess
    mine = (r.preprocess.mean, r.preprocess.std, r.preprocess.scale, r.preprocess.channels)
    theirs = (p.mean, p.std, p.scale, p.channels)
    if any(abs(a - b) > 1e-6 if isinstance(a, float) else a != b for a, b in zip(mine, theirs)):
        raise EdgekitError(f"--init: the checkpoint's preprocessing (mean {p.mean}, std {p.std}, scale {p.scale}, "
                           f"{p.channels} channels) differs from the recipe's; fine-tuning would change its inputs")


def _train(recipe, data, out_dir, resume, seed, iterations, limit_images, stop_after, log, init=None,
           teacher=None) -> TrainResult:
    t_start = time.time()
    r = recipe
    if iterations is not None:
        if iterations < 1:
            raise EdgekitError("--iterations must be >= 1")
        r.train.iterations = int(iterations)
    total = r.train.iterations
    data = data or r.data_path()
    if not data:
        raise EdgekitError("no training data: pass --data DIR (an SD-900 folder) or set data.path in the recipe")
    if out_dir:
        out = Path(out_dir)
    elif resume:
        out = Path(resume).parent  # continue in the run's own folder
    else:
        out = Path("runs") / f"{r.name}-{r.profile or 'base'}"
    last_path, best_path, report_path = out / "last.pt", out / "best.pt", out / "report.json"
    write = log or (lambda msg: None)

    state = None
    if resume:
        state = load_train_state(Path(resume))
        saved_cfg = dict(state["model"]["config"])
        if state.get("init"):  # a fine-tuning run (--init): its architecture is the init checkpoint's
            for k, v in saved_cfg.items():
                if hasattr(r.model, k):
                    setattr(r.model, k, list(v) if isinstance(v, (list, tuple)) else v)
        diff = _config_diff(saved_cfg, r.model.config())
        if diff or state["model"]["name"] != r.model.name:
            raise EdgekitError(f"resume: {resume} has another architecture than the recipe "
                               f"({'; '.join(diff) or state['model']['name']}); refusing to resume")
        if seed is not None and int(seed) != int(state["seed"]):
            raise EdgekitError(f"resume: --seed {seed} differs from the run's seed {state['seed']}")
        seed = int(state["seed"])
        if int(state["iteration"]) > total:
            raise EdgekitError(f"resume: {resume} is at iteration {state['iteration']}, past --iterations {total}")
    elif last_path.exists():
        raise EdgekitError(f"{out} already holds a run (last.pt): pass --resume {last_path} to continue it, "
                           "or choose another --out")
    seed = int(r.train.seed if seed is None else seed)

    device = _resolve_device(r)
    dist = distributed.context(device, r.train.batch)  # one process unless started by torchrun / --nproc
    device = dist.device(device)
    if not dist.is_main:
        write = lambda msg: None  # noqa: E731 - rank 0 logs for the run
    if device.type == "cpu":
        torch.set_num_threads(max(1, r.train.threads // dist.local_world))  # the ranks share the cores
    if r.train.amp == "fp16" and device.type != "cuda":
        raise EdgekitError("train.amp fp16 needs CUDA; use amp: none (or bf16) on the CPU")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _seed_everything(seed)

    spec = PreprocessSpec(mean=r.preprocess.mean, std=r.preprocess.std, input_size=tuple(r.preprocess.input_size),
                          channels=r.preprocess.channels, scale=r.preprocess.scale)
    if spec.channels != r.model.in_channels:
        raise EdgekitError(f"recipe: preprocess.channels {spec.channels} != model.in_channels {r.model.in_channels}")

    # Data: train preloaded as uint8 tensors; val/test preloaded once as samples.
    train_ds = open_segmentation(data, r.data.train_split)
    val_ds = _subset(open_segmentation(data, r.data.val_split), limit_images, "val")
    test_full = open_segmentation(data, r.data.test_split)
    train_samples = limit_samples(train_ds.samples, limit_images)
    train_names = {x.image_path for x in train_ds.samples if x.image_path is not None}  # synthetic: none
    for other in (r.data.val_split, r.data.test_split):
        other_ds = val_ds if other == r.data.val_split else test_full
        shared = train_names & {x.image_path for x in other_ds.samples}
        if shared:
            raise EdgekitError(f"{data}: {len(shared)} images are in both the {r.data.train_split!r} and the "
                               f"{other!r} split (only an SD-900-style folder with split.json has separate splits)")
    ts = build_trainset(train_ds, train_samples, spec.input_size)
    classes = sorted(set(train_ds.classes) | set(val_ds.classes) | set(test_full.classes))
    write(f"data: {len(ts)} train / {len(val_ds)} val images from {data}; input {spec.input_size[0]}x"
          f"{spec.input_size[1]}, batch {r.train.batch}, {total} iterations on {device}"
          + (f", {dist.world} processes ({dist.backend}, {r.train.batch // dist.world} images each)"
             if dist.enabled else ""))

    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p_ in teacher.parameters():
            p_.requires_grad_(False)
    model = GMBINet(GMBINetConfig.from_dict(r.model.config()))
    if init is not None and state is None:
        sd = {k: v for k, v in init.state_dict.items() if k in model.state_dict()}  # no unused extras
        load_state_dict_strict(model, sd)
        write(f"fine-tuning from {init.path or 'the given checkpoint'}")
    model = model.to(device)
    mf = torch.channels_last if r.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    opt = torch.optim.Adam(model.parameters(), lr=r.optimizer.lr, betas=tuple(r.optimizer.betas),
                           eps=r.optimizer.eps, weight_decay=r.optimizer.weight_decay)
    sched = CosineSchedule(opt, r.optimizer.lr, r.schedule.min_lr, total, r.schedule.warmup_iterations, r.schedule.name)
    use_scaler = r.train.amp == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if device.type == "cuda" else None
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(r.train.amp)
    criterion = DeepSupervisionLoss(bce=r.loss.bce, ssim=r.loss.ssim, dice=r.loss.dice, dice_weight=r.loss.dice_weight,
                                    head_weights=r.loss.head_weights, ssim_window=r.loss.ssim_window,
                                    ssim_sigma=r.loss.ssim_sigma)

    it = 0
    best = {"val_iou": -1.0, "iteration": 0, "val_mae": None}
    history: List[dict] = []
    elapsed_before = 0.0
    resumed_from = None
    if state is not None:
        model.load_state_dict(state["state_dict"])
        model.to(memory_format=mf)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        it = int(state["iteration"])
        best = dict(state["best"])
        history = list(state["history"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        _set_rng_state(state["rng"])
        resumed_from = {"path": str(resume), "iteration": it}
        write(f"resumed from {resume} at iteration {it} (best val IoU so far {best['val_iou']:.4f})")

    if device.type == "cuda":  # augment and preprocess on the GPU: the (uint8) train split lives there
        ts.images, ts.masks = ts.images.to(device), ts.masks.to(device)
    out.mkdir(parents=True, exist_ok=True)
    net = dist.wrap(model, device)  # averages gradients over the ranks; ``model`` is what is saved
    if dist.is_main and state is not None and not best_path.exists() and (Path(resume).parent / "best.pt").is_file():
        import shutil  # resuming into another folder: carry the best-so-far along

        shutil.copyfile(Path(resume).parent / "best.pt", best_path)
    sampler = EpochSampler(len(ts), r.train.batch, seed)
    recipe_record = {"name": r.name, "profile": r.profile, "file": r.source, "sha256": r.sha256, "text": r.text,
                     "resolved": r.to_dict()}
    split_info = {
        "data": str(data), "split_file_sha256": _split_file_sha(data) if not str(data).startswith("synthetic") else None,
        "train_split": r.data.train_split, "val_split": r.data.val_split, "test_split": r.data.test_split,
        "train_images": len(ts), "val_images": len(val_ds), "limit_images": limit_images,
    }

    init_record = (state or {}).get("init") if init is None else {
        "path": str(init.path) if init.path else None, "sha256": init.sha256 or None,
        "source": (init.provenance or {}).get("source"), "profile": (init.provenance or {}).get("profile"),
        "input_size": list(init.preprocess.input_size), "test_iou": (init.metrics or {}).get("test_iou"),
        "prune": (init.provenance or {}).get("prune")}

    def provenance(best_it: int) -> dict:
        return {
            "source": f"edgekit train {r.source or r.name}", "recipe": r.name, "recipe_file": r.source,
            "recipe_sha256": r.sha256, "profile": r.profile, "iterations": total, "best_iteration": best_it,
            "batch": r.train.batch, "input_size": list(spec.input_size), "data_split": split_info, "seed": seed,
            "edgekit_version": __version__, "torch_version": str(torch.__version__), "device": str(device),
            "amp": r.train.amp, "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": resumed_from,
            "init": init_record,
        }

    def save_state():
        st = {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "iteration": it, "total_iterations": total,
            "model": {"name": r.model.name, "config": r.model.config()},
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if (scaler is not None and use_scaler) else None,
            "rng": _rng_state(), "seed": seed, "best": best, "history": history, "recipe": recipe_record,
            "init": init_record,
            "preprocess": spec.to_dict(), "data_split": split_info,
            "elapsed_s": elapsed_before + (time.time() - t_start), "edgekit_version": __version__,
        }
        with atomic_write(last_path, "wb") as f:
            torch.save(st, f)

    def save_best(val: dict):
        ck = Checkpoint.from_model(model, preprocess=spec, classes=classes, provenance=provenance(it),
                                   metrics={"val_iou": round(val["overall"]["iou"], 6),
                                            "val_mae": round(val["overall"]["mae"], 6),
                                            "val_max_f": round(val["overall"]["max_f"], 6), "val_iteration": it})
        ck.save(best_path)

    bar = _progress(total, it, enabled=dist.is_main)
    loss_ema = None
    stopped = False
    try:
        while it < total:
            net.train()
            idx = sampler.indices(it)
            x, y = make_batch(ts, idx, r.augment, spec, batch_generator(seed, it))
            x, y = dist.shard(x, y)  # the global batch is drawn whole, so any N sees the same samples
            if dist.rank:  # rank 0 keeps a single process's RNG stream (saved in last.pt); dropout differs per rank
                torch.manual_seed(distributed.rank_seed(seed, dist.rank, it))
            x = x.to(device, non_blocking=True).contiguous(memory_format=mf)
            y = y.to(device, non_blocking=True)
            ctx = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                outs = net(x)
            loss = criterion([o.float() for o in outs], y)
            if teacher is not None and r.loss.distill > 0:
                with torch.no_grad():
                    target = teacher(x).float().clamp(0.0, 1.0)
                loss = loss + r.loss.distill * torch.nn.functional.binary_cross_entropy(outs[0].float(), target)
            if not torch.isfinite(loss):
                raise EdgekitError(f"training diverged at iteration {it + 1} (loss {loss.item()}); "
                                   "lower optimizer.lr or check the data")
            opt.zero_grad(set_to_none=True)
            if use_scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            it += 1
            lv = dist.mean(loss)
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            bar.update(1)
            if it % r.train.log_every == 0 or it == total:
                last_val = best.get("last_val_iou")
                bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{sched.get_last_lr():.2e}",
                                val_iou="-" if last_val is None else f"{last_val:.4f}", refresh=False)
            if dist.is_main and (it % r.train.val_every == 0 or it == total):
                val = _validate(model, val_ds, spec, device, r.train.val_batch)
                v = val["overall"]
                improved = v["iou"] > best["val_iou"]
                if improved:
                    best.update(val_iou=v["iou"], val_mae=v["mae"], iteration=it)
                    save_best(val)
                best["last_val_iou"] = v["iou"]
                history.append({"iteration": it, "loss": round(loss_ema, 6), "lr": sched.get_last_lr(),
                                "val_iou": v["iou"], "val_mae": v["mae"], "val_max_f": v["max_f"],
                                "elapsed_s": round(elapsed_before + time.time() - t_start, 1)})
                bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{sched.get_last_lr():.2e}", val_iou=f"{v['iou']:.4f}")
                msg = (f"iter {it}/{total}: loss {loss_ema:.4f}, val IoU {v['iou']:.4f} MAE {v['mae']:.4f}"
                       f"{' (best, saved best.pt)' if improved else ''}")
                write(msg)
            if dist.is_main and (it % r.train.checkpoint_every == 0 or it == total):
                save_state()
            if stop_after is not None and it >= stop_after and it < total:
                if dist.is_main:
                    save_state()
                stopped = True
                break
    finally:
        bar.close()

    wall = time.time() - t_start
    if not dist.is_main:  # rank 0 writes the final state, evaluates best.pt on the test split and reports
        return TrainResult(out, None, last_path, None, it, best["val_iou"], best["iteration"], stopped_early=stopped,
                           wall_s=wall)
    if stopped:
        return TrainResult(out, best_path if best_path.exists() else None, last_path, None, it, best["val_iou"],
                           best["iteration"], stopped_early=True, wall_s=wall)
    if state is not None and it == int(state["iteration"]) and not last_path.exists():
        save_state()
    if not best_path.exists():
        raise EdgekitError(f"{out}: no best.pt was written (no val evaluation ran)")

    # Final report: the best checkpoint on the test split, overall and per class.
    from edgekit.eval.evaluate import evaluate
    from edgekit.backends.torch_eager import TorchRunner

    test_ds = _subset(test_full, limit_images, "test")
    ck = load_checkpoint(best_path)
    with torch.random.fork_rng(devices=[]):
        result = evaluate(TorchRunner(ck, device=str(device)), test_ds, batch_size=r.train.val_batch,
                          show_progress=False)
    o = result["overall"]
    ck.metrics.update({"test_mae": round(o["mae"], 6), "test_iou": round(o["iou"], 6), "test_max_f": round(o["max_f"], 6),
                       "test_images": o["images"]})
    ck.provenance["data_split"] = dict(ck.provenance.get("data_split", {}), test_images=o["images"])
    ck.provenance["train_wall_s"] = round(elapsed_before + wall, 1)
    ck.provenance["iterations"] = total
    if resumed_from:
        ck.provenance["resumed_from"] = resumed_from
    ck.save(best_path)
    report = {
        "recipe": r.name, "recipe_sha256": r.sha256, "profile": r.profile, "checkpoint": str(best_path),
        "checkpoint_sha256": load_checkpoint(best_path).sha256, "split": r.data.test_split,
        "best_iteration": best["iteration"], "iterations": total, "val_iou": best["val_iou"], "seed": seed,
        "input_size": list(spec.input_size), "train_wall_s": round(elapsed_before + wall, 1),
        **result, "history": history,
    }
    report["model"] = f"torch fp32 ({best_path})"
    with atomic_write(report_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    write(f"test ({o['images']} images): MAE {o['mae']:.4f}, IoU {o['iou']:.4f}, max F {o['max_f']:.4f}")
    return TrainResult(out, best_path, last_path, report_path, it, best["val_iou"], best["iteration"], test=result,
                       wall_s=elapsed_before + wall)
