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
    # durable commits: WAL, and the WAL fsynced at every commit (synchronous=FULL is 2)
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
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
    # events are bounded too: the newest keep_events published ones, twice that while unpublished
    store = ResultStore(tmp_path / "station.db", keep_rows=10, keep_days=None, keep_events=3)
    events = [store.event("swap", n=i) for i in range(8)]
    store.prune()
    assert [e["id"] for e in store.events(100)] == events[::-1][:6]  # unpublished: 2 x keep_events
    store.mark_events_published(events)
    store.prune()
    assert [e["n"] for e in store.events(100)] == [7, 6, 5]
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
    batch = [{"key": f"r{sys.argv[3]}-k{i}-{j}", "decision": "OK", "received": "2026-12-06T18:00:00Z",
              "pad": "x" * 500}
             for j in range(4)]
    ids = store.commit(batch)
    print(" ".join(map(str, ids)), flush=True)
"""


def test_kill9_of_a_committing_writer_leaves_every_reported_row(tmp_path):
    """A writer process commits batches in a loop and prints each batch's ids once commit() returned; kill -9 at
    a random moment (three times, on the same database: each restart goes on after the kill). Every id it
    reported is there, the database passes SQLite's integrity check, and at most the one batch committed but
    not yet printed is there beyond the reports."""
    import random

    path = tmp_path / "station.db"
    reported = []
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "5000", str(round_)], stdout=subprocess.PIPE,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 100 and time.monotonic() < deadline:  # 25 batches in, then a random moment later
            line = proc.stdout.readline()
            if not line:
                break
            got += [int(x) for x in line.split()]
        time.sleep(random.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # what it printed before it died (a cut last line is not a report)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the writer finished before the kill: raise its loop count"
        for line in rest.splitlines(keepends=True):
            if line.endswith(b"\n"):
                got += [int(x) for x in line.split()]
        assert len(got) >= 100
        reported += got
        reader = ResultStore(path, read_only=True)
        assert reader._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0] for r in reader._conn.execute("SELECT id FROM results")}
        reader.close()
        assert set(reported) <= rows  # every reported commit is there
        assert len(rows) - len(reported) in range(0, 4 * (round_ + 1) + 1, 4)  # unreported: whole batches only
    assert ResultStore(path).commit([make_result("after")])[0] == max(rows) + 1  # and it takes writes again


# -- a real mosquitto broker on 127.0.0.1


def mosquitto_binary():
    import shutil

    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if os.access(p, os.X_OK)), None)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto on 127.0.0.1:port with a temporary config; stop() and start() again on the same port. Its
    persistence (in the temp folder, saved at a clean stop) keeps a QoS 1 subscriber's session and the retained
    messages across a restart, as a plant's broker does."""

    def __init__(self, binary: str, folder: Path):
        import getpass

        self.binary, self.folder, self.port = binary, folder, free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                               f"persistence_location {folder}/\nuser {getpass.getuser()}\n")
        self.proc = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Broker":
        import socket

        self.log = open(self.folder / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {(self.folder / 'mosquitto.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not listen within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a clean shutdown that saves its persistence file
            self.proc.wait(10)
        self.proc = None
        self.log.close()


@pytest.fixture()
def broker(tmp_path):
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run installs it as root)")
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed (pip install 'edgekit[station]')")
    folder = tmp_path / "broker"
    folder.mkdir()
    b = Broker(binary, folder).start()
    yield b
    b.stop()


class Subscriber:
    """A QoS 1 subscriber with a persistent session (clean_session=False): it reconnects by itself, and the broker
    keeps what was published for it while it was away."""

    def __init__(self, broker: Broker, topic: str):
        import threading

        import paho.mqtt.client as mqtt

        self.messages = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{broker.port}",
                                  clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_results_committed_while_the_broker_is_down_arrive_once_each_after_it_comes_up(tmp_path, broker):
    from collections import Counter

    from edgekit.station.mqtt import MqttPublisher

    sub = Subscriber(broker, "plant/results")
    broker.stop()  # the subscription is kept in the broker's saved session
    store = ResultStore(tmp_path / "station.db")
    publisher = MqttPublisher(store.path, "127.0.0.1", broker.port, topic="plant", station_id="st-a",
                              max_backoff_s=1, log=None).start()
    try:
        committed = []
        for b in range(3):
            committed += store.commit([make_result(f"down-{b}-{i}", "NG" if i == 0 else "OK") for i in range(10)])
            store.event("canary", verdict="promote", version="1.1.0") if b == 1 else None
            publisher.wake()
        time.sleep(1.5)  # the publisher retries meanwhile
        assert not publisher.connected and store.counts()["unpublished"] == 30 and publisher.published == 0
        broker.start()
        wait_for(lambda: store.counts()["unpublished"] == 0, 15, "the outbox to drain")
        committed += store.commit([make_result(f"up-{i}") for i in range(5)])  # and new ones go straight out
        publisher.wake()
        wait_for(lambda: len(sub.messages) >= 35 and store.counts()["unpublished"] == 0, 10, "35 results")
        time.sleep(0.3)  # a duplicate, if any, would come now
    finally:
        publisher.stop()
        sub.close()
    seen = Counter((m["station"], m["id"]) for m in sub.messages)
    assert sorted(i for _, i in seen) == sorted(committed) and set(seen.values()) == {1}  # each once
    assert [m["id"] for m in sub.messages] == sorted(committed)  # in commit order
    by_id = {m["id"]: m for m in sub.messages}
    assert by_id[committed[0]]["decision"] == "NG" and by_id[committed[0]]["key"] == "down-0-0"
    assert publisher.published == 35 and store.unpublished_events(10) == []  # the event went out too
    store.close()


def test_a_broker_restart_in_the_middle_of_a_stream_loses_no_result(tmp_path, broker):
    """The broker goes away while results stream and messages are in flight: every committed result still arrives
    (QoS 1 is at-least-once: a repeat is allowed, a loss is not), and the outbox ends empty."""
    import threading

    from edgekit.station.mqtt import MqttPublisher

    sub = Subscriber(broker, "plant/results")
    store = ResultStore(tmp_path / "station.db")
    publisher = MqttPublisher(store.path, "127.0.0.1", broker.port, topic="plant", station_id="st-a",
                              max_backoff_s=1, log=None).start()
    committed, done = [], threading.Event()

    def stream():  # the station's worker: its own store connection, batches of 5
        writer = ResultStore(store.path)
        for b in range(80):
            committed.extend(writer.commit([make_result(f"s{b}-{i}") for i in range(5)]))
            publisher.wake()
            time.sleep(0.01)
        writer.close()
        done.set()

    try:
        wait_for(lambda: publisher.connected, 5, "the publisher to connect")
        worker = threading.Thread(target=stream)
        worker.start()
        wait_for(lambda: len(sub.messages) >= 60, 10, "the stream to flow")
        broker.stop()  # (measured here: 4-6 results were unacknowledged at this moment, and 1-4 came twice)
        time.sleep(0.5)
        broker.start()
        worker.join(30)
        assert done.is_set()
        wait_for(lambda: store.counts()["unpublished"] == 0, 15, "the outbox to drain")
        wait_for(lambda: {m["id"] for m in sub.messages} >= set(committed), 10, "every result at the subscriber")
    finally:
        publisher.stop()
        sub.close()
    received = [m["id"] for m in sub.messages]
    assert len(committed) == 400 and set(received) == set(committed)  # none lost
    assert publisher.published == 400  # each marked published once, on its PUBACK
    store.close()


PUBLISHER_PROCESS = r"""
import sys, time
from edgekit.station.mqtt import MqttPublisher
p = MqttPublisher(sys.argv[1], "127.0.0.1", int(sys.argv[2]), topic="plant", station_id="st-b", log=None,
                  status=lambda: {"serving": "0.9.0", "trial": None})
p.start()
while not p.connected:
    time.sleep(0.02)
time.sleep(0.3)
print("up", flush=True)
time.sleep(60)
"""


def test_retained_status_and_last_will_through_edgekit_fleet_status(tmp_path, broker, cli):
    from edgekit.station.mqtt import MqttPublisher, read_fleet_status

    store = ResultStore(tmp_path / "station.db")
    store.commit([make_result("a"), make_result("b", "NG")])
    canary = {"version": "1.1.0", "serving": "1.0.0", "images": 3, "needed": 200, "agreement": 1.0, "verdict": None}

    def status():  # the shape edgekit.station's Station.status() reports
        return {"station": "st-a", "serving": "1.0.0", "trial": "1.1.0", "backbone": "efficientnet-lite0",
                "drift": "available", "canary": dict(canary), "counts": store.counts(), "drift_rate": 0.05,
                "queue": 0, "last_errors": []}

    # st-b: another station in its own process, killed without a goodbye: the broker publishes its last will
    other = subprocess.Popen([sys.executable, "-c", PUBLISHER_PROCESS, str(tmp_path / "b.db"), str(broker.port)],
                             stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    publisher = MqttPublisher(store.path, "127.0.0.1", broker.port, topic="plant", station_id="st-a",
                              status=status, status_every_s=60, log=None).start()
    try:
        assert other.stdout.readline() == b"up\n"
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
        wait_for(lambda: publisher.connected, 5, "the publisher to connect")
        canary["images"] = 4
        publisher.wake(status=True)  # a change: published now, not at the next period (60 s here)
        wait_for(lambda: any(s["station"] == "st-a" and s["canary"]["images"] == 4
                             for s in read_fleet_status("127.0.0.1", broker.port, "plant", 1.0)), 3,
                 "the changed status")
        r = cli("fleet", "status", "--mqtt", broker.addr, "--topic", "plant", "--json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        stations = {s["station"]: s for s in doc["stations"]}
        assert sorted(stations) == ["st-a", "st-b"] and doc["broker"] == broker.addr
        a, b = stations["st-a"], stations["st-b"]
        assert a["state"] == "online" and a["serving"] == "1.0.0" and a["trial"] == "1.1.0"
        assert a["counts"]["images"] == 2 and a["counts"]["ng"] == 1 and a["drift_rate"] == 0.05
        assert a["canary"]["images"] == 4
        assert b["state"] == "offline" and b["reason"] == "connection lost"  # the last will
        table = cli("fleet", "status", "--mqtt", broker.addr, "--topic", "plant")
        assert table.exit_code == 0, table.stderr
        row = next(line for line in table.stdout.splitlines() if "st-a" in line)
        for cell in ("online", "1.0.0", "1.1.0", "4/200 agree 1.00", "50.0%", "5.0%"):  # NG 1 of 2, drift 0.05
            assert cell in row, (cell, row)
        assert "offline (connection lost)" in table.stdout
    finally:
        publisher.stop()
        if other.poll() is None:
            other.kill()
    r = cli("fleet", "status", "--mqtt", broker.addr, "--topic", "plant", "--json")
    a = {s["station"]: s for s in json.loads(r.stdout)["stations"]}["st-a"]
    assert (a["state"], a["reason"], a["serving"]) == ("offline", "stopped", "1.0.0")  # a clean stop
    store.close()


def test_fleet_status_refusals_are_one_error_line(cli):
    from conftest import one_error_line

    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed (pip install 'edgekit[station]')")

    assert "HOST:PORT" in one_error_line(cli("fleet", "status", "--mqtt", "localhost"))
    assert "HOST:PORT" in one_error_line(cli("fleet", "status", "--mqtt", "127.0.0.1:70000"))
    assert "cannot reach" in one_error_line(cli("fleet", "status", "--mqtt", f"127.0.0.1:{free_port()}"))
    assert "wildcards" in one_error_line(cli("fleet", "status", "--mqtt", "127.0.0.1:1883", "--topic", "a/+"))


# -- Prometheus


def test_metrics_endpoint_serves_the_histogram_and_counters_over_http(tmp_path):
    import urllib.request

    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed (pip install "
                                                    "'edgekit[station]')")
    from edgekit.station.metrics import StationMetrics

    metrics = StationMetrics("127.0.0.1:0")
    try:
        for i, (decision, latency, flagged) in enumerate([("OK", 0.02, False), ("NG", 0.2, True), ("OK", 0.03, False),
                                                          ("ERROR", 0.001, None)]):
            metrics.observe(make_result(f"k{i}", decision, latency_s=latency,
                                        ood=None if flagged is None else {"score": 1, "threshold": 2,
                                                                          "flagged": flagged}))
        metrics.set_queue(7)
        metrics.set_models("1.0.0", "1.1.0")
        metrics.set_models("1.1.0")  # promoted: the trial line goes, serving changes
        metrics.set_canary({"seen": 12, "images": 200, "agreement": 0.75})
        with urllib.request.urlopen(metrics.url, timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        metrics.close()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines["edgekit_station_latency_seconds_count"] == 4
    assert lines['edgekit_station_latency_seconds_bucket{le="0.025"}'] == 2  # 0.001 and 0.02
    assert lines['edgekit_station_latency_seconds_bucket{le="+Inf"}'] == 4
    assert abs(lines["edgekit_station_latency_seconds_sum"] - 0.251) < 1e-9
    assert lines['edgekit_station_images_total{decision="OK"}'] == 2
    assert lines['edgekit_station_images_total{decision="NG"}'] == 1
    assert lines['edgekit_station_images_total{decision="ERROR"}'] == 1
    assert lines["edgekit_station_errors_total"] == 1
    assert lines["edgekit_station_ng_ratio"] == 0.25
    assert abs(lines["edgekit_station_drift_flagged_ratio"] - 1 / 3) < 1e-9  # of the 3 images with a score
    assert lines["edgekit_station_queue_depth"] == 7
    assert lines['edgekit_station_model_info{role="serving",version="1.1.0"}'] == 1
    assert not any(k.startswith("edgekit_station_model_info") and "1.0.0" in k for k in lines)
    assert (lines["edgekit_station_canary_images"], lines["edgekit_station_canary_agreement"]) == (12, 0.75)
    assert not any(k.startswith("python_") or k.startswith("process_") for k in lines)  # its own registry
    # closed: the port no longer answers
    with pytest.raises(OSError):
        urllib.request.urlopen(metrics.url, timeout=2)


def test_metrics_address_refusals(tmp_path):
    pytest.importorskip("prometheus_client")
    from edgekit.station.metrics import StationMetrics

    with pytest.raises(EdgekitError, match="HOST:PORT"):
        StationMetrics("9100")
    first = StationMetrics("127.0.0.1:0")
    try:
        with pytest.raises(EdgekitError, match="cannot listen"):
            StationMetrics(f"127.0.0.1:{first.port}")
    finally:
        first.close()
