"""``edgekit station status ROOT``: what a station over ROOT serves, tries and decided, read from the install root's
state and the station's database (read-only: it works while the station runs, and without it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edgekit.device.state import InstallRoot
from edgekit.errors import EdgekitError

DB_NAME = "station.db"
DRIFT_WINDOW = 1000  # the drift rate is over the newest this many results


def read_status(root: str | os.PathLike, db: Optional[str | os.PathLike] = None, events: int = 50) -> dict:
    dev = InstallRoot(root)
    if not dev.path.is_dir():
        raise EdgekitError(f"install root {root} does not exist")
    state = dev.read()
    held = state.held
    db_path = Path(db) if db else dev.path / DB_NAME
    counts = last_verdict = None
    recent, errors, scored = [], [], []
    if db_path.is_file():
        from edgekit.station.store import ResultStore

        store = ResultStore(db_path, read_only=True)
        try:
            counts = store.counts()
            recent = store.events(events)
            scored = [r["ood"] for r in store.recent(DRIFT_WINDOW) if r.get("ood")]
        finally:
            store.close()
        last_verdict = next((e for e in recent if e["kind"] == "canary"), None)
        errors = [e for e in recent if e["kind"] == "error"][:5]
    elif db is not None:
        raise EdgekitError(f"--db {db_path}: no such file")
    return {"root": str(dev.path), "serving": state.current["version"] if state.current else None,
            "previous": state.previous["version"] if state.previous else None,
            "trial": state.trial["version"] if state.trial else None,
            "trial_phase": (state.trial.get("phase") or "health-check") if state.trial else None,
            "trial_held": held.get("held") if held else None, "canary_policy": state.canary,
            "blocked": dict(state.blocked), "pinned": state.pinned, "db": str(db_path), "counts": counts,
            # over the newest scored images; None when none was scored (the adapter carries no drift statistics)
            "drift_rate": (sum(bool(o.get("flagged")) for o in scored) / len(scored)) if scored else None,
            "drift_scored": len(scored),
            "last_verdict": last_verdict, "last_errors": errors,
            "events": recent[:10], "history": state.history[-10:]}
