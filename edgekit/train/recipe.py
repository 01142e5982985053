"""Training recipes: a YAML file read into dataclasses, strictly.

A recipe has the base sections (``model``, ``data``, ``preprocess``, ``optimizer``, ``schedule``,
``loss``, ``augment``, ``train``) and ``profiles``: named partial overrides (``cpu``, ``gpu``) merged
over the base. Every key is checked against the dataclasses below, in the base and in every profile,
before anything runs: an unknown key or a value of the wrong type is one error line naming the key
(``recipe: unknown key 'optimizer.lr_max'``, ``recipe: 'train.batch' must be an int, got str``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from edgekit.errors import EdgekitError


@dataclass
class ModelSection:
    """Architecture. Everything but ``name`` goes to ``GMBINetConfig``."""
    name: str = "gmbinet"
    in_channels: int = 3
    widths: List[int] = field(default_factory=lambda: [16, 32, 64, 96, 128])
    depths: List[int] = field(default_factory=lambda: [3, 4, 6, 3])
    scales: int = 4
    out_channels: int = 1
    dropout: float = 0.1
    head_width: Optional[int] = None  # DF1's output channels; null: widths[0] (pruned models set it)

    def config(self) -> dict:
        """The architecture config as the model builder and checkpoints hold it."""
        from edgekit.models.gmbinet import GMBINetConfig

        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        return GMBINetConfig.from_dict(d).to_dict()


@dataclass
class DataSection:
    """Where the data is and which ``split.json`` lists are used for what. A relative ``path`` is
    resolved against the recipe file's folder; ``--data`` overrides it."""
    path: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"  # model selection: the best val IoU is kept
    test_split: str = "test"  # only for the final report


@dataclass
class PreprocessSection:
    """Must match what the checkpoint will be run with; recorded in it as its ``PreprocessSpec``."""
    mean: float = 0.4669
    std: float = 0.2437
    scale: str = "max"  # "max": divide by the image's own maximum; "255"
    channels: int = 3
    input_size: List[int] = field(default_factory=lambda: [512, 512])  # (height, width)
    resize: str = "stretch"  # how images reach input_size: stretch | letterbox (aspect kept, padded)


@dataclass
class OptimizerSection:
    name: str = "adam"
    lr: float = 1.0e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 0.0


@dataclass
class ScheduleSection:
    name: str = "cosine"  # cosine annealing from optimizer.lr to min_lr over train.iterations
    min_lr: float = 1.0e-6
    warmup_iterations: int = 0  # linear warm-up from 0, then the cosine


@dataclass
class LossSection:
    """Per head: ``bce * BCE + ssim * (1 - SSIM)`` (+ ``dice_weight * Dice`` when ``dice``), summed
    over the five deep-supervision heads with ``head_weights`` (main head first)."""
    bce: float = 1.0
    ssim: float = 1.0
    ssim_window: int = 11
    ssim_sigma: float = 1.5
    dice: bool = False
    dice_weight: float = 1.0
    head_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    # Knowledge distillation when a teacher is given (edgekit prune --finetune: the unpruned model):
    # + distill * BCE(student main head, teacher main head probabilities).
    distill: float = 0.0


@dataclass
class AugmentSection:
    """Applied to the raw gray image (0..255) before the divide-by-max and normalisation."""
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.5  # probability of a vertical flip
    shift: float = 0.1  # intensity shift: add U(-shift, shift) * 255
    scale: float = 0.2  # intensity scaling about the image mean: factor U(1 - scale, 1 + scale)
    # Random [height, width] window of the preprocessed (input_size) image and mask: trains at the
    # deployed object scale for a fraction of the compute; null trains on the whole image.
    crop: Optional[List[int]] = None


@dataclass
class TrainSection:
    iterations: int = 50000
    batch: int = 32
    seed: int = 900
    device: str = "auto"  # auto | cpu | cuda
    # none | fp16 | bf16 (torch.autocast; fp16 uses a GradScaler) | auto: on CUDA bf16 where the GPU
    # supports it, else fp16; none on the CPU
    amp: str = "none"
    channels_last: bool = False
    # The decoded train split on the training device; batches drawn, augmented and preprocessed there
    # (edgekit.train.device_data), with no host sync per step, and a fused optimizer where torch has one.
    device_data: bool = False
    # none | compile (torch.compile of the model for the training step) | graph (torch.compile's
    # "reduce-overhead" mode: forward and backward replayed from CUDA graphs; CUDA only)
    compile: str = "none"
    threads: int = 2  # torch.set_num_threads on CPU
    val_every: int = 1000  # iterations between val evaluations (and at the end)
    checkpoint_every: int = 1000  # iterations between last.pt saves (and at the end)
    val_batch: int = 16
    log_every: int = 10  # iterations between progress-bar loss updates


