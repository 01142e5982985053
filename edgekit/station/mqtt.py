"""The station on MQTT: results and events from the SQLite outbox, and a retained status for the fleet view.

Topics (``T`` is ``--topic``, the prefix a fleet shares, default ``edgekit``; ``S`` the station id, default the
host name). Everything is JSON (UTF-8), published with QoS 1:

``T/results`` (not retained): one message per result, the Result exactly as committed to SQLite::

    {"id": 1234, "station": "line3-cam1", "key": "watch:part-0001.png:48213:1765044000123456789",
     "source": "watch", "name": "part-0001.png", "received": "2026-12-06T18:00:00Z",
     "decided": "2026-12-06T18:00:00Z", "latency_s": 0.041, "decision": "NG", "reasons": ["class scratches"],
     "class": "scratches", "prob": 0.97, "task": "neu", "serving": {"version": "1.2.0", "backbone": "..."},
     "trial": null, "segment": null, "ood": {"score": 3.1, "threshold": 5.2, "flagged": false}, "error": null}

``T/events`` (not retained): what happened on the station (a model swap, a canary verdict, an error, results
dropped from a full outbox), from its own outbox: ``{"station", "id", "time", "kind", ...the event's fields}``.

``T/status/S`` (RETAINED): the station's state, republished every ``status_every_s`` seconds and as soon as it
changes, so a client that subscribes to ``T/status/+`` at any time gets every station's latest one at once
(``edgekit fleet status``)::

    {"station": "line3-cam1", "state": "online", "time": "2026-12-06T18:00:05Z", "started": "...",
     ...and what the station reports (``Station.status()``), e.g. "serving": "1.2.0", "trial": "1.3.0" | null,
     "backbone": "...", "canary": {"version", "serving", "images", "needed", "agreement", "verdict"} | null,
     "last_verdict": {...} | null, "counts": {"images", "ok", "ng", "error", "flagged", ...},
     "drift": "available" | "unavailable", "drift_rate": 0.004 | null, "queue": 0, "last_errors": [...]}

When the station stops cleanly it publishes ``"state": "offline", "reason": "stopped"``; when it vanishes
(a crash, a cut cable) the broker publishes its last will at the same topic, also retained:
``{"station": S, "state": "offline", "reason": "connection lost", "since": <when it started>}``. A station taken
out of service keeps its retained message until it is cleared (an empty retained message at its topic, e.g.
``mosquitto_pub -h HOST -p PORT -r -n -t T/status/S``); ``edgekit fleet status`` skips cleared ones.

Delivery: a result is published only after it is committed, and marked published in SQLite only when the
broker's PUBACK for it arrives. While the broker is away the station keeps working: results wait in the outbox
(SQLite, bounded: see ``edgekit.station.store``), the client reconnects with a backoff (1 s doubling up to
``max_backoff_s``), and the outbox drains in id order when the broker is back; nothing is lost on a restart
either. QoS 1 is *at-least-once*: a result whose PUBACK was lost (a connection cut between the broker's receipt
and its acknowledgement) is sent again, so a consumer that must count each result once keeps the pair
("station", "id") it has seen (ids only grow, never reused) and drops a repeat. Events are the same with their
own ids.
"""
from __future__ import annotations

import collections
import json
import socket
import sqlite3
import threading
import time
from typing import Callable, Optional

from edgekit.device.state import utc_now
from edgekit.errors import EdgekitError, first_line
from edgekit.progress import write_stderr
from edgekit.utils import parse_host_port as _parse_host_port

DEFAULT_TOPIC = "edgekit"
DEFAULT_PORT = 1883


