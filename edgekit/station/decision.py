"""OK/NG from the models' outputs, by the thresholds of a small TOML file (``--config FILE``).

The file and its defaults (every section and key is optional; anything else is refused)::

    [decision]
    ng_classes = []      # a top-1 class in this list -> NG ("class scratches")
    ok_classes = []      # when not empty: a top-1 class NOT in this list -> NG ("class X not in ok_classes")
    min_prob = 0.0       # a top-1 probability below it -> NG ("unsure (prob 0.41 < 0.5)"); 0: never unsure

    [segment]            # used when the station runs a --segment artifact
    threshold = 0.5      # a mask pixel at or above it is defect
    min_region_px = 16   # a defect region of at least this many pixels -> NG ("region 812 px")
    max_defect_frac = 1.0  # defect pixels (all, specks included) over this fraction of the image -> NG;
                           # 1.0: off (the region rule decides)

    [drift]
    enabled = true       # score every image against the serving adapter's training statistics
    threshold_scale = 1.0  # multiplies the threshold calibrated at adapt time (above 1: flags fewer)
    novel_is_ng = false  # a flagged (novel) image stays OK/NG by the rules above and gets the reason "novel";
                         # true: a flagged image is NG

With no file at all the station never says NG from a class alone (no class is listed): a plant names its
defect classes in ``ng_classes`` (or its good ones in ``ok_classes``).
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edgekit.errors import EdgekitError

_LIST = "a list of class names"
_PROB = "a number from 0 to 1"
_COUNT = "a whole number >= 0"
_BOOL = "true or false"
_SCALE = "a number > 0"
# section -> key -> (attribute, expected kind)
_SCHEMA = {
    "decision": {"ng_classes": ("ng_classes", _LIST), "ok_classes": ("ok_classes", _LIST),
                 "min_prob": ("min_prob", _PROB)},
    "segment": {"threshold": ("segment_threshold", _PROB), "min_region_px": ("min_region_px", _COUNT),
                "max_defect_frac": ("max_defect_frac", _PROB)},
    "drift": {"enabled": ("drift_enabled", _BOOL), "threshold_scale": ("drift_threshold_scale", _SCALE),
              "novel_is_ng": ("novel_is_ng", _BOOL)},
}


def _valid(value, kind) -> bool:
    if kind == _LIST:
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if kind == _BOOL:
        return isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _PROB:
        return number and 0.0 <= value <= 1.0
    if kind == _SCALE:
        return number and value > 0
    if kind == _COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    raise AssertionError(kind)


@dataclass
class StationConfig:
    ng_classes: list = field(default_factory=list)
    ok_classes: list = field(default_factory=list)
    min_prob: float = 0.0
    segment_threshold: float = 0.5
    min_region_px: int = 16
    max_defect_frac: float = 1.0
    drift_enabled: bool = True
    drift_threshold_scale: float = 1.0
    novel_is_ng: bool = False
    source: Optional[str] = None  # the file it came from (None: the defaults)

    @classmethod
    def load(cls, path=None) -> "StationConfig":
        """The config in ``path`` (TOML), or the defaults when ``path`` is None. Refuses, with one line
        naming the file and the key, a file that is missing or not TOML, an unknown section or key, and a
        value of the wrong type or range."""
        if path is None:
            return cls()
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EdgekitError(f"station config not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise EdgekitError(f"cannot read station config {p}: {e.__class__.__name__}: {e}".splitlines()[0]) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise EdgekitError(f"station config {p} is not valid TOML: {str(e).splitlines()[0]}") from None
        cfg = cls(source=str(p))
        for section, body in data.items():
            keys = _SCHEMA.get(section)
            known = ", ".join("[" + s + "]" for s in _SCHEMA)
            if not isinstance(body, dict):
                raise EdgekitError(f"station config {p}: key {section!r} outside any section "
                                   f"(keys go under {known})")
            if keys is None:
                raise EdgekitError(f"station config {p}: unknown section [{section}] (known: {known})")
            for key, value in body.items():
                if key not in keys:
                    raise EdgekitError(f"station config {p}: unknown key {key!r} in [{section}] "
                                       f"(known: {', '.join(keys)})")
                attr, kind = keys[key]
                if not _valid(value, kind):
                    raise EdgekitError(f"station config {p}: [{section}] {key} must be {kind}, got {value!r}")
                setattr(cfg, attr, float(value) if kind in (_PROB, _SCALE) else value)
        both = sorted(set(cfg.ng_classes) & set(cfg.ok_classes))
        if both:
            raise EdgekitError(f"station config {p}: [decision] class {both[0]!r} is in both ng_classes and ok_classes")
        return cfg

    def check_classes(self, classes) -> None:
        """Refuse class names in ng_classes/ok_classes that the serving adapter does not have (a typo would
        otherwise never match and every image pass)."""
        known = set(classes)
        for key in ("ng_classes", "ok_classes"):
            unknown = [c for c in getattr(self, key) if c not in known]
            if unknown:
                where = f"station config {self.source}" if self.source else "station config"
                raise EdgekitError(f"{where}: [decision] {key} names {unknown[0]!r}, which the serving adapter "
                                   f"does not have (its classes: {', '.join(classes)})")

    def as_dict(self) -> dict:
        return {section: {key: getattr(self, attr) for key, (attr, _) in keys.items()}
                for section, keys in _SCHEMA.items()}


def scaled_ood(ood: Optional[dict], cfg: StationConfig) -> Optional[dict]:
    """``ood`` as the drift scorer gives it (its calibrated threshold) with ``[drift] threshold_scale`` applied:
    the threshold multiplied and ``flagged`` recomputed; None when drift is off or unavailable. The Result's
    ``ood`` field is this (applied once, before :func:`decide`), so a reader sees the threshold that decided."""
    if ood is None or not cfg.drift_enabled:
        return None
    if cfg.drift_threshold_scale == 1.0 or ood.get("score") is None or ood.get("threshold") is None:
        return ood
    threshold = float(ood["threshold"]) * cfg.drift_threshold_scale
    return {**ood, "threshold": threshold, "flagged": bool(float(ood["score"]) > threshold)}


def decide(classification: Optional[dict], segment: Optional[dict], ood: Optional[dict],
           cfg: StationConfig) -> tuple[str, list[str]]:
    """``("OK" | "NG", reasons)``: every rule that says NG adds its reason, in the order class, probability,
    regions, defect fraction, novelty. A flagged out-of-distribution score adds the reason "novel" and
    changes the decision only with ``[drift] novel_is_ng = true``.

    ``classification``: ``{"class": str, "prob": float, ...}`` (the serving adapter's top-1) or None;
    ``segment``: ``{"regions": [{"area_px", ...}], "defect_frac": float, ...}`` or None;
    ``ood``: ``{"score", "threshold", "flagged": bool}`` as the Result carries it, ``threshold_scale`` already
    applied (:func:`scaled_ood`; the worker does it once, so the recorded threshold is the one that decided),
    or None (no drift statistics). Its ``flagged`` is taken as it is.
    """
    ng: list[str] = []
    if classification is not None and classification.get("class") is not None:
        name = classification["class"]
        if name in cfg.ng_classes:
            ng.append(f"class {name}")
        elif cfg.ok_classes and name not in cfg.ok_classes:
            ng.append(f"class {name} not in ok_classes")
        prob = classification.get("prob")
        if prob is not None and prob < cfg.min_prob:
            ng.append(f"unsure (prob {prob:.2f} < {cfg.min_prob:g})")
    if segment is not None:
        regions = [r for r in segment.get("regions") or () if r["area_px"] >= cfg.min_region_px]
        if regions:
            largest = max(r["area_px"] for r in regions)
            ng.append(f"region {largest} px" if len(regions) == 1 else f"{len(regions)} regions, largest {largest} px")
        frac = segment.get("defect_frac")
        if frac is not None and frac > cfg.max_defect_frac:
            ng.append(f"defect_frac {frac:.4f} > {cfg.max_defect_frac:g}")
    reasons = list(ng)
    if cfg.drift_enabled and ood is not None and ood.get("flagged"):
        reasons.append("novel")
        if cfg.novel_is_ng:
            ng.append("novel")
    return ("NG" if ng else "OK"), reasons
