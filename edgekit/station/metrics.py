"""The station's Prometheus endpoint (``--metrics 127.0.0.1:PORT``, served at ``/metrics``).

Metrics (own registry: nothing of the process's default collectors)::

    edgekit_station_latency_seconds          histogram  received -> committed, per image
    edgekit_station_images_total{decision}   counter    OK | NG | ERROR
    edgekit_station_errors_total             counter    images that ended in ERROR, and other station errors
    edgekit_station_ng_ratio                 gauge      NG / images over the last 1000 images
    edgekit_station_drift_flagged_ratio      gauge      flagged / scored over the last 1000 images that had a
                                                        drift score (NaN while none had: drift unavailable)
    edgekit_station_queue_depth              gauge      jobs waiting for the worker
    edgekit_station_model_info{role,version} gauge (1)  role: serving | trial (a trial only while on canary)
    edgekit_station_canary_images            gauge      live images the trial has run on so far (0: no canary)
    edgekit_station_canary_agreement         gauge      the trial's agreement with the serving adapter so far
"""
from __future__ import annotations

import collections
import math
import threading
from typing import Optional

from edgekit.errors import EdgekitError
from edgekit.station.mqtt import parse_host_port

WINDOW = 1000  # images behind the ratios
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECISIONS = ("OK", "NG", "ERROR")


def _quiet_client_errors(request, client_address) -> None:
    """socketserver's ``handle_error`` prints a whole traceback; a client reset or broken pipe says nothing, and
    anything else is one line."""
    import sys

    from edgekit.progress import write_stderr

    e = sys.exc_info()[1]
    if not isinstance(e, OSError):
        write_stderr(f"metrics: a request from {client_address[0]} failed: {e.__class__.__name__}: {e}")


class StationMetrics:
    """Serves the metrics at ``addr`` (HOST:PORT; port 0 picks a free one: ``.port`` says which) until
    ``close()``. ``observe(result)`` after each commit; thread-safe."""

    def __init__(self, addr: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        host, port = parse_host_port(addr, "--metrics", port_zero=True)
        self.registry = registry = CollectorRegistry(auto_describe=True)
        p = "edgekit_station_"
        self.latency = Histogram(p + "latency_seconds", "Seconds from an image received to its result committed.",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.images = Counter(p + "images", "Images with a committed result, by decision.", ["decision"],
                              registry=registry)
        for decision in DECISIONS:  # present from the start, at 0
            self.images.labels(decision)
        self.errors = Counter(p + "errors", "Images that ended in ERROR, and other station errors.", registry=registry)
        self.ng_ratio = Gauge(p + "ng_ratio", f"NG share of the last {WINDOW} images.", registry=registry)
        self.drift_ratio = Gauge(p + "drift_flagged_ratio",
                                 f"Drift-flagged share of the last {WINDOW} images with a drift score "
                                 "(NaN: no drift score available).", registry=registry)
        self.drift_ratio.set(math.nan)
        self.queue = Gauge(p + "queue_depth", "Jobs waiting for the worker.", registry=registry)
        self.model_info = Gauge(p + "model_info", "The adapter versions the station runs (value 1).",
                                ["role", "version"], registry=registry)
        self.canary_images = Gauge(p + "canary_images", "Live images the trial on canary has run on.",
                                   registry=registry)
        self.canary_agreement = Gauge(p + "canary_agreement", "The trial's top-1 agreement with the serving "
                                      "adapter so far (NaN: no canary).", registry=registry)
        self.canary_agreement.set(math.nan)
        self._lock = threading.Lock()
        self._ng: collections.deque = collections.deque(maxlen=WINDOW)
        self._flagged: collections.deque = collections.deque(maxlen=WINDOW)
        self._models: dict = {}
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise EdgekitError(f"--metrics {addr}: cannot listen there ({e.strerror or e})") from None
        self._server.handle_error = _quiet_client_errors  # a scraper that hangs up is no traceback on our stderr
        self.host, self.port = host, self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def observe(self, result: dict) -> None:
        decision = result.get("decision") if result.get("decision") in DECISIONS else "ERROR"
        self.images.labels(decision).inc()
        if decision == "ERROR":
            self.errors.inc()
        latency = result.get("latency_s")
        if isinstance(latency, (int, float)) and latency >= 0:
            self.latency.observe(latency)
        ood = result.get("ood")
        with self._lock:
            self._ng.append(decision == "NG")
            self.ng_ratio.set(sum(self._ng) / len(self._ng))
            if isinstance(ood, dict) and ood.get("flagged") is not None:
                self._flagged.append(bool(ood["flagged"]))
                self.drift_ratio.set(sum(self._flagged) / len(self._flagged))

    def error(self) -> None:
        """Count a station error that is not an image's (a failed swap, a dead publisher)."""
        self.errors.inc()

    def set_queue(self, depth: int) -> None:
        self.queue.set(depth)

    def set_models(self, serving: Optional[str], trial: Optional[str] = None) -> None:
        with self._lock:
            wanted = {role: version for role, version in (("serving", serving), ("trial", trial)) if version}
            for role, version in self._models.items():
                if wanted.get(role) != version:
                    self.model_info.remove(role, version)
            for role, version in wanted.items():
                self.model_info.labels(role, version).set(1)
            self._models = wanted

    def set_canary(self, state) -> None:
        """``state``: None (no canary), the number of images so far, or a dict with "seen" (images so far; "images"
        when there is no "seen") and optionally "agreement"."""
        if state is None:
            images, agreement = 0, math.nan
        elif isinstance(state, dict):
            images = state.get("seen", state.get("images", 0)) or 0
            agreement = state.get("agreement")
            agreement = math.nan if agreement is None else agreement
        else:
            images, agreement = state, math.nan
        self.canary_images.set(images)
        self.canary_agreement.set(agreement)

    def close(self) -> None:
        server, self._server = getattr(self, "_server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
