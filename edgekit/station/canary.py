"""The canary: a trial adapter judged in shadow on live images, then promoted or rejected.

``edgekit update`` on a root with a canary policy keeps a trial that passed its health check on canary hold
(``edgekit.device.state``: trial["phase"] = "canary"; it does not serve). The station loads it beside the serving
adapter and runs both on the same pooled backbone features of the next N live images it inspects (``Canary``
counts them: images that failed to decode do not count; a restarted station starts again from zero, so it never
decides on images it did not see). Agreement is the fraction of those images where the trial's top-1 class is the
serving adapter's; confidence is the mean top-1 probability of each. The verdict:

* promote when agreement >= ``min_agreement`` and the trial's confidence >= the serving one's minus
  ``max_confidence_drop``: ``InstallRoot.commit`` (ROOT/current switched to it, the history records the reason);
* otherwise reject: ``InstallRoot.fail`` with the reason ("canary: agreement 0.62 < 0.95 on 200 live images"): the
  trial is discarded and its version blocked, so ``edgekit update`` never installs it again by itself.

The health check compares an adapter with its own packaged samples; an adapter that passes it can still disagree
with what the line shows (a label swap, a product the samples never covered). This gate is edgekit's own: Mender
and RAUC supply the commit / mark-bad split it acts through, and neither they nor TUF/Uptane gate on model quality.
``promote`` / ``reject`` are the operator's override (``edgekit station promote|reject ROOT``).
"""
from __future__ import annotations

import os
from typing import Optional

from edgekit.device.state import DEFAULT_MAX_CONFIDENCE_DROP, InstallRoot
from edgekit.errors import EdgekitError


class Canary:
    """Shadow counts of one trial version against the serving version; ``observe`` returns the verdict once, on the
    image that completes the count."""

    def __init__(self, version: str, serving: str, policy: dict):
        self.version, self.serving, self.policy = version, serving, dict(policy)
        self.needed = int(policy["images"])
        self.images = self.agree = 0
        self.serving_conf = self.trial_conf = 0.0
        self.verdict: Optional[dict] = None

    def observe(self, serving: dict, trial: dict) -> Optional[dict]:
        """Count one live image's two predictions ({"class", "prob", "task"?}); the verdict when this image
        completes the count, else None."""
        if self.verdict is not None:
            return None
        self.images += 1
        self.agree += int((serving.get("task"), serving["class"]) == (trial.get("task"), trial["class"]))
        self.serving_conf += float(serving["prob"])
        self.trial_conf += float(trial["prob"])
        if self.images < self.needed:
            return None
        self.verdict = self._judge()
        return self.verdict

    def _judge(self) -> dict:
        n = self.images
        agreement, conf_s, conf_t = self.agree / n, self.serving_conf / n, self.trial_conf / n
        want = float(self.policy["min_agreement"])
        drop = float(self.policy.get("max_confidence_drop", DEFAULT_MAX_CONFIDENCE_DROP))
        if agreement < want:
            reason = f"canary: agreement {agreement:.2f} < {want:.2f} on {n} live images"
        elif conf_t < conf_s - drop:
            reason = (f"canary: mean confidence {conf_t:.3f} < {conf_s:.3f} (serving {self.serving}) - {drop:g} "
                      f"on {n} live images")
        else:
            reason = None
        promote = reason is None
        if promote:
            reason = (f"canary: agreement {agreement:.2f} >= {want:.2f}, mean confidence {conf_t:.3f} vs "
                      f"{conf_s:.3f} (serving {self.serving}) on {n} live images")
        return {"verdict": "promote" if promote else "reject", "version": self.version, "serving": self.serving,
                "images": n, "agreement": agreement, "trial_confidence": conf_t, "serving_confidence": conf_s,
                "min_agreement": want, "max_confidence_drop": drop, "reason": reason}

    def state(self) -> dict:
        n = self.images
        return {"version": self.version, "serving": self.serving, "images": n, "needed": self.needed,
                "agreement": self.agree / n if n else None, "verdict": self.verdict["verdict"] if self.verdict else None}


def decide(root: str | os.PathLike, version: str, promote: bool, reason: str) -> dict:
    """Apply a verdict on the trial ``version`` held for a canary at ``root``: commit it (promote) or fail it with
    ``reason`` (reject: blocked). Refused (EdgekitError) when no such trial is on hold any more (an operator, or
    another station, decided first) or another transition holds the root's lock (try again)."""
    dev = InstallRoot(root)
    with dev.lock(create=False):
        held = dev.read().held
        if held is None or held["version"] != version:
            now = f"{held['version']} is" if held else "no trial is"
            raise EdgekitError(f"{version} is no longer on canary hold at {dev.path} ({now} on hold now)")
        if promote:
            state = dev.commit(version, reason)
        else:
            state = dev.fail(version, reason)
    return {"action": "promoted" if promote else "rejected", "version": version, "reason": reason,
            "serving": state.current["version"] if state.current else None}


def held_trial(root: str | os.PathLike) -> dict:
    """The trial on canary hold at ``root``; one error line when there is none."""
    dev = InstallRoot(root)
    if not dev.path.is_dir():
        raise EdgekitError(f"install root {root} does not exist")
    state = dev.read()
    held = state.held
    if held is None:
        what = (f"{state.trial['version']} is on trial, its health check not finished" if state.trial else
                "no trial is on hold")
        raise EdgekitError(f"nothing to decide at {root}: {what}")
    return held


def promote(root: str | os.PathLike, reason: Optional[str] = None) -> dict:
    """The operator's override: commit the trial on canary hold."""
    held = held_trial(root)
    return decide(root, held["version"], True, reason or "promoted by the operator (edgekit station promote)")


def reject(root: str | os.PathLike, reason: Optional[str] = None) -> dict:
    """The operator's override: discard the trial on canary hold and block its version."""
    held = held_trial(root)
    return decide(root, held["version"], False, f"rejected by the operator: {reason}" if reason else
                  "rejected by the operator (edgekit station reject)")
