"""The station service: a bounded queue, a prepare thread, ONE worker thread, batches, commit first, then the sinks.

Inputs call ``Station.submit(job)`` (False when the queue is full: HTTP answers 503, the watcher retries later).
Two threads form a pipeline, so decoding and preprocessing the next batch overlap the inference of this one:

- the prepare thread takes up to ``batch`` jobs at a time in arrival order, decodes the images (one that cannot be
  decoded is noted, to become a result with decision "ERROR", counted, never a crash) and computes the backbone's
  input tensor (``models.prepare``), then hands the batch to the worker through a one-slot queue (so at most one
  batch waits prepared; the rest wait in the input queue, where ``submit`` can still refuse);
- the worker, for each batch, in the order they were prepared:

1. between batches: ``models.refresh()`` (a committed version or a canary trial that changed is loaded beside the
   running one and swapped in here, so every image runs entirely on one set of adapters; a swap never changes the
   backbone, so a batch prepared before it is still the right input after it), a pending canary verdict is applied
   (``edgekit.station.canary.decide``: commit or fail through the install root's state machine);
2. runs the models once for the batch on the prepared tensor, decides OK/NG (``edgekit.station.decision``), builds
   the result dicts (the decode failures' "ERROR" results too, with the versions of this moment);
3. ``store.commit(results)``: one SQLite transaction; a result exists only once it is committed;
4. then the sinks, in order: the HTTP reply, ``metrics.observe``, ``review.offer`` (flagged images), the MQTT
   publisher's ``wake`` (it drains the store's outbox on its own thread and connection), and the canary count.

``stop()`` finishes every queued and prepared batch (each committed) before it returns.

So a kill -9 at any moment loses nothing committed, and anything not committed is redone by the next start (the
watch input skips keys the store has, ``ResultStore.seen``). The store is opened by the worker thread (SQLite: one
connection per thread); ``seen`` gives each calling thread its own connection.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.station.jobs import Job

RECENT_ERRORS = 10
_IDLE = object()  # the worker's "nothing prepared within 0.1 s"


def iso(t: float) -> str:
    """UTC ISO-8601 with milliseconds (results carry sub-second times; state.json keeps whole seconds)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def decode_image(job: Job) -> np.ndarray:
    """The job's image as H x W uint8 grayscale: a file read by ``read_gray``, an upload decoded by ``decode_gray``
    (the same conversion); EdgekitError with a one-line reason when it cannot be read."""
    from edgekit.data.images import decode_gray, read_gray

    if job.data is None:
        return read_gray(job.path)
    return decode_gray(job.data, f"upload {job.name!r}")


@dataclass
class PreparedBatch:
    """A batch the prepare thread handed to the worker: ``jobs`` in arrival order; ``images`` the decoded ones
    (of ``ok_jobs``); ``decode_errors`` {id(job): reason} for the others; ``tensor`` the backbone's input for
    ``images`` (``StationModels.prepare``), or ``prepare_error`` what stopped it."""
    jobs: List[Job]
    images: list = field(default_factory=list)
    ok_jobs: List[Job] = field(default_factory=list)
    decode_errors: dict = field(default_factory=dict)
    tensor: Optional[np.ndarray] = None
    prepare_error: Optional[BaseException] = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if not isinstance(e, EdgekitError) else text