def parse_host_port(text: str, option: str = "--mqtt", default_port: Optional[int] = None,
                    port_zero: bool = False) -> tuple:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) -> (host, port) through the shared parser
    (``edgekit.utils.parse_host_port``); ``default_port``: the port when ``text`` names a host alone;
    ``port_zero``: a listening address a library caller lets the system choose (no command passes it)."""
    value = (text or "").strip()
    if default_port is not None and ":" not in value.replace("[", "").replace("]", "") and value:
        value = f"{value}:{default_port}"
    return _parse_host_port(value, option, example=f"127.0.0.1:{DEFAULT_PORT}", allow_port_zero=port_zero)


def _json(obj) -> str:
    # a status field that is not JSON (a path, a numpy number) is sent as its text rather than stopping the publisher
    return json.dumps(obj, separators=(",", ":"), default=str)


def status_topic(topic: str, station_id: str) -> str:
    return f"{topic}/status/{station_id}"


def _check_topic(topic: str, what: str) -> str:
    # control characters too: a newline passed, split our one-line notes and made topics no one subscribes to
    if (not topic or any(c in topic for c in "+#") or any(not c.isprintable() for c in topic)
            or topic.startswith("/") or topic.endswith("/")):
        raise EdgekitError(f"{what} must be a plain MQTT topic prefix without wildcards, e.g. edgekit/plant1 "
                           f"(got {topic!r})")
    return topic


def _client_id(prefix: str) -> str:
    import os

    return f"{prefix}-{socket.gethostname()[:40]}-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"


class MqttPublisher:
    """Drains a ``ResultStore``'s outbox to ``<topic>/results`` and ``<topic>/events`` and keeps the retained
    ``<topic>/status/<station_id>`` current (module docstring). ``start()`` once; ``wake()`` after a commit
    (``wake(status=True)`` after a change worth publishing now, e.g. a canary verdict); ``stop()`` at the end.

    Two threads: paho's network loop (connects, reconnects with a backoff, resends what was in flight) and this
    publisher's, which alone touches its own SQLite connection (opened in that thread). ``status`` is called in
    the publisher's thread (about once a second while connected): it must be safe to call from there (a
    ``ResultStore``'s methods are: each instance holds a lock). Stop it after the worker's last commit; what is
    still unacknowledged then goes out at the next start."""

    def __init__(self, store_path, host: str, port: int, topic: str = DEFAULT_TOPIC, station_id: Optional[str] = None,
                 status: Optional[Callable[[], dict]] = None, status_every_s: float = 5.0, max_inflight: int = 100,
                 max_backoff_s: float = 30.0, keepalive_s: int = 30,
                 log: Optional[Callable[[str], None]] = write_stderr):
        self.store_path = store_path
        self.host, self.port = host, int(port)
        self.topic = _check_topic(topic, "--topic")
        self.station_id = station_id or socket.gethostname()
        _check_topic(self.station_id, "the station id")
        if "/" in self.station_id:
            raise EdgekitError(f"the station id must not contain '/' (got {self.station_id!r})")
        self.status_fn = status
        self.status_every_s = status_every_s
        self.max_inflight = max_inflight
        self.max_backoff_s = max_backoff_s
        self.keepalive_s = keepalive_s
        self.log = log or (lambda message: None)
        self.results_topic = f"{self.topic}/results"
        self.events_topic = f"{self.topic}/events"
        self.status_topic = status_topic(self.topic, self.station_id)
        self.published = 0  # results acknowledged by the broker (this run)
        self.last_error: Optional[str] = None
        self._wake = threading.Event()
        self._status_due = threading.Event()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._acked: collections.deque = collections.deque()  # mids acknowledged (appended by paho's thread)
        self._thread: Optional[threading.Thread] = None
        self._client = None
        self._started = utc_now()
        self._connected_since: Optional[str] = None
        self._error: Optional[BaseException] = None
        self._last_note: Optional[str] = None

    # -- the public surface

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def alive(self) -> bool:
        """False once the publisher's thread has ended (stopped, or stopped by an error: see ``last_error``)."""
        return self._thread is not None and self._thread.is_alive()

    def _note(self, message: str) -> None:
        # connection trouble is said once per change, not at every retry
        if message != self._last_note:
            self._last_note = message
            self.log(f"mqtt: {message}")

    def start(self) -> "MqttPublisher":
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=_client_id(f"edgekit-{self.station_id}"),
                             clean_session=True)
        client.max_inflight_messages_set(self.max_inflight)
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(self.max_backoff_s)))
        client.will_set(self.status_topic, json.dumps({"station": self.station_id, "state": "offline",
                                                       "reason": "connection lost", "since": self._started}),
                        qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        self._client = client
        client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        client.loop_start()  # connects, and reconnects with the backoff, in paho's thread
        self._thread = threading.Thread(target=self._run, name=f"mqtt-publisher-{self.station_id}", daemon=True)
        self._thread.start()
        return self

    def wake(self, status: bool = False) -> None:
        """Something was committed (``status``: the station's state changed): publish it now."""
        if status:
            self._status_due.set()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the retained "offline" status (when connected), disconnect cleanly (no last will), and end both
        threads. What was not acknowledged stays in the outbox for the next start."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- paho's thread: only flags and a deque (paho holds its own locks while it calls these)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_error = f"{self.host}:{self.port} refused the connection ({reason_code})"
            self._note(f"{self.last_error}; results wait in the outbox, retrying")
            return
        self._connected_since = utc_now()
        self.last_error = None
        self._connected.set()
        self._status_due.set()
        self._wake.set()
        self._note(f"connected to {self.host}:{self.port} (topic {self.topic})")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping.is_set():
            self.last_error = f"lost {self.host}:{self.port} ({reason_code})"
            self._note(f"{self.last_error}; results wait in the outbox, reconnecting")

    def _on_connect_fail(self, client, userdata):
        self.last_error = f"cannot reach {self.host}:{self.port}"
        self._note(f"{self.last_error}; results wait in the outbox, retrying")

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._acked.append(mid)
        self._wake.set()

    # -- this publisher's thread

    def _run(self) -> None:
        from edgekit.station.store import ResultStore

        store = None
        inflight: dict = {}  # mid -> ("result" | "event", id); paho resends these itself after a reconnect
        sent = {"result": 0, "event": 0}  # the highest id handed to paho, per outbox
        last_status, last_status_at = None, 0.0
        try:
            store = ResultStore(self.store_path, keep_rows=None, keep_days=None)  # its own connection; never prunes
            while True:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                try:
                    self._settle(store, inflight)
                    if self._stopping.is_set():
                        break
                    if not self._connected.is_set():
                        continue
                    self._fill(store, inflight, sent)
                except sqlite3.OperationalError as e:  # busy past the timeout, a full disk: the next round retries
                    self._note(f"the outbox is not readable now ({first_line(e)}); retrying")
                    self._stopping.wait(1.0)
                    continue
                now = time.monotonic()
                if self._status_due.is_set() or now - last_status_at >= 1.0:
                    payload = self._status_payload("online")
                    body = {k: v for k, v in payload.items() if k != "time"}
                    if body != last_status or now - last_status_at >= self.status_every_s:
                        self._status_due.clear()
                        self._client.publish(self.status_topic, _json(payload), qos=1, retain=True)
                        last_status, last_status_at = body, now
        except Exception as e:  # a bug or a broken database: said once, and the station goes on without MQTT
            self._error = e
            self.last_error = f"the publisher stopped: {type(e).__name__}: {first_line(e)}"
            self.log(f"mqtt: {self.last_error}")
        finally:
            self._finish(store, inflight)

    def _settle(self, store, inflight: dict) -> None:
        """Mark what the broker acknowledged as published (one transaction per kind)."""
        done = {"result": [], "event": []}
        while self._acked:
            entry = inflight.pop(self._acked.popleft(), None)
            if entry is not None:  # (a status message's ack: nothing to mark)
                done[entry[0]].append(entry[1])
        if done["result"]:
            store.mark_published(done["result"])
            self.published += len(done["result"])
        if done["event"]:
            store.mark_events_published(done["event"])

    def _fill(self, store, inflight: dict, sent: dict) -> None:
        """Hand the outboxes' next rows to paho, in id order, up to max_inflight unacknowledged."""
        for kind, read, topic in (("event", store.unpublished_events, self.events_topic),
                                  ("result", store.unpublished, self.results_topic)):
            while self._connected.is_set() and len(inflight) < self.max_inflight:
                rows = read(limit=self.max_inflight - len(inflight), after=sent[kind])
                if not rows:
                    break
                for rowid, body in rows:
                    body.setdefault("station", self.station_id)
                    info = self._client.publish(topic, _json(body), qos=1)
                    inflight[info.mid] = (kind, rowid)  # queued by paho even if the connection just dropped
                    sent[kind] = rowid

    def _status_payload(self, state: str, **extra) -> dict:
        reported = {}
        if self.status_fn is not None:
            try:
                reported = dict(self.status_fn() or {})
            except Exception as e:  # the status is best effort; the results are what must not stop
                reported = {"status_error": f"{type(e).__name__}: {first_line(e)}"}
        reported.setdefault("started", self._started)  # (the station's own start time when it reports one)
        return {**reported, "station": self.station_id, "state": state, "time": utc_now(), **extra}

    def _finish(self, store, inflight: dict) -> None:
        client = self._client
        try:
            if client is not None and self._connected.is_set():
                info = client.publish(self.status_topic, _json(self._status_payload("offline", reason="stopped")),
                                      qos=1, retain=True)
                deadline = time.monotonic() + 2.0
                while not info.is_published() and self._connected.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if store is not None:
                    self._settle(store, inflight)  # acks that came in meanwhile
        finally:
            if client is not None:
                client.disconnect()  # clean: the broker discards the last will
                client.loop_stop()
            self._connected.clear()
            if store is not None:
                store.close()


def read_fleet_status(host: str, port: int, topic: str = DEFAULT_TOPIC, wait_s: float = 2.0) -> list:
    """Every station's retained status under ``<topic>/status/+`` (sorted by station). Collects for at most
    ``wait_s`` seconds: it returns sooner once the broker's burst of retained messages is over (0.5 s quiet after
    the subscription was acknowledged). One EdgekitError line when the broker cannot be reached."""
    import paho.mqtt.client as mqtt

    _check_topic(topic, "--topic")
    found: dict = {}
    state = {"subscribed": None, "last": None, "refused": None, "connected": False}
    lock = threading.Lock()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            state["refused"] = str(reason_code)
            return
        state["connected"] = True
        client.subscribe(f"{topic}/status/+", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        with lock:
            state["subscribed"] = state["last"] = time.monotonic()

    def on_message(client, userdata, message):
        station = message.topic.rsplit("/", 1)[-1]
        if not message.payload:  # a cleared retained message: that station was removed
            return
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            body = {"station": station, "state": "unreadable", "payload": message.payload[:200].decode("utf-8",
                                                                                                      "replace")}
        body.setdefault("station", station)
        with lock:
            found[station] = body
            state["last"] = time.monotonic()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=_client_id("edgekit-fleet-status"),
                         clean_session=True)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(host, int(port), keepalive=30)
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot reach the MQTT broker at {host}:{port}: {first_line(e)}") from None
    client.loop_start()
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if state["refused"]:
                raise EdgekitError(f"the MQTT broker at {host}:{port} refused the connection: {state['refused']}")
            with lock:
                quiet = state["subscribed"] is not None and time.monotonic() - state["last"] >= 0.5
            if quiet:
                break
            time.sleep(0.02)
        if not state["connected"]:
            raise EdgekitError(f"the MQTT broker at {host}:{port} did not answer within {wait_s:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return [found[k] for k in sorted(found)]
