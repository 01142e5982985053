"""The station's record: every result, committed to SQLite before anyone is told about it.

A result is *done* when ``ResultStore.commit`` returns: the batch's rows are in one transaction, the database
runs in WAL mode with ``synchronous=FULL`` (the WAL is fsynced at every commit), so a committed row survives a
kill -9 of the station and a power cut, and a killed writer leaves a readable database (SQLite rolls back the
unfinished transaction when it is next opened).

Tables::

    results   id INTEGER PRIMARY KEY AUTOINCREMENT  the result's "id" (never reused, also after a prune, so a
                                                    consumer may drop an MQTT redelivery by (station, id))
              key TEXT UNIQUE        the input's identity (a watched file's path+size+mtime, an HTTP upload's
                                     uuid): INSERT OR IGNORE, so the same input committed twice is one row
              committed REAL         unix time of the commit (the age bound)
              received, decision, serving_version, flagged   indexed copies of the result's fields
              published INTEGER      0 until the MQTT broker acknowledged it (the outbox: partial index)
              result TEXT            the Result as JSON (without "id", which is the rowid)
    events    id, time (UTC ISO-8601), kind, fields (JSON), published: swaps, canary verdicts, errors, drops
    counters  name -> value: images, ok, ng, error, flagged (totals since the database was created: a prune
              does not lower them), rows (held now), pruned, dropped_unpublished

Bounds (``prune``): the oldest *published* rows go past ``keep_rows`` rows or ``keep_days`` days. A row the
broker has not acknowledged is kept (the outbox must not lose it) unless the table holds more than twice
``keep_rows``: then the oldest unpublished rows go too, recorded as a ``dropped_unpublished`` event, so a broker
that never comes back cannot fill the disk. ``commit`` calls ``prune`` by itself at most every
``prune_every_s`` seconds.

Connections: one ``ResultStore`` per thread that writes (the station's worker commits; the MQTT publisher opens
its own to drain the outbox); WAL lets readers (``station status``: ``read_only=True``, a ``mode=ro`` URI) read
while they write.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from edgekit.device.state import utc_now
from edgekit.errors import EdgekitError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    committed REAL NOT NULL,
    received TEXT,
    decision TEXT,
    serving_version TEXT,
    flagged INTEGER NOT NULL DEFAULT 0,
    published INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_outbox ON results(id) WHERE published = 0;
CREATE INDEX IF NOT EXISTS results_committed ON results(committed);
CREATE INDEX IF NOT EXISTS results_received ON results(received);
CREATE INDEX IF NOT EXISTS results_decision ON results(decision);
CREATE INDEX IF NOT EXISTS results_serving ON results(serving_version);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    fields TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_outbox ON events(id) WHERE published = 0;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
COUNTERS = ("images", "ok", "ng", "error", "flagged", "rows", "pruned", "dropped_unpublished")
CHUNK = 500  # ids/keys per statement (SQLite's bound-parameter limit is 999 on old builds)
PRUNE_CHUNK = 5000  # rows deleted per transaction: a prune never holds the write lock for long


def _json_default(value):
    # numpy scalars and arrays from the models: their Python value
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


def _chunks(items: list, n: int = CHUNK) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class ResultStore:
    """The station's SQLite database (see the module docstring). Thread-safe per instance (a lock), but open
    one per writing thread: each has its own connection."""

    def __init__(self, path, keep_rows: Optional[int] = 1_000_000, keep_days: Optional[float] = 30.0,
                 keep_events: int = 10_000, read_only: bool = False, busy_timeout_s: float = 10.0,
                 prune_every_s: float = 30.0):
        if keep_rows is not None and keep_rows < 1:
            raise EdgekitError(f"keep_rows must be at least 1 (got {keep_rows})")
        if keep_days is not None and keep_days <= 0:
            raise EdgekitError(f"keep_days must be positive (got {keep_days})")
        self.path = Path(path)
        self.keep_rows, self.keep_days, self.keep_events = keep_rows, keep_days, keep_events
        self.read_only = read_only
        self.prune_every_s = prune_every_s
        self._lock = threading.RLock()
        self._last_prune = time.monotonic()
        try:
            if read_only:
                if not self.path.is_file():
                    raise EdgekitError(f"no station database at {self.path}")
                uri = self.path.absolute().as_uri() + "?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                             timeout=busy_timeout_s)
                tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if not {"results", "events", "counters"} <= tables:
                    self._conn.close()
                    raise EdgekitError(f"{self.path} is not a station database (no results table)")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                             timeout=busy_timeout_s)
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise EdgekitError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode}); is it on a "
                                       "network filesystem?")
                # FULL: the WAL is fsynced at every commit (NORMAL in WAL mode may lose the last commits on power
                # loss); a committed result must survive.
                self._conn.execute("PRAGMA synchronous=FULL")
                with self._transaction():
                    for statement in SCHEMA.split(";"):  # (executescript would COMMIT the transaction first)
                        if statement.strip():
                            self._conn.execute(statement)
                    self._conn.executemany("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)",
                                           [(c,) for c in COUNTERS])
                    version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise EdgekitError(f"{self.path} was written by a newer edgekit (schema {version}; this "
                                           f"one reads {SCHEMA_VERSION})")
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise EdgekitError(f"cannot open the station database {self.path}: {e}") from None

    # -- plumbing

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction (BEGIN IMMEDIATE: the write lock is taken now, waiting up to the busy timeout)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _add(self, counts: dict) -> None:
        self._conn.executemany("UPDATE counters SET value = value + ? WHERE name = ?",
                               [(v, k) for k, v in counts.items() if v])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- results

    def seen(self, keys: Iterable[str]) -> set:
        """The keys among ``keys`` that are already committed."""
        keys = list(dict.fromkeys(keys))
        found = set()
        with self._lock:
            for part in _chunks(keys):
                q = f"SELECT key FROM results WHERE key IN ({','.join('?' * len(part))})"
                found.update(r[0] for r in self._conn.execute(q, part))
        return found

    def commit(self, results: list) -> list:
        """Commit ``results`` (Result dicts, each with a "key") in ONE transaction, durable when this returns.
        Sets each result's "id" (the rowid) and returns the ids in order. A key already committed (or twice in
        the batch) is not a second row: that result gets the id of the row that holds its key."""
        if self.read_only:
            raise EdgekitError(f"{self.path} is open read-only")
        ids = []
        tally = dict.fromkeys(COUNTERS, 0)
        now = time.time()
        with self._transaction() as conn:
            for result in results:
                key = result.get("key")
                if not key:
                    raise ValueError("a result without a key cannot be committed")
                body = {k: v for k, v in result.items() if k != "id"}
                ood = result.get("ood") or {}
                serving = result.get("serving") or {}
                decision = result.get("decision")
                cur = conn.execute(
                    "INSERT OR IGNORE INTO results(key, committed, received, decision, serving_version, flagged, "
                    "result) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, now, result.get("received"), decision,
                     serving.get("version") if isinstance(serving, dict) else None,
                     1 if isinstance(ood, dict) and ood.get("flagged") else 0, _dumps(body)))
                if cur.rowcount == 1:
                    rowid = cur.lastrowid
                    tally["images"] += 1
                    tally["rows"] += 1
                    tally[{"OK": "ok", "NG": "ng"}.get(decision, "error")] += 1
                    tally["flagged"] += 1 if isinstance(ood, dict) and ood.get("flagged") else 0
                else:
                    rowid = conn.execute("SELECT id FROM results WHERE key = ?", (key,)).fetchone()[0]
                ids.append(rowid)
            self._add(tally)
        for result, rowid in zip(results, ids):
            result["id"] = rowid
        if time.monotonic() - self._last_prune >= self.prune_every_s:
            self.prune()
        return ids

    def _results(self, rows) -> list:
        out = []
        for rowid, text in rows:
            result = json.loads(text)
            result["id"] = rowid
            out.append(result)
        return out

    def unpublished(self, limit: int = 100, after: int = 0) -> list:
        """The outbox: ``(id, result)`` of rows not yet acknowledged by the broker, oldest first, ids > ``after``."""
        with self._lock:
            rows = self._conn.execute("SELECT id, result FROM results WHERE published = 0 AND id > ? "
                                      "ORDER BY id LIMIT ?", (after, limit)).fetchall()
        return [(r["id"], r) for r in self._results(rows)]

    def mark_published(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self._transaction() as conn:
            for part in _chunks(ids):
                conn.execute(f"UPDATE results SET published = 1 WHERE id IN ({','.join('?' * len(part))})", part)

    def get(self, rowid: int) -> Optional[dict]:
        with self._lock:
            rows = self._conn.execute("SELECT id, result FROM results WHERE id = ?", (rowid,)).fetchall()
        return self._results(rows)[0] if rows else None

    def recent(self, n: int = 10) -> list:
        """The newest ``n`` results, newest first."""
        with self._lock:
            rows = self._conn.execute("SELECT id, result FROM results ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return self._results(rows)

    def counts(self) -> dict:
        """{"images", "ok", "ng", "error", "flagged"} (totals since the database was created, pruned rows
        included), "unpublished" (the outbox), "rows" (held now), "pruned", "dropped_unpublished", and "first" /
        "last" (the "received" time of the oldest and newest row held; None when empty)."""
        with self._lock:
            out = {name: value for name, value in self._conn.execute("SELECT name, value FROM counters")}
            out = {c: int(out.get(c, 0)) for c in COUNTERS}
            out["unpublished"] = self._conn.execute("SELECT COUNT(*) FROM results WHERE published = 0").fetchone()[0]
            first = self._conn.execute("SELECT received FROM results ORDER BY id LIMIT 1").fetchone()
            last = self._conn.execute("SELECT received FROM results ORDER BY id DESC LIMIT 1").fetchone()
        out["first"], out["last"] = (first[0] if first else None), (last[0] if last else None)
        return out

    # -- events

    def event(self, kind: str, **fields) -> int:
        """Record an event (a swap, a canary verdict, an error, a start); returns its id. Published on MQTT at
        ``<topic>/events`` like the results (its own outbox)."""
        if self.read_only:
            raise EdgekitError(f"{self.path} is open read-only")
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO events(time, kind, fields) VALUES (?, ?, ?)",
                               (utc_now(), kind, _dumps(fields)))
            return cur.lastrowid

    def _events(self, rows) -> list:
        return [{**json.loads(fields), "id": rowid, "time": when, "kind": kind} for rowid, when, kind, fields in rows]

    def events(self, n: int = 10) -> list:
        """The newest ``n`` events, newest first: {"id", "time", "kind", **fields}."""
        with self._lock:
            rows = self._conn.execute("SELECT id, time, kind, fields FROM events ORDER BY id DESC LIMIT ?",
                                      (n,)).fetchall()
        return self._events(rows)

    def unpublished_events(self, limit: int = 100, after: int = 0) -> list:
        with self._lock:
            rows = self._conn.execute("SELECT id, time, kind, fields FROM events WHERE published = 0 AND id > ? "
                                      "ORDER BY id LIMIT ?", (after, limit)).fetchall()
        return [(e["id"], e) for e in self._events(rows)]

    def mark_events_published(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self._transaction() as conn:
            for part in _chunks(ids):
                conn.execute(f"UPDATE events SET published = 1 WHERE id IN ({','.join('?' * len(part))})", part)

    # -- bounds

    def _delete_chunks(self, select: str, params: tuple, limit: Optional[int] = None) -> tuple:
        """Delete the result rows ``select`` names (oldest first), PRUNE_CHUNK per transaction, at most ``limit``;
        returns (count, first id, last id)."""
        total, first, last = 0, None, None
        while limit is None or total < limit:
            n = PRUNE_CHUNK if limit is None else min(PRUNE_CHUNK, limit - total)
            with self._transaction() as conn:
                ids = [r[0] for r in conn.execute(f"{select} ORDER BY id LIMIT ?", (*params, n))]
                if not ids:
                    break
                for part in _chunks(ids):
                    conn.execute(f"DELETE FROM results WHERE id IN ({','.join('?' * len(part))})", part)
                self._add({"rows": -len(ids)})
            first = ids[0] if first is None else first
            last, total = ids[-1], total + len(ids)
            if len(ids) < n:
                break
        return total, first, last

    def _rows(self) -> int:
        return self._conn.execute("SELECT value FROM counters WHERE name = 'rows'").fetchone()[0]

    def prune(self) -> int:
        """Apply the bounds (module docstring); returns the number of result rows deleted."""
        if self.read_only:
            raise EdgekitError(f"{self.path} is open read-only")
        with self._lock:
            self._last_prune = time.monotonic()
            deleted = 0
            if self.keep_days is not None:
                n, _, _ = self._delete_chunks("SELECT id FROM results WHERE published = 1 AND committed < ?",
                                              (time.time() - self.keep_days * 86400.0,))
                deleted += n
            if self.keep_rows is not None:
                over = self._rows() - self.keep_rows
                if over > 0:
                    n, _, _ = self._delete_chunks("SELECT id FROM results WHERE published = 1", (), limit=over)
                    deleted += n
                over = self._rows() - 2 * self.keep_rows
                if over > 0:  # a broker away for long: the oldest unpublished results go, said so
                    n, first, last = self._delete_chunks("SELECT id FROM results WHERE published = 0", (), limit=over)
                    if n:
                        with self._transaction():
                            self._add({"dropped_unpublished": n})
                        self.event("dropped_unpublished", count=n, first_id=first, last_id=last,
                                   reason=f"the outbox held more than 2 x keep_rows ({2 * self.keep_rows}) rows: "
                                          "the broker has not acknowledged them")
                    deleted += n
            if deleted:
                with self._transaction():
                    self._add({"pruned": deleted})
            with self._transaction() as conn:  # events: the newest keep_events published (2x when unpublished)
                for published, bound in ((1, self.keep_events), (None, 2 * self.keep_events)):
                    where = "WHERE published = 1" if published else ""
                    conn.execute(f"DELETE FROM events WHERE id IN (SELECT id FROM events {where} ORDER BY id DESC "
                                 "LIMIT -1 OFFSET ?)", (bound,))
        return deleted