class Station:
    """The service. ``models``: a ``StationModels``; ``db_path``: the SQLite file (``ResultStore``, opened by the
    worker thread); ``config``: a ``StationConfig`` (None: the defaults); sinks optional: ``metrics``
    (``StationMetrics``), ``publisher`` (``MqttPublisher``), ``review`` (``ReviewFolder``)."""

    def __init__(self, models, db_path: str | os.PathLike, *, config=None, station_id: Optional[str] = None,
                 batch: int = 8, queue_size: int = 64, metrics=None, publisher=None, review=None,
                 store_options: Optional[dict] = None, note: Optional[Callable[[str], None]] = None,
                 prefetch: bool = True):
        from edgekit.station.decision import StationConfig

        if batch < 1 or queue_size < 1:
            raise EdgekitError("--batch and the queue size must be at least 1")
        self.models, self.db_path = models, Path(db_path)
        self.config = config if config is not None else StationConfig.load(None)
        self.station_id = station_id or os.uname().nodename
        self.batch, self.metrics, self.publisher, self.review = batch, metrics, publisher, review
        self.store_options = dict(store_options or {})
        self.note = note or (lambda text: None)
        # False: no prepare thread, the worker decodes and preprocesses each batch itself, in series with the
        # inference (the service before the pipeline: benchmarks/station_bench.py measures both in one run)
        self.prefetch = prefetch
        self.queue: "queue.Queue[Job]" = queue.Queue(maxsize=queue_size)
        # prepare thread -> worker: one slot (a PreparedBatch, or None: the input is finished, stop)
        self._handover: "queue.Queue[Optional[PreparedBatch]]" = queue.Queue(maxsize=1)
        self._staged = 0  # images taken from self.queue by the prepare thread and not yet run (status()'s queue)
        self._preparer: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the counters read by status() from other threads
        self.started = time.time()
        self.counts = {"images": 0, "ok": 0, "ng": 0, "error": 0, "flagged": 0, "drift_scored": 0, "batches": 0}
        self.errors: List[dict] = []
        self.canary = None  # edgekit.station.canary.Canary of the trial now in shadow
        self.last_verdict: Optional[dict] = None
        self._pending_verdict: Optional[dict] = None
        self._canary_for: Optional[tuple] = None  # (trial, serving) versions the canary was set up for
        self.failure: Optional[BaseException] = None  # what stopped the worker, if anything did

    # --- the inputs' side ----------------------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full or the station is stopping (the input retries or answers
        503)."""
        if self._stop.is_set():
            return False
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def seen(self, keys) -> set:
        """The keys among ``keys`` already committed (for the watch input's dedupe); each calling thread gets its
        own SQLite connection."""
        store = getattr(self._local, "store", None)
        if store is None:
            from edgekit.station.store import ResultStore

            self._ready.wait(30)  # the worker creates the database and its tables first
            store = self._local.store = ResultStore(self.db_path, **self.store_options)
        return store.seen(keys)

    # --- running -------------------------------------------------------------------------------------------------

    def start(self) -> "Station":
        self._thread = threading.Thread(target=self._worker, name="station-worker", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self.failure is not None:
            raise EdgekitError(f"the station could not start: {_first_line(self.failure)}")
        if self.prefetch:
            self._preparer = threading.Thread(target=self._prepare_loop, name="station-prepare", daemon=True)
            self._preparer.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking jobs, finish the queued and prepared ones (each committed), close the store; the sinks are
        the caller's (they may still drain: the MQTT outbox)."""
        self._stop.set()
        end = time.monotonic() + timeout
        for t in (self._thread, self._preparer):  # the worker ends on the prepare thread's end marker
            if t is not None:
                t.join(max(0.0, end - time.monotonic()))
        for job in self._drain_unprocessed():  # only after a failure or a timeout: nothing else is left
            self._fail_reply(job)

    @staticmethod
    def _fail_reply(job: Job) -> None:
        if job.reply is not None and not job.reply.done():
            job.reply.set_exception(EdgekitError("the station stopped before this image was inspected"))

    def _drain_unprocessed(self):
        out = []
        while True:
            try:
                staged = self._handover.get_nowait()
            except queue.Empty:
                break
            if staged is not None:
                out.extend(staged.jobs)
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def queue_depth(self) -> int:
        """Images waiting: in the input queue, and taken by the prepare thread but not yet run by the worker."""
        with self._lock:
            staged = self._staged
        return self.queue.qsize() + staged

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _take_batch(self) -> List[Job]:
        try:
            jobs = [self.queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(jobs) < self.batch:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    # --- the prepare thread ----------------------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        """Batches in arrival order -> decoded and preprocessed -> the worker (one slot); after stop() and an empty
        queue, the end marker (None)."""
        jobs: List[Job] = []
        try:
            while True:
                jobs = self._take_batch()
                if jobs:
                    with self._lock:
                        self._staged += len(jobs)
                    if not self._hand_over(self._prepare(jobs)):
                        return
                    jobs = []
                elif self._stop.is_set():
                    self._hand_over(None)
                    return
        except BaseException as e:  # noqa: BLE001 - a bug here stops the service like one in the worker
            if self.failure is None:
                self.failure = e
            self._stop.set()
            for job in jobs:
                self._fail_reply(job)
            self._hand_over(None)

    def _prepare(self, jobs: List[Job]) -> PreparedBatch:
        batch = PreparedBatch(jobs)
        for job in jobs:
            try:
                batch.images.append(decode_image(job))
                batch.ok_jobs.append(job)
            except EdgekitError as e:
                batch.decode_errors[id(job)] = str(e)
        if batch.images:
            try:
                batch.tensor = self.models.prepare(batch.images)
            except Exception as e:  # noqa: BLE001 - an ERROR result per image (by the worker), not a crash
                batch.prepare_error = e
        return batch

    def _hand_over(self, batch: Optional[PreparedBatch]) -> bool:
        """Wait for the worker's slot; False (and the batch's replies failed) when the worker has ended."""
        while True:
            try:
                self._handover.put(batch, timeout=0.1)
                return True
            except queue.Full:
                if self._stopped.is_set():
                    for job in batch.jobs if batch is not None else []:
                        self._fail_reply(job)
                    return False

    # --- the worker ------------------------------------------------------------------------------------------------

    def _next_prepared(self):
        """The next PreparedBatch; None: the prepare thread has finished (stop); _IDLE: nothing within 0.1 s."""
        if not self.prefetch:
            jobs = self._take_batch()
            return self._prepare(jobs) if jobs else (None if self._stop.is_set() else _IDLE)
        try:
            batch = self._handover.get(timeout=0.1)
        except queue.Empty:
            if self._stop.is_set() and self._preparer is not None and not self._preparer.is_alive() \
                    and self._handover.empty():
                return None  # the prepare thread is gone without its end marker
            return _IDLE
        if batch is not None:
            with self._lock:
                self._staged -= len(batch.jobs)
        return batch

    def _worker(self) -> None:
        from edgekit.station.store import ResultStore

        try:
            store = ResultStore(self.db_path, **self.store_options)
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.failure = e
            self._ready.set()
            return
        try:
            store.event("start", station=self.station_id, pid=os.getpid(), **self.models.versions())
            self._ready.set()
            while True:
                batch = self._next_prepared()
                self._between_batches(store)  # after the wait for jobs: the swap is as fresh as it can be
                if batch is None:
                    break
                if batch is not _IDLE:
                    self._process(store, batch)
            store.event("stop", station=self.station_id, images=self.counts["images"])
        except BaseException as e:  # noqa: BLE001 - the service stops; the CLI reports it in one line
            self.failure = e
            self._stop.set()
        finally:
            self._ready.set()
            self._stopped.set()
            try:
                store.close()
            except Exception:  # noqa: BLE001
                pass

    # --- between batches: swaps and verdicts ---------------------------------------------------------------------

    def _record_error(self, store, where: str, text: str) -> None:
        entry = {"time": iso(time.time()), "where": where, "error": text}
        with self._lock:
            self.errors = (self.errors + [entry])[-RECENT_ERRORS:]
        store.event("error", where=where, error=text)
        if self.metrics is not None:
            self.metrics.error()
        self.note(f"station: {where}: {text}")

    def _between_batches(self, store) -> None:
        from edgekit.station.canary import Canary, decide

        try:
            swap = self.models.refresh()
        except EdgekitError as e:
            self._record_error(store, "swap", f"{e}; the serving adapter is unchanged")
            swap = None
        if swap:
            store.event("swap", detail=swap, **self.models.versions())
            self.note(f"station: {swap}")
            if self.metrics is not None:
                self.metrics.set_models(self.models.serving.version,
                                        self.models.trial.version if self.models.trial else None)
            if self.publisher is not None:
                self.publisher.wake(status=True)
        if self._pending_verdict is None and self.models.trial_error is not None:
            version, why = self.models.trial_error
            self._pending_verdict = {"verdict": "reject", "version": version, "images": 0,
                                     "reason": f"canary: the station could not load it ({why})"}
        if self._pending_verdict is not None:
            v = self._pending_verdict
            try:
                applied = decide(self.models.root.path, v["version"], v["verdict"] == "promote", v["reason"])
            except EdgekitError as e:
                if "no longer on canary hold" not in str(e):
                    return  # the root's lock is busy (an update or an operator's act): try again after the next batch
                applied = {"action": "superseded", "version": v["version"], "reason": str(e)}
            self._pending_verdict = None
            self.last_verdict = {**v, "action": applied["action"], "time": iso(time.time())}
            store.event("canary", **{k: val for k, val in self.last_verdict.items() if k != "time"})
            self.note(f"station: {applied['action']} {v['version']}: {v['reason']}")
            self.canary, self._canary_for = None, None
            if self.publisher is not None:
                self.publisher.wake(status=True)
            self._between_batches(store)  # swap at once: the next batch runs on the promoted (or unchanged) adapter
            return
        trial = self.models.trial
        pair = (trial.version, self.models.serving.version) if trial is not None else None
        if pair != self._canary_for:  # a new trial (or serving version) to shadow: the count starts at zero
            self._canary_for = pair
            policy = self.models.root.read().canary if trial is not None else None
            # no policy recorded (it was cleared after the hold): no automatic verdict, the operator decides
            self.canary = Canary(trial.version, self.models.serving.version, policy) if policy else None
            if self.canary is not None:
                store.event("canary-start", version=trial.version, serving=self.models.serving.version, **policy)
        if self.metrics is not None and self.canary is not None:
            self.metrics.set_canary(self.canary.state())

    # --- a batch -------------------------------------------------------------------------------------------------

    def _process(self, store, batch: PreparedBatch) -> None:
        jobs, images, ok_jobs = batch.jobs, batch.images, batch.ok_jobs
        results = {key: self._error_result(job, batch.decode_errors[key])
                   for job in jobs if (key := id(job)) in batch.decode_errors}
        outs: list = []
        if images:
            try:
                if batch.prepare_error is not None:
                    raise batch.prepare_error
                outs = self.models.run(images, prepared=batch.tensor)
            except Exception as e:  # noqa: BLE001 - a model failure is an ERROR result per image, not a crash
                outs = None
                for job in ok_jobs:
                    results[id(job)] = self._error_result(job, f"the models failed on this batch ({_first_line(e)})")
        if outs:
            for job, img, out in zip(ok_jobs, images, outs):
                try:
                    results[id(job)] = self._result(job, img, out)
                except Exception as e:  # noqa: BLE001
                    results[id(job)] = self._error_result(job, _first_line(e))
        ordered = [results[id(j)] for j in jobs]
        now = time.time()
        for job, r in zip(jobs, ordered):
            r["decided"], r["latency_s"] = iso(now), round(max(0.0, now - job.received), 6)
        store.commit(ordered)  # the commit point: after this line every result exists
        self._after_commit(jobs, ordered, {id(j): o for j, o in zip(ok_jobs, outs or [])})

    def _after_commit(self, jobs: List[Job], results: List[dict], outs: dict) -> None:
        with self._lock:
            self.counts["batches"] += 1
            for r in results:
                self.counts["images"] += 1
                self.counts[{"OK": "ok", "NG": "ng"}.get(r["decision"], "error")] += 1
                if r.get("ood") is not None:
                    self.counts["drift_scored"] += 1
                    self.counts["flagged"] += int(bool(r["ood"]["flagged"]))
        for job, r in zip(jobs, results):
            if job.reply is not None and not job.reply.done():
                job.reply.set_result(r)
        if self.metrics is not None:
            for r in results:
                self.metrics.observe(r)
            self.metrics.set_queue(self.queue_depth())
        if self.review is not None:
            for job, r in zip(jobs, results):
                if r.get("ood") and r["ood"]["flagged"]:
                    self.review.offer(job.data if job.data is not None else job.path, job.name, r)
        if self.publisher is not None:
            self.publisher.wake()
        if self.canary is not None:
            for job, r in zip(jobs, results):
                out = outs.get(id(job))
                if out is None or out["trial"] is None or r["decision"] == "ERROR":
                    continue
                verdict = self.canary.observe(out["classification"], out["trial"])
                if verdict is not None:
                    self._pending_verdict = verdict  # applied before the next batch (the root's lock, not here)
                    break

    def _base_result(self, job: Job) -> dict:
        m = self.models
        return {"id": None, "station": self.station_id, "key": job.key, "source": job.source, "name": job.name,
                "received": iso(job.received), "decided": None, "latency_s": None, "decision": "ERROR",
                "reasons": [], "class": None, "prob": None, "task": None,
                "serving": {"version": m.serving.version, "backbone": m.backbone.id}, "trial": None,
                "segment": None, "ood": None, "error": None}

    def _error_result(self, job: Job, error: str) -> dict:
        return {**self._base_result(job), "reasons": [error], "error": error}

    def _result(self, job: Job, image: np.ndarray, out: dict) -> dict:
        from edgekit.station.decision import decide, scaled_ood

        r = self._base_result(job)
        c = out["classification"]
        r.update({"class": c["class"], "prob": round(float(c["prob"]), 6), "task": c.get("task")})
        t = out["trial"]
        if t is not None:
            r["trial"] = {"version": self.models.trial.version, "class": t["class"], "prob": round(float(t["prob"]), 6)}
        r["ood"] = scaled_ood(out["ood"], self.config)  # [drift] threshold_scale, applied once, recorded as decided
        if out["segment_probs"] is not None:
            r["segment"] = self._segment(out["segment_probs"])
        decision, reasons = decide(c, r["segment"], r["ood"], self.config)
        r["decision"], r["reasons"] = decision, list(reasons)
        return r

    def _segment(self, probs: np.ndarray) -> dict:
        from edgekit.station.regions import segment_summary

        summary = segment_summary(probs, self.config.segment_threshold, self.config.min_region_px)
        return {"artifact": self.models.segment_id, **summary}

    # --- status ----------------------------------------------------------------------------------------------------

    def status(self) -> dict:
        """What the station is doing, for GET /status, the retained MQTT status and the metrics."""
        m = self.models
        with self._lock:
            counts = dict(self.counts)
            errors = list(self.errors)
        scored = counts.pop("drift_scored")
        canary = self.canary.state() if self.canary is not None else None
        return {"station": self.station_id, "root": str(m.root.path), "pid": os.getpid(), "started": iso(self.started),
                "running": self.running and not self._stop.is_set(), "serving": m.serving.version,
                "trial": m.trial.version if m.trial else None, "backbone": m.backbone.id, "segment": m.segment_id,
                "drift": "available" if m.serving.drift is not None else "unavailable",
                "canary": canary, "last_verdict": self.last_verdict, "counts": counts,
                "drift_rate": (counts["flagged"] / scored) if scored else None, "queue": self.queue_depth(),
                "last_errors": errors}
