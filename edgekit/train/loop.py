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
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from edgekit import __version__
from edgekit.data.datasets import SegDataset, open_segmentation, split_by_name
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError
from edgekit.models.checkpoint import Checkpoint, load_checkpoint, load_state_dict_strict
from edgekit.models.gmbinet import GMBINet, GMBINetConfig
from edgekit.progress import Heartbeat
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
              batch: int, show_progress: bool = True) -> dict:
    from edgekit.eval.evaluate import evaluate
    from edgekit.backends.torch_eager import TorchRunner

    # Builds a fresh model (weight init draws from the global RNG): keep the training RNG untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ck = Checkpoint.from_model(model, preprocess=spec)
        runner = TorchRunner(ck, device=str(device))
        return evaluate(runner, dataset, batch_size=batch, show_progress=show_progress, desc="train: validation")


def _subset(ds: SegDataset, n: Optional[int], what: str, show_progress: bool = True) -> SegDataset:
    samples = preload(limit_samples(ds.samples, n), ds.description, desc=f"train: loading the {what} images",
                      show_progress=show_progress)
    desc = ds.description if len(samples) == len(ds.samples) else f"{ds.description}, first {len(samples)} (limit)"
    return SegDataset(samples, sorted({s.cls for s in samples}), desc, ds.synthetic)


def _progress(total: int, initial: int, enabled: bool = True):
    """The iteration bar (``edgekit.progress``'s rules: a terminal, or EDGEKIT_PROGRESS=1; never with
    EDGEKIT_NO_PROGRESS=1); kept on screen when done, unlike the shorter bars."""
    from tqdm import tqdm

    from edgekit.progress import progress_enabled

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc="train", unit="it", file=sys.stderr,
                disable=not progress_enabled(enabled), dynamic_ncols=True, mininterval=0.5 if tty else 30.0,
                smoothing=0.05)


# ----------------------------------------------------------------------------------------------
# the loop


def train(recipe: Recipe, data: Optional[str] = None, out_dir: Optional[str] = None, resume: Optional[str] = None,
          seed: Optional[int] = None, iterations: Optional[int] = None, limit_images: Optional[int] = None,
          stop_after: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
          init: Optional[Checkpoint] = None, teacher: Optional[torch.nn.Module] = None,
          budget_s: Optional[float] = None) -> TrainResult:
    """Train ``recipe`` (a resolved profile). ``stop_after`` ends the run after that iteration,
    saving ``last.pt`` (as an interruption would), without the final test evaluation.

    ``init`` fine-tunes a checkpoint instead of training from scratch: its architecture replaces
    the recipe's model section (a pruned model keeps its own widths) and its weights are the start.
    ``teacher`` (an eval-mode model) adds ``loss.distill`` x BCE towards its main-head probabilities.
    ``budget_s`` (``--budget``): the cosine horizon is set from a measured step time so the run, its last
    validation, the final test and the report end within that many seconds.

    Uses ``train.threads`` CPU threads and restores the caller's thread count afterwards."""
    threads = torch.get_num_threads()
    try:
        if init is not None:
            _adopt_init(recipe, init)
        return Trainer(recipe, data, out_dir, resume, seed, iterations, limit_images, stop_after, log, init, teacher,
                       budget_s).run()
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


# ----------------------------------------------------------------------------------------------
# the Trainer: ``train``'s steps, each a method, in the order ``run`` calls them


UNPLANNED = 10 ** 9  # the horizon of a budgeted run before its steps are timed


