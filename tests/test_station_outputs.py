"""The station's outputs against real parts: SQLite (edgekit.station.store), a real mosquitto broker on 127.0.0.1
(edgekit.station.mqtt, `edgekit fleet status`), and a real HTTP scrape of the Prometheus endpoint
(edgekit.station.metrics)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.station.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]


def make_result(key: str, decision: str = "OK", **extra) -> dict:
    result = {"station": "st-test", "key": key, "source": "watch", "name": key.split(":")[-1],
              "received": "2026-12-06T18:00:00Z", "decided": "2026-12-06T18:00:00Z", "latency_s": 0.01,
              "decision": decision, "reasons": [] if decision == "OK" else ["class scratches"],
              "class": "ok" if decision == "OK" else "scratches", "prob": 0.9, "task": "neu",
              "serving": {"version": "1.0.0", "backbone": "efficientnet-lite0"}, "trial": None, "segment": None,
              "ood": {"score": 1.0, "threshold": 2.0, "flagged": False}, "error": None}
    result.update(extra)
    return result


# -- SQLite


def test_commit_sets_ids_and_a_duplicate_key_is_not_a_second_row(tmp_path):
    store = ResultStore(tmp_path / "station.db")
    batch = [make_result(f"watch:a{i}.png:10:1", "NG" if i == 1 else "OK") for i in range(3)]
    ids = store.commit(batch)
    assert ids == [r["id"] for r in batch] and len(set(ids)) == 3 and ids == sorted(ids)
    # the same input again (a rescan after a restart), and twice within one batch: no new row, the first id
    again = [make_result("watch:a1.png:10:1"), make_result("watch:b.png:5:2"), make_result("watch:b.png:5:2")]
    ids2 = store.commit(again)
    assert ids2[0] == ids[1] and ids2[1] == ids2[2] and ids2[1] not in ids
    counts = store.counts()
    assert (counts["images"], counts["rows"], counts["ok"], counts["ng"], counts["unpublished"]) == (4, 4, 3, 1, 4)
    assert store.seen(["watch:a1.png:10:1", "watch:b.png:5:2", "watch:never"]) == {"watch:a1.png:10:1",
                                                                                  "watch:b.png:5:2"}
    # the row keeps what was committed first (the NG), with its id; the outbox is in id order
    assert store.get(ids[1])["decision"] == "NG"
    assert [i for i, _ in store.unpublished(10)] == sorted(ids + [ids2[1]])
    # the unique key holds in SQLite itself, not only in commit()
    raw = sqlite3.connect(tmp_path / "station.db")
    assert raw.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM results").fetchone() == (4, 4)
    raw.close()
    store.close()


def test_prune_bounds_rows_and_age_and_keeps_unpublished_rows(tmp_path):
    path = tmp_path / "station.db"
    store = ResultStore(path, keep_rows=10, keep_days=1.0)
    ids = store.commit([make_result(f"k{i}") for i in range(15)])
    # nothing acknowledged by a broker yet: 15 rows > keep_rows, but all unpublished, so all stay
    assert store.prune() == 0 and store.counts()["rows"] == 15
    store.mark_published(ids[:12])
    assert store.prune() == 5  # back to keep_rows, the oldest published first
    left = sqlite3.connect(path).execute("SELECT id FROM results ORDER BY id").fetchall()
    assert [r[0] for r in left] == ids[5:]
    # age: rows committed 40 days ago go when published, stay while unpublished
    raw = sqlite3.connect(path)
    raw.execute("UPDATE results SET committed = committed - 40 * 86400 WHERE id IN (?, ?, ?)", ids[5:7] + ids[13:14])
    raw.commit()
    raw.close()
    assert store.prune() == 2
    assert [i for i, _ in store.unpublished(100)] == ids[12:]  # the old unpublished one (ids[13]) is still there
    c = store.counts()
    assert (c["images"], c["rows"], c["pruned"], c["dropped_unpublished"]) == (15, 8, 7, 0)  # totals kept
    store.close()


def test_unpublished_rows_are_dropped_only_past_twice_the_bound_with_an_event(tmp_path):
    store = ResultStore(tmp_path / "station.db", keep_rows=10, keep_days=None)
    ids = store.commit([make_result(f"k{i}") for i in range(20)])
    assert store.prune() == 0  # 2 x keep_rows exactly: kept
    ids += store.commit([make_result(f"k{i}") for i in range(20, 26)])
    assert store.prune() == 6
    assert [i for i, _ in store.unpublished(100)] == ids[6:]  # the oldest went
    event = store.events(1)[0]
    assert event["kind"] == "dropped_unpublished" and (event["count"], event["first_id"], event["last_id"]) == (
        6, ids[0], ids[5])
    assert store.counts()["dropped_unpublished"] == 6
    # ids are never reused after a prune (a consumer drops MQTT redeliveries by (station, id))
    store.mark_published(ids)
    store.prune()
    assert store.commit([make_result("fresh")])[0] == ids[-1] + 1
    store.close()


def test_read_only_open_for_status_and_refusals(tmp_path):
    path = tmp_path / "station.db"
    writer = ResultStore(path)
    writer.commit([make_result("a"), make_result("b", "NG")])
    writer.event("start", version="1.0.0")
    reader = ResultStore(path, read_only=True)  # while the writer has it open (WAL)
    assert reader.counts()["images"] == 2 and [r["key"] for r in reader.recent(5)] == ["b", "a"]
    assert reader.events(5)[0]["kind"] == "start"
    writer.commit([make_result("c")])
    assert reader.counts()["images"] == 3
    with pytest.raises(EdgekitError, match="read-only"):
        reader.commit([make_result("d")])
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # SQLite itself refuses, not only our check
        reader._conn.execute("DELETE FROM results")
    reader.close()
    writer.close()
    assert ResultStore(path, read_only=True).counts()["rows"] == 3  # after a clean close too
    with pytest.raises(EdgekitError, match="no station database"):
        ResultStore(tmp_path / "missing.db", read_only=True)
    (tmp_path / "junk.db").write_bytes(b"not sqlite " * 100)
    with pytest.raises(EdgekitError, match="not a database"):
        ResultStore(tmp_path / "junk.db")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(EdgekitError, match="not a station database"):
        ResultStore(tmp_path / "other.db", read_only=True)


WRITER = r"""
import sys
from edgekit.station.store import ResultStore
store = ResultStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    batch = [{"key": f"k{i}-{j}", "decision": "OK", "received": "2026-12-06T18:00:00Z", "pad": "x" * 500}
             for j in range(4)]
    ids = store.commit(batch)
    print(" ".join(map(str, ids)), flush=True)
"""


def test_kill9_of_a_committing_writer_leaves_every_reported_row(tmp_path):
    path = tmp_path / "station.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "5000"], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    reported = []
    deadline = time.monotonic() + 20
    while len(reported) < 200 and time.monotonic() < deadline:  # 50 batches in, then kill it mid-loop
        line = proc.stdout.readline()
        if not line:
            break
        reported += [int(x) for x in line.split()]
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()  # what it printed before it died (a cut last line is not a report)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before the kill: raise its loop count"
    for line in rest.splitlines(keepends=True):
        if line.endswith(b"\n"):
            reported += [int(x) for x in line.split()]
    assert len(reported) >= 200
    reader = ResultStore(path, read_only=True)
    assert reader._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = {r[0] for r in reader._conn.execute("SELECT id FROM results")}
    reader.close()
    assert set(reported) <= rows  # every reported commit is there
    assert len(rows) - len(reported) in (0, 4)  # at most the one batch committed but not yet printed
    assert ResultStore(path).commit([make_result("after")])[0] == max(rows) + 1  # and it takes writes again
