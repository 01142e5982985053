"""``edgekit station status ROOT``: what a station over ROOT serves, tries and decided, read from the install root's
state and the station's database (read-only: it works while the station runs, and without it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edgekit.device.state import InstallRoot
from edgekit.errors import EdgekitError

DB_NAME = "station.db"


def read_status(root: str | os.PathLike, db: Optional[str | os.PathLike] = None, events: int = 50) -> dict:
    dev = InstallRoot(root)
    if not dev.path.is_dir():
        raise EdgekitError(f"install root {root} does not exist")
    state = dev.read()
    held = state.held
    db_path = Path(db) if db else dev.path / DB_NAME
    counts = last_verdict = None
    recent, errors = [], []
    if db_path.is_file():
        from edgekit.station.store import ResultStore

        store = ResultStore(db_path, read_only=True)
        try:
            counts = store.counts()
            recent = store.events(events)
        finally:
            store.close()
        last_verdict = next((e for e in recent if e["kind"] == "canary"), None)
        errors = [e for e in recent if e["kind"] == "error"][:5]
    elif db is not None:
        raise EdgekitError(f"--db {db_path}: no such file")
    images = counts["images"] if counts else 0
    return {"root": str(dev.path), "serving": state.current["version"] if state.current else None,
            "previous": state.previous["version"] if state.previous else None,
            "trial": state.trial["version"] if state.trial else None,
            "trial_phase": (state.trial.get("phase") or "health-check") if state.trial else None,
            "trial_held": held.get("held") if held else None, "canary_policy": state.canary,
            "blocked": dict(state.blocked), "pinned": state.pinned, "db": str(db_path), "counts": counts,
            "drift_rate": (counts["flagged"] / images) if counts and images else None,
            "last_verdict": last_verdict, "last_errors": errors,
            "events": recent[:10], "history": state.history[-10:]}