@dataclass
class BudgetPlan:
    """A time-budgeted run (``--budget``): the horizon comes from measured times, re-planned every
    ``train.log_every`` steps from the means so far, so the run ends on time with its learning rate annealed (cosine to ``min_lr`` at the
    planned last iteration), its best-on-val checkpoint and its report written."""
    budget_s: float
    warmup_steps: int = 2  # not timed: cuDNN autotuning, torch.compile, allocator growth
    timed_steps: int = 4
    step_s: Optional[float] = None  # median seconds per training step
    val_s: Optional[float] = None  # seconds of one validation
    final_s: Optional[float] = None  # reserved for the last validation, the final test, best.pt and the report
    planned: Optional[int] = None  # the horizon the cosine anneals to
    first_plan: Optional[int] = None
    replans: int = 0
    ended_by: str = "schedule"  # or "time guard": the measured times were off and the run stopped early

    def record(self) -> dict:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"budget_s": self.budget_s, "step_s": r(self.step_s), "val_s": r(self.val_s),
                "final_reserve_s": r(self.final_s), "first_planned_iterations": self.first_plan,
                "planned_iterations": self.planned, "replans": self.replans, "ended_by": self.ended_by}


class Trainer:
    """``edgekit train`` as named steps (``run`` lists them): argument checks, the resume state,
    processes and device (DDP), data, model and optimizer set-up, restoring a resumed run, the batch
    source (host pipeline or GPU-resident), the loop (with its time budget), the final test and the report."""

    def __init__(self, recipe: Recipe, data, out_dir, resume, seed, iterations, limit_images, stop_after, log,
                 init=None, teacher=None, budget_s: Optional[float] = None):
        self.t_start = time.time()
        self.r, self.data, self.out_dir, self.resume = recipe, data, out_dir, resume
        self.seed, self.iterations, self.limit_images, self.stop_after = seed, iterations, limit_images, stop_after
        self.write = log or (lambda msg: None)
        self.init, self.teacher = init, teacher
        self.budget = BudgetPlan(float(budget_s)) if budget_s else None
        self.state = None
        self.it = 0
        self.best = {"val_iou": -1.0, "iteration": 0, "val_mae": None}
        self.history: List[dict] = []
        self.elapsed_before = 0.0
        self.resumed_from = None
        # budgeted runs: durations of validations and checkpoint saves, steps and other seconds since the first plan
        self._vals: List[float] = []
        self._saves: List[float] = []
        self._t_plan, self._steps_since_plan, self._other_s = 0.0, 0, 0.0
        self._n_test: Optional[int] = None

    def run(self) -> TrainResult:
        self.check_arguments()
        self.read_resume_state()
        self.set_up_processes()
        self.load_data()
        self.build_model()
        self.restore()
        self.make_batches()
        stopped = self.loop()
        return self.finish(stopped)

    # -- checks ---------------------------------------------------------------------------------

    def check_arguments(self) -> None:
        r = self.r
        if self.iterations is not None:
            if self.iterations < 1:
                raise EdgekitError("--iterations must be >= 1")
            if self.budget:
                raise EdgekitError("--budget and --iterations exclude each other (the budget sets the iterations)")
            r.train.iterations = int(self.iterations)
        if self.budget and self.resume:
            raise EdgekitError("--budget and --resume exclude each other (a resumed run keeps its planned horizon)")
        # a budgeted run's horizon is measured (plan_horizon); until then the cosine stays near its peak
        self.total = UNPLANNED if self.budget else r.train.iterations
        self.data = self.data or r.data_path()
        if not self.data:
            raise EdgekitError("no training data: pass --data DIR (an SD-900 folder) or set data.path in the recipe")
        if self.out_dir:
            self.out = Path(self.out_dir)
        elif self.resume:
            self.out = Path(self.resume).parent  # continue in the run's own folder
        else:
            self.out = Path("runs") / f"{r.name}-{r.profile or 'base'}"
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        self.report_path = self.out / "report.json"

    # -- resume ---------------------------------------------------------------------------------

    def read_resume_state(self) -> None:
        r, resume = self.r, self.resume
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
            if self.seed is not None and int(self.seed) != int(state["seed"]):
                raise EdgekitError(f"resume: --seed {self.seed} differs from the run's seed {state['seed']}")
            self.seed = int(state["seed"])
            if state.get("budget") and self.iterations is None:  # a budgeted run continues to its own horizon
                self.total = r.train.iterations = int(state["total_iterations"])
            if int(state["iteration"]) > self.total:
                raise EdgekitError(f"resume: {resume} is at iteration {state['iteration']}, past --iterations "
                                   f"{self.total}")
            self.state = state
        elif self.last_path.exists():
            raise EdgekitError(f"{self.out} already holds a run (last.pt): pass --resume {self.last_path} to "
                               "continue it, or choose another --out")
        self.seed = int(r.train.seed if self.seed is None else self.seed)

    # -- processes, device, DDP -----------------------------------------------------------------

    def set_up_processes(self) -> None:
        r = self.r
        device = _resolve_device(r)
        self.dist = distributed.context(device, r.train.batch)  # one process unless started by torchrun / --nproc
        self.device = device = self.dist.device(device)
        if self.budget and self.dist.enabled:
            raise EdgekitError("--budget runs in one process (the ranks would have to agree on a measured horizon)")
        if not self.dist.is_main:
            self.write = lambda msg: None  # noqa: E731 - rank 0 logs for the run
        if device.type == "cpu":
            torch.set_num_threads(max(1, r.train.threads // self.dist.local_world))  # the ranks share the cores
        self.amp = _resolve_amp(r.train.amp, device)
        if self.amp == "fp16" and device.type != "cuda":
            raise EdgekitError("train.amp fp16 needs CUDA; use amp: none (or bf16) on the CPU")
        if r.train.compile == "graph" and device.type != "cuda":
            raise EdgekitError("train.compile graph (CUDA graphs) needs CUDA; use compile: none (or compile) on the CPU")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        _seed_everything(self.seed)

    # -- data -----------------------------------------------------------------------------------

    def load_data(self) -> None:
        r, data, limit = self.r, self.data, self.limit_images
        self.spec = spec = PreprocessSpec(mean=r.preprocess.mean, std=r.preprocess.std,
                                          input_size=tuple(r.preprocess.input_size), channels=r.preprocess.channels,
                                          scale=r.preprocess.scale, resize=r.preprocess.resize)
        if spec.channels != r.model.in_channels:
            raise EdgekitError(f"recipe: preprocess.channels {spec.channels} != model.in_channels {r.model.in_channels}")
        # Train preloaded as uint8 tensors; val/test preloaded once as samples.
        train_ds = open_segmentation(data, r.data.train_split)
        val_ds, self.test_full = open_segmentation(data, r.data.val_split), open_segmentation(data, r.data.test_split)
        held_out = None
        if train_ds.split == "all" and not train_ds.synthetic:  # a plain image/mask folder has no split.json
            train_ds, val_ds, self.test_full = (split_by_name(d, part) for d, part in
                                                ((train_ds, "train"), (val_ds, "val"), (self.test_full, "test")))
            held_out = f"{len(train_ds)} train / {len(val_ds)} val / {len(self.test_full)} test"
            self.write(f"data: {data} has no split.json: split by file name into {held_out} images (fixed: the same "
                       "split on every run; recorded in the checkpoint)")
        self.val_ds = _subset(val_ds, limit, "val", self.dist.is_main)
        train_samples = limit_samples(train_ds.samples, limit)
        train_names = {x.image_path for x in train_ds.samples if x.image_path is not None}  # synthetic: none
        for other in (r.data.val_split, r.data.test_split):
            other_ds = self.val_ds if other == r.data.val_split else self.test_full
            shared = train_names & {x.image_path for x in other_ds.samples}
            if shared:
                raise EdgekitError(f"{data}: {len(shared)} images are in both the {r.data.train_split!r} and the "
                                   f"{other!r} split (only an SD-900-style folder with split.json has separate splits)")
        self.ts = build_trainset(train_ds, train_samples, spec.input_size, spec.resize, show_progress=self.dist.is_main)
        self.classes = sorted(set(train_ds.classes) | set(self.val_ds.classes) | set(self.test_full.classes))
        dist = self.dist
        horizon = f"a {self.budget.budget_s:.0f} s budget" if self.budget else f"{self.total} iterations"
        self.write(f"data: {len(self.ts)} train / {len(self.val_ds)} val images from {data}; input {spec.input_size[0]}x"
                   f"{spec.input_size[1]}, batch {r.train.batch}, {horizon} on {self.device}"
                   + (" (train split on the device)" if r.train.device_data else "")
                   + (f", {dist.world} processes ({dist.backend}, {r.train.batch // dist.world} images each)"
                      if dist.enabled else ""))
        self.split_info = {
            "data": str(data), "split_file_sha256": _split_file_sha(data) if not str(data).startswith("synthetic") else None,
            "train_split": r.data.train_split, "val_split": r.data.val_split, "test_split": r.data.test_split,
            "train_images": len(self.ts), "val_images": len(self.val_ds), "limit_images": limit,
        }
        if held_out:
            self.split_info["split_by_name"] = held_out

    # -- model, optimizer, schedule, loss -------------------------------------------------------

    def build_model(self) -> None:
        r, device, init = self.r, self.device, self.init
        if self.teacher is not None:
            self.teacher = self.teacher.to(device).eval()
            for p_ in self.teacher.parameters():
                p_.requires_grad_(False)
        model = GMBINet(GMBINetConfig.from_dict(r.model.config()))
        if init is not None and self.state is None:
            sd = {k: v for k, v in init.state_dict.items() if k in model.state_dict()}  # no unused extras
            load_state_dict_strict(model, sd)
            self.write(f"fine-tuning from {init.path or 'the given checkpoint'}")
        self.mf = torch.channels_last if r.train.channels_last else torch.contiguous_format
        self.model = model = model.to(device).to(memory_format=self.mf)
        self.opt, self.optimizer_kind = _adam(model, r, fused=r.train.device_data)
        self.sched = CosineSchedule(self.opt, r.optimizer.lr, r.schedule.min_lr, self.total,
                                    r.schedule.warmup_iterations, r.schedule.name)
        self.use_scaler = self.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler) if device.type == "cuda" else None
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)
        self.criterion = DeepSupervisionLoss(bce=r.loss.bce, ssim=r.loss.ssim, dice=r.loss.dice,
                                             dice_weight=r.loss.dice_weight, head_weights=r.loss.head_weights,
                                             ssim_window=r.loss.ssim_window, ssim_sigma=r.loss.ssim_sigma)
        init_state = (self.state or {}).get("init")
        self.init_record = init_state if init is None else {
            "path": str(init.path) if init.path else None, "sha256": init.sha256 or None,
            "source": (init.provenance or {}).get("source"), "profile": (init.provenance or {}).get("profile"),
            "input_size": list(init.preprocess.input_size), "test_iou": (init.metrics or {}).get("test_iou"),
            "prune": (init.provenance or {}).get("prune")}
        self.recipe_record = {"name": r.name, "profile": r.profile, "file": r.source, "sha256": r.sha256,
                              "text": r.text, "resolved": r.to_dict()}

    # -- restoring a resumed run ----------------------------------------------------------------

    def restore(self) -> None:
        state = self.state
        if state is None:
            return
        self.model.load_state_dict(state["state_dict"])
        self.model.to(memory_format=self.mf)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.it = int(state["iteration"])
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        _set_rng_state(state["rng"])
        self.resumed_from = {"path": str(self.resume), "iteration": self.it}
        self.write(f"resumed from {self.resume} at iteration {self.it} (best val IoU so far {self.best['val_iou']:.4f})")

    # -- where batches come from ----------------------------------------------------------------

    def make_batches(self) -> None:
        r, device, ts = self.r, self.device, self.ts
        if r.train.device_data:  # GPU-resident: the split on the device, batches made there, no host sync
            from edgekit.train.device_data import DeviceBatches

            source = DeviceBatches(ts, r.train.batch, self.seed, r.augment, self.spec, device)
            self.next_batch = source.batch
        else:
            if device.type == "cuda":  # augment and preprocess on the GPU: the (uint8) train split lives there
                ts.images, ts.masks = ts.images.to(device), ts.masks.to(device)
            sampler = EpochSampler(len(ts), r.train.batch, self.seed)
            self.next_batch = lambda it: make_batch(ts, sampler.indices(it), r.augment, self.spec,
                                                    batch_generator(self.seed, it))
        self.out.mkdir(parents=True, exist_ok=True)
        self.net = self.dist.wrap(self.model, device)  # averages gradients over the ranks; ``model`` is saved
        if r.train.compile != "none":
            self.net = torch.compile(self.net, mode="reduce-overhead" if r.train.compile == "graph" else None)
        resume = self.resume
        if (self.dist.is_main and self.state is not None and not self.best_path.exists()
                and (Path(resume).parent / "best.pt").is_file()):
            import shutil  # resuming into another folder: carry the best-so-far along

            shutil.copyfile(Path(resume).parent / "best.pt", self.best_path)

    # -- one step, validation, saving -----------------------------------------------------------

    def step(self, it: int) -> torch.Tensor:
        """One optimizer step on the batch of iteration ``it``; the (device) loss."""
        r, dist, device = self.r, self.dist, self.device
        self.net.train()
        x, y = self.next_batch(it)
        x, y = dist.shard(x, y)  # the global batch is drawn whole, so any N sees the same samples
        if dist.rank:  # rank 0 keeps a single process's RNG stream (saved in last.pt); dropout differs per rank
            torch.manual_seed(distributed.rank_seed(self.seed, dist.rank, it))
        x = x.to(device, non_blocking=True).contiguous(memory_format=self.mf)
        y = y.to(device, non_blocking=True)
        if r.train.compile == "graph":
            torch.compiler.cudagraph_mark_step_begin()
        ctx = torch.autocast(device_type=device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            outs = self.net(x)
        loss = self.criterion([o.float() for o in outs], y)
        if self.teacher is not None and r.loss.distill > 0:
            with torch.no_grad():
                target = self.teacher(x).float().clamp(0.0, 1.0)
            loss = loss + r.loss.distill * torch.nn.functional.binary_cross_entropy(outs[0].float(), target)
        if not r.train.device_data and not torch.isfinite(loss):  # device_data: checked at the log points
            raise EdgekitError(f"training diverged at iteration {it + 1} (loss {loss.item()}); "
                               "lower optimizer.lr or check the data")
        self.opt.zero_grad(set_to_none=True)
        if self.use_scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        return loss.detach()

    def validate(self, loss_ema: float) -> float:
        """Val IoU of the current weights; best.pt when it improved; returns the seconds it took."""
        t0 = time.time()
        it, best = self.it, self.best
        val = _validate(self.model, self.val_ds, self.spec, self.device, self.r.train.val_batch,
                        show_progress=self.dist.is_main)
        v = val["overall"]
        improved = v["iou"] > best["val_iou"]
        if improved:
            best.update(val_iou=v["iou"], val_mae=v["mae"], iteration=it)
            self.save_best(val)
        best["last_val_iou"] = v["iou"]
        self.history.append({"iteration": it, "loss": round(loss_ema, 6), "lr": self.sched.get_last_lr(),
                             "val_iou": v["iou"], "val_mae": v["mae"], "val_max_f": v["max_f"],
                             "elapsed_s": round(self.elapsed_before + time.time() - self.t_start, 1)})
        self.bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{self.sched.get_last_lr():.2e}", val_iou=f"{v['iou']:.4f}")
        self.write(f"iter {it}/{self.total}: loss {loss_ema:.4f}, val IoU {v['iou']:.4f} MAE {v['mae']:.4f}"
                   f"{' (best, saved best.pt)' if improved else ''}")
        return time.time() - t0

    def provenance(self, best_it: int) -> dict:
        r = self.r
        return {
            "source": f"edgekit train {r.source or r.name}", "recipe": r.name, "recipe_file": r.source,
            "recipe_sha256": r.sha256, "profile": r.profile, "iterations": self.total, "best_iteration": best_it,
            "batch": r.train.batch, "input_size": list(self.spec.input_size), "data_split": self.split_info,
            "seed": self.seed, "edgekit_version": __version__, "torch_version": str(torch.__version__),
            "device": str(self.device), "amp": self.amp,
            "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": self.resumed_from, "init": self.init_record,
        }

    def save_state(self) -> None:
        st = {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "iteration": self.it,
            "total_iterations": self.total,
            "model": {"name": self.r.model.name, "config": self.r.model.config()},
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if (self.scaler is not None and self.use_scaler) else None,
            "rng": _rng_state(), "seed": self.seed, "best": self.best, "history": self.history,
            "recipe": self.recipe_record, "init": self.init_record, "preprocess": self.spec.to_dict(),
            "data_split": self.split_info, "budget": self.budget.record() if self.budget else None,
            "elapsed_s": self.elapsed_before + (time.time() - self.t_start), "edgekit_version": __version__,
        }
        with atomic_write(self.last_path, "wb") as f:
            torch.save(st, f)

    def save_best(self, val: dict) -> None:
        o = val["overall"]
        ck = Checkpoint.from_model(self.model, preprocess=self.spec, classes=self.classes,
                                   provenance=self.provenance(self.it),
                                   metrics={"val_iou": round(o["iou"], 6), "val_mae": round(o["mae"], 6),
                                            "val_max_f": round(o["max_f"], 6), "val_iteration": self.it})
        ck.save(self.best_path)

    # -- the time budget ------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def plan_horizon(self, step_s: float) -> None:
        """Set the cosine's horizon so that the remaining steps, their validations and checkpoints, a last
        validation and the final test fit what is left of the budget."""
        b, t = self.budget, self.r.train
        b.step_s = step_s
        b.val_s = float(np.mean(self._vals))
        save_s = float(np.mean(self._saves)) if self._saves else 0.0
        if self._n_test is None:
            self._n_test = len(limit_samples(self.test_full.samples, self.limit_images))
        n_test = self._n_test
        per_image = b.val_s / max(1, len(self.val_ds))
        # the last validation (a whole one, at the last iteration), the final test, rewriting best.pt and the
        # report, with a margin for a slower moment of a shared machine
        b.final_s = b.val_s + per_image * n_test * 1.25 + 2.0 + 0.02 * b.budget_s
        # one step less than fits: the guard (out_of_time) stops a step early when 1.5 steps no longer fit
        left = b.budget_s - (time.time() - self.t_start) - b.final_s - step_s
        per_it = step_s + b.val_s / t.val_every + save_s / t.checkpoint_every
        planned = self.it + max(1, int(left / per_it))
        if b.planned is None:
            b.first_plan = planned
            self._t_plan, self._steps_since_plan, self._other_s = time.time(), 0, 0.0
        else:
            b.replans += 1
        b.planned = self.total = self.sched.total = planned
        self.bar.total = planned  # shown at the bar's next update (a refresh per re-plan would flood a log)

    def replan(self) -> None:
        """Re-plan from the mean step time since the first plan (validations and checkpoints timed apart and
        amortised by their intervals): means over the whole run, so one slow moment on a shared machine
        moves the horizon, and the learning rate, only a little."""
        steps = self._steps_since_plan
        step_s = (time.time() - self._t_plan - self._other_s) / steps
        self.plan_horizon(max(step_s, 1e-6))

    def out_of_time(self) -> bool:
        """True when one more step would leave too little of the budget for the final test (the guard for
        a step time that grew after planning)."""
        b = self.budget
        if b is None or b.final_s is None:
            return False
        return time.time() - self.t_start + 1.5 * b.step_s + b.final_s > b.budget_s

    # -- the loop -------------------------------------------------------------------------------

    def loop(self) -> bool:
        """Train to ``self.total`` (or the budget's horizon); returns whether ``stop_after`` ended it early."""
        r, dist, b = self.r, self.dist, self.budget
        self.bar = bar = _progress(None if self.total == UNPLANNED else self.total, self.it, enabled=dist.is_main)
        heartbeat = Heartbeat(bar) if not bar.disable and sys.stderr.isatty() else None  # a slow iteration moves
        loss_ema = None  # a float (host pipeline) or a device tensor (device_data: read at the log points)
        stopped = False
        timing: List[float] = []  # the measured steps of a budgeted run
        try:
            while self.it < self.total:
                measuring = b is not None and b.step_s is None
                if measuring:
                    self._sync()
                    t0 = time.time()
                loss = self.step(self.it)
                self.it += 1
                it = self.it
                if r.train.device_data:
                    loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
                else:
                    lv = dist.mean(loss)
                    loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
                bar.update(1)
                if measuring:
                    self._sync()
                    timing.append(time.time() - t0)
                    if len(timing) == b.warmup_steps + b.timed_steps:  # measured: validate once, then plan
                        self._vals.append(self.validate(self._loss_value(loss_ema)))
                        self.plan_horizon(float(np.median(timing[b.warmup_steps:])))
                        self.write(f"budget {b.budget_s:.0f} s: {b.step_s * 1e3:.0f} ms per step, validation "
                                   f"{b.val_s:.1f} s: cosine horizon {b.planned} iterations")
                        continue
                elif b is not None:
                    self._steps_since_plan += 1
                    if self._steps_since_plan % r.train.log_every == 0:
                        self.replan()
                    if it < self.total and self.out_of_time():  # the guard: stop, validate and report in time
                        b.ended_by = "time guard"
                        self.write(f"budget: stopping at iteration {it} of the planned {self.total} (steps took "
                                   "longer than measured)")
                        self.total = self.sched.total = it
                if it % r.train.log_every == 0 or it == self.total:
                    last_val = self.best.get("last_val_iou")
                    bar.set_postfix(loss=f"{self._loss_value(loss_ema):.4f}", lr=f"{self.sched.get_last_lr():.2e}",
                                    val_iou="-" if last_val is None else f"{last_val:.4f}", refresh=False)
                if dist.is_main and (it % r.train.val_every == 0 or it == self.total):
                    t_val = self.validate(self._loss_value(loss_ema))
                    self._vals.append(t_val)
                    self._other_s += t_val
                if dist.is_main and (it % r.train.checkpoint_every == 0 or it == self.total):
                    t_save = time.time()
                    self.save_state()
                    self._saves.append(time.time() - t_save)
                    self._other_s += self._saves[-1]
                if self.stop_after is not None and it >= self.stop_after and it < self.total:
                    if dist.is_main:
                        self.save_state()
                    stopped = True
                    break
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            bar.close()
        return stopped

    def _loss_value(self, loss_ema) -> float:
        """The loss EMA as a number; with device_data also the divergence check (a NaN stays in the EMA)."""
        v = float(loss_ema)
        if not math.isfinite(v):
            raise EdgekitError(f"training diverged by iteration {self.it} (loss {v}); lower optimizer.lr or check "
                               "the data")
        return v

    # -- final test and report ------------------------------------------------------------------

    def finish(self, stopped: bool) -> TrainResult:
        wall = time.time() - self.t_start
        dist, it, best = self.dist, self.it, self.best
        out, last_path, best_path = self.out, self.last_path, self.best_path
        if not dist.is_main:  # rank 0 writes the final state, evaluates best.pt on the test split and reports
            return TrainResult(out, None, last_path, None, it, best["val_iou"], best["iteration"],
                               stopped_early=stopped, wall_s=wall)
        if stopped:
            return TrainResult(out, best_path if best_path.exists() else None, last_path, None, it, best["val_iou"],
                               best["iteration"], stopped_early=True, wall_s=wall)
        if self.state is not None and it == int(self.state["iteration"]) and not last_path.exists():
            self.save_state()
        if not best_path.exists():
            raise EdgekitError(f"{out}: no best.pt was written (no val evaluation ran)")
        result = self.final_test()
        return self.write_report(result)

    def final_test(self) -> dict:
        """The best checkpoint on the test split, overall and per class; its metrics go into best.pt."""
        from edgekit.eval.evaluate import evaluate
        from edgekit.backends.torch_eager import TorchRunner

        r, best_path = self.r, self.best_path
        test_ds = _subset(self.test_full, self.limit_images, "test")  # rank 0 only
        ck = load_checkpoint(best_path)
        with torch.random.fork_rng(devices=[]):
            result = evaluate(TorchRunner(ck, device=str(self.device)), test_ds, batch_size=r.train.val_batch,
                              desc="train: test split (best.pt)")
        o = result["overall"]
        ck.metrics.update({"test_mae": round(o["mae"], 6), "test_iou": round(o["iou"], 6),
                           "test_max_f": round(o["max_f"], 6), "test_images": o["images"]})
        ck.provenance["data_split"] = dict(ck.provenance.get("data_split", {}), test_images=o["images"])
        ck.provenance["train_wall_s"] = round(self.elapsed_before + time.time() - self.t_start, 1)
        ck.provenance["iterations"] = self.total
        if self.budget:
            ck.provenance["budget"] = self.budget.record()
        if self.resumed_from:
            ck.provenance["resumed_from"] = self.resumed_from
        ck.save(best_path)
        return result

    def write_report(self, result: dict) -> TrainResult:
        r, best, best_path = self.r, self.best, self.best_path
        o = result["overall"]
        report = {
            "recipe": r.name, "recipe_sha256": r.sha256, "profile": r.profile, "checkpoint": str(best_path),
            "checkpoint_sha256": load_checkpoint(best_path).sha256, "split": r.data.test_split,
            "best_iteration": best["iteration"], "iterations": self.total, "val_iou": best["val_iou"],
            "seed": self.seed, "input_size": list(self.spec.input_size),
            "device": str(self.device), "device_data": r.train.device_data, "amp": self.amp,
            "optimizer": self.optimizer_kind, "compile": r.train.compile,
            "budget": self.budget.record() if self.budget else None,
            "train_wall_s": 0.0, **result, "history": self.history,
        }
        report["model"] = f"torch fp32 ({best_path})"
        wall = time.time() - self.t_start
        report["train_wall_s"] = round(self.elapsed_before + wall, 1)
        with atomic_write(self.report_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        self.write(f"test ({o['images']} images): MAE {o['mae']:.4f}, IoU {o['iou']:.4f}, max F {o['max_f']:.4f}")
        return TrainResult(self.out, best_path, self.last_path, self.report_path, self.it, best["val_iou"],
                           best["iteration"], test=result, wall_s=self.elapsed_before + wall)


def _resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` as it runs here: ``auto`` is bf16 on a CUDA device that supports it (no loss scaling
    needed), fp16 on an older one, and none on the CPU (bf16 autocast there is slow without bf16 units)."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _adam(model: torch.nn.Module, r: Recipe, fused: bool):
    """(Adam, "fused" | "foreach"): the fused implementation (one kernel for all parameters) where torch
    has it for this device, when asked for; the default multi-tensor one otherwise."""
    kw = dict(lr=r.optimizer.lr, betas=tuple(r.optimizer.betas), eps=r.optimizer.eps,
              weight_decay=r.optimizer.weight_decay)
    if fused:
        try:
            return torch.optim.Adam(model.parameters(), fused=True, **kw), "fused"
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused Adam for this device/dtype in this torch: the default below
    return torch.optim.Adam(model.parameters(), **kw), "foreach"