@dataclass
class Recipe:
    name: str
    description: str = ""
    default_profile: Optional[str] = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    train: TrainSection = field(default_factory=TrainSection)
    # Not part of the schema proper: filled in by load_recipe.
    profile: Optional[str] = None
    profiles: List[str] = field(default_factory=list)
    source: Optional[str] = None
    sha256: str = ""
    text: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in _META:
            d.pop(k, None)
        return d

    def data_path(self) -> Optional[str]:
        p = self.data.path
        if p and not p.startswith("synthetic") and self.source and not Path(p).is_absolute():
            return str((Path(self.source).parent / p).resolve())
        return p


_META = ("profile", "profiles", "source", "sha256", "text")
_TOP_EXTRA = ("profiles",)


def _err(msg: str) -> EdgekitError:
    return EdgekitError(f"recipe: {msg}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin in (list, List):
        (arg,) = typing.get_args(tp)
        return f"a list of {_type_name(arg).split(' ', 1)[1]}s"
    return {int: "an int", float: "a number", str: "a string", bool: "a bool (true/false)"}.get(tp, str(tp))


_FLOATLIKE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _check_value(value, tp, key: str):
    """``value`` converted to ``tp`` (int -> float only), or one error line naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_value(value, args[0], key)
    got = "null" if value is None else type(value).__name__

    def bad():
        hint = ""
        if tp is float and isinstance(value, str) and _FLOATLIKE.match(value.strip()):
            hint = f" (YAML reads {value} as text; write it with a decimal point, e.g. 1.0e-3)"
        return _err(f"'{key}' must be {_type_name(tp)}, got {got}{hint}")

    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (arg,) = typing.get_args(tp)
        return [_check_value(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # pragma: no cover


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_section(d, cls, prefix: str, partial: bool) -> dict:
    """Validate a mapping against a dataclass; returns the converted values (only those given)."""
    if not isinstance(d, dict):
        raise _err(f"'{prefix.rstrip('.')}' must be a mapping of keys, got {type(d).__name__}")
    hints = _hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in _META]
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not isinstance(k, str) or k not in allowed:
            raise _err(f"unknown key '{key}'")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            out[k] = _check_section(v if v is not None else {}, tp, f"{key}.", partial)
        else:
            out[k] = _check_value(v, tp, key)
    if not partial:
        for f in dataclasses.fields(cls):
            if f.name in _META:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in out:
                raise _err(f"missing key '{prefix}{f.name}'")
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _build(cls, d: dict):
    hints = _hints(cls)
    kw = {}
    for k, v in d.items():
        kw[k] = _build(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v
    return cls(**kw)


def _check_semantics(r: Recipe) -> None:
    def need(cond, msg):
        if not cond:
            raise _err(msg)

    need(r.model.name == "gmbinet", f"'model.name' {r.model.name!r} is not supported (only 'gmbinet')")
    need(r.preprocess.scale in ("max", "255"), "'preprocess.scale' must be 'max' or '255'")
    need(r.preprocess.resize in ("stretch", "letterbox"), "'preprocess.resize' must be 'stretch' or 'letterbox'")
    need(len(r.preprocess.input_size) == 2 and min(r.preprocess.input_size) >= 32,
         "'preprocess.input_size' must be [height, width], each >= 32")
    need(r.preprocess.std > 0, "'preprocess.std' must be > 0")
    need(r.optimizer.name == "adam", f"'optimizer.name' {r.optimizer.name!r} is not supported (only 'adam')")
    need(len(r.optimizer.betas) == 2, "'optimizer.betas' must be two numbers")
    need(r.optimizer.lr > 0, "'optimizer.lr' must be > 0")
    need(r.schedule.name in ("cosine", "constant"), "'schedule.name' must be 'cosine' or 'constant'")
    need(r.loss.ssim_window % 2 == 1 and r.loss.ssim_window >= 3, "'loss.ssim_window' must be odd and >= 3")
    need(1 <= len(r.loss.head_weights) <= 5, "'loss.head_weights' needs 1 to 5 weights (main head first)")
    for k in ("hflip", "vflip"):
        need(0 <= getattr(r.augment, k) <= 1, f"'augment.{k}' is a probability in [0, 1]")
    need(0 <= r.augment.scale < 1, "'augment.scale' must be in [0, 1)")
    need(r.augment.shift >= 0, "'augment.shift' must be >= 0")
    if r.augment.crop is not None:
        c = r.augment.crop
        need(len(c) == 2 and all(v >= 32 and v % 32 == 0 for v in c),
             "'augment.crop' must be [height, width], each a multiple of 32 (the network's stride)")
        need(all(v <= s for v, s in zip(c, r.preprocess.input_size)),
             f"'augment.crop' {c} is larger than 'preprocess.input_size' {r.preprocess.input_size}")
    t = r.train
    for k in ("iterations", "batch", "threads", "val_every", "checkpoint_every", "val_batch", "log_every"):
        need(getattr(t, k) >= 1, f"'train.{k}' must be >= 1")
    need(t.device in ("auto", "cpu", "cuda"), "'train.device' must be auto, cpu or cuda")
    need(t.amp in ("none", "fp16", "bf16", "auto"), "'train.amp' must be none, fp16, bf16 or auto")
    need(t.compile in ("none", "compile", "graph"), "'train.compile' must be none, compile or graph")
    try:
        r.model.config()
    except EdgekitError as e:
        raise _err(f"model: {e}") from None


def parse_recipe(text: str, profile: Optional[str] = None, source: Optional[str] = None) -> Recipe:
    """Validate a recipe's YAML text (base and all profiles) and resolve one profile."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise _err(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise _err("the file must be a mapping of sections (model, data, train, ...)")
    raw = dict(raw)
    profiles_raw = raw.pop("profiles", None) or {}
    if not isinstance(profiles_raw, dict):
        raise _err(f"'profiles' must be a mapping of profile names, got {type(profiles_raw).__name__}")
    base = _check_section(raw, Recipe, "", partial=False)
    profiles = {}
    for name, over in profiles_raw.items():
        over = over if over is not None else {}
        if isinstance(over, dict) and ("profiles" in over or "name" in over):
            bad = "profiles" if "profiles" in over else "name"
            raise _err(f"unknown key 'profiles.{name}.{bad}' (a profile cannot set it)")
        profiles[str(name)] = _check_section(over, Recipe, f"profiles.{name}.", partial=True)
    chosen = profile or base.get("default_profile")
    if chosen is not None and chosen not in profiles:
        known = ", ".join(profiles) or "none"
        raise _err(f"no profile {chosen!r} (profiles: {known})")
    merged = _merge(base, profiles[chosen]) if chosen else base
    recipe = _build(Recipe, merged)
    # Check every profile's semantics too, so a bad gpu profile fails on a cpu run as well.
    for name, over in profiles.items():
        try:
            _check_semantics(_build(Recipe, _merge(base, over)))
        except EdgekitError as e:
            raise EdgekitError(str(e).replace("recipe: ", f"recipe (profile {name}): ", 1)) from None
    _check_semantics(recipe)
    recipe.profile = chosen
    recipe.profiles = list(profiles)
    recipe.source = source
    recipe.text = text
    recipe.sha256 = hashlib.sha256(text.encode()).hexdigest()
    return recipe


def load_recipe(path, profile: Optional[str] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"recipe not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read recipe {path}: {e}") from None
    r = parse_recipe(text, profile, source=str(path))
    r.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return r


_BUDGET = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_budget(text: str) -> float:
    """Seconds of a ``--budget`` such as ``6m``, ``90s``, ``1h``, ``2m30s`` or ``300`` (seconds)."""
    t = str(text).strip().lower()
    m = _BUDGET.match(t)
    if not t or not m or not any(m.groups()):
        raise EdgekitError(f"--budget {text!r}: give a duration such as 6m, 90s, 1h or 2m30s")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = 3600 * h + 60 * mi + s
    if seconds < 10:
        raise EdgekitError(f"--budget {text!r} is under 10 s: too short to measure a step and validate")
    return seconds
