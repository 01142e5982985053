"""The station's inputs (watch folder, HTTP), its OK/NG decision and config, and mask regions.

The watch tests run a real watchdog observer on a temporary folder and a real consumer: a thread that takes
submitted jobs from a bounded queue, reads each file and commits its key to a real SQLite table, which is what
``store_seen`` asks (the station's store does the same with its results table). The HTTP tests run the real
server on 127.0.0.1 and a real worker thread that decodes the upload and answers the job's future.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import queue
import shutil
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.station.decision import StationConfig, decide
from edgekit.station.inputs import HttpInput, WatchInput, is_temp_name, parse_addr, safe_upload_name
from edgekit.station.jobs import Job
from edgekit.station.regions import mask_regions, segment_summary

FAST = dict(rescan_s=0.25, settle_s=0.05, rescan_settle_s=0.2, retry_s=0.05)


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(cond, timeout=10.0, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


class KeyStore:
    """A real SQLite table of committed keys: the consumer commits, ``seen`` reads (as the station's store)."""

    def __init__(self, path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, name TEXT)")
        self.lock = threading.Lock()

    def commit(self, job: Job):
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO results VALUES (?, ?)", (job.key, job.name))

    def seen(self, keys):
        keys = list(keys)
        with self.lock:
            return {k for (k,) in self.db.execute(
                f"SELECT key FROM results WHERE key IN ({','.join('?' * len(keys))})", keys)} if keys else set()

    def close(self):
        self.db.close()


class Consumer:
    """A bounded queue and one worker thread that reads every submitted file and commits its key; records
    every submit (accepted or refused) so a test can count them. Not started (``start=False``): the queue fills."""

    def __init__(self, store: KeyStore, maxsize: int = 64, start: bool = True):
        self.store, self.q = store, queue.Queue(maxsize)
        self.accepted: list[Job] = []
        self.refused = 0
        self.reads: dict[str, int] = {}
        self.stop_flag = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        if start:
            self.thread.start()

    def submit(self, job: Job) -> bool:
        try:
            self.q.put_nowait(job)
        except queue.Full:
            self.refused += 1
            return False
        self.accepted.append(job)
        return True

    def _run(self):
        while not self.stop_flag:
            try:
                job = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            self.reads[job.name] = len(Path(job.path).read_bytes()) if job.path else len(job.data)
            self.store.commit(job)

    def close(self):
        self.stop_flag = True
        if self.thread.is_alive():
            self.thread.join()

    def names(self):
        return [j.name for j in self.accepted]


@pytest.fixture()
def station_parts(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    store = KeyStore(tmp_path / "keys.db")
    consumer = Consumer(store)
    yield folder, store, consumer
    consumer.close()
    store.close()


def _old(path: Path, age_s: float = 60.0):
    t = time.time() - age_s
    os.utime(path, (t, t))


# -- watch folder


def test_a_file_written_slowly_counts_once_after_close(station_parts):
    folder, store, consumer = station_parts
    data = png_bytes(1, 64)
    with WatchInput(folder, consumer.submit, store.seen, **FAST) as watch:
        with open(folder / "slow.png", "wb") as f:
            for i in range(0, len(data), len(data) // 6 + 1):
                f.write(data[i:i + len(data) // 6 + 1])
                f.flush()
                time.sleep(0.15)  # over settle_s and rescan_settle_s: only the open count holds it back
                assert consumer.accepted == [], "submitted while the writer still had it open"
        assert wait_for(lambda: len(consumer.accepted) == 1)
        time.sleep(3 * FAST["rescan_s"])  # rescans after the commit submit nothing more
        assert consumer.names() == ["slow.png"]
        assert consumer.reads["slow.png"] == len(data)  # the worker read the whole file, not a part
        st = (folder / "slow.png").stat()
        assert consumer.accepted[0].key == f"watch:slow.png:{st.st_size}:{st.st_mtime_ns}"
        assert consumer.accepted[0].source == "watch" and consumer.accepted[0].path == folder / "slow.png"
        assert watch.submitted == 1


def test_a_writer_that_started_before_the_watch_is_waited_for(station_parts):
    """Its open came before the watch (a station restarted while the line writes): the writes alone do not make
    the file a candidate; its close does."""
    folder, store, consumer = station_parts
    data = png_bytes(6, 64)
    step = len(data) // 5 + 1
    with open(folder / "early.png", "wb") as f:
        f.write(data[:step])
        f.flush()
        with WatchInput(folder, consumer.submit, store.seen, **{**FAST, "rescan_settle_s": 1.0}):
            for i in range(step, len(data), step):
                time.sleep(0.1)
                f.write(data[i:i + step])
                f.flush()
                assert consumer.accepted == [], "submitted while the writer (open before the watch) still wrote"
            time.sleep(0.3)
            assert consumer.accepted == []
            f.close()
            assert wait_for(lambda: len(consumer.accepted) == 1)
            assert wait_for(lambda: consumer.reads.get("early.png") == len(data))
            time.sleep(3 * FAST["rescan_s"])
            assert consumer.names() == ["early.png"]


def test_renamed_in_counts_once_and_temp_names_never(station_parts, tmp_path):
    folder, store, consumer = station_parts
    outside = tmp_path / "outside"
    outside.mkdir()
    with WatchInput(folder, consumer.submit, store.seen, **FAST):
        # the README's way: write under a hidden temporary name, rename into place (atomic)
        (folder / ".a.png.tmp").write_bytes(png_bytes(2))
        os.rename(folder / ".a.png.tmp", folder / "a.png")
        # moved in from another folder of the same file system: inotify says "created", no open, no close
        (outside / "b.png").write_bytes(png_bytes(3))
        os.rename(outside / "b.png", folder / "b.png")
        # a copy that sets the times after closing (shutil.copy2): one image, keyed by its final mtime
        (outside / "c.png").write_bytes(png_bytes(4))
        _old(outside / "c.png")
        shutil.copy2(outside / "c.png", folder / "c.png")
        # never taken: hidden, temporary, partial, not an image, empty
        for name in (".hidden.png", "d.png.tmp", "e.png.part", "f.png~", "notes.txt"):
            (folder / name).write_bytes(png_bytes(5))
        (folder / "empty.png").write_bytes(b"")
        assert wait_for(lambda: len(consumer.accepted) >= 3)
        time.sleep(4 * FAST["rescan_s"])
        assert sorted(consumer.names()) == ["a.png", "b.png", "c.png"]
        c = next(j for j in consumer.accepted if j.name == "c.png")
        assert c.key.endswith(f":{(folder / 'c.png').stat().st_mtime_ns}")


def test_files_present_at_start_are_taken_and_a_restart_does_not_take_them_again(station_parts):
    folder, store, consumer = station_parts
    for i in range(3):
        (folder / f"old{i}.png").write_bytes(png_bytes(10 + i))
        _old(folder / f"old{i}.png")
    (folder / ".old.png").write_bytes(png_bytes(9))
    with WatchInput(folder, consumer.submit, store.seen, **FAST):
        assert wait_for(lambda: len(store.seen(j.key for j in consumer.accepted)) == 3)
        assert sorted(consumer.names()) == ["old0.png", "old1.png", "old2.png"]
    # restart: the store knows them, so the startup scan and later rescans submit nothing
    with WatchInput(folder, consumer.submit, store.seen, **FAST):
        time.sleep(4 * FAST["rescan_s"])
        assert len(consumer.accepted) == 3
        # a file rewritten with new content is a new image (new size/mtime: a new key)
        (folder / "old0.png").write_bytes(png_bytes(99, 48))
        assert wait_for(lambda: len(consumer.accepted) == 4)
        time.sleep(3 * FAST["rescan_s"])
        assert consumer.names()[3] == "old0.png" and len(consumer.accepted) == 4


def test_a_close_without_new_content_is_not_a_second_image(station_parts):
    folder, store, consumer = station_parts
    with WatchInput(folder, consumer.submit, store.seen, **FAST):
        (folder / "x.png").write_bytes(png_bytes(20))
        assert wait_for(lambda: len(consumer.accepted) == 1)
        open(folder / "x.png", "ab").close()  # IN_CLOSE_WRITE again, same size and mtime: the same key
        time.sleep(4 * FAST["rescan_s"])
        assert consumer.names() == ["x.png"]


def test_back_pressure_retries_in_order_and_submits_each_once(station_parts):
    folder, store, _ = station_parts
    consumer = Consumer(store, maxsize=2, start=False)  # the worker has not started: the queue fills after two
    try:
        with WatchInput(folder, consumer.submit, store.seen, **FAST) as watch:
            for i in range(6):
                (folder / f"p{i}.png").write_bytes(png_bytes(30 + i))
                time.sleep(0.08)  # distinct events, in this order
            assert wait_for(lambda: len(consumer.accepted) == 2 and consumer.refused >= 2)
            time.sleep(3 * FAST["rescan_s"])  # rescans while full submit nothing twice
            assert len(consumer.accepted) == 2
            consumer.thread.start()
            assert wait_for(lambda: len(store.seen(j.key for j in consumer.accepted)) == 6)
            time.sleep(3 * FAST["rescan_s"])
            assert consumer.names() == [f"p{i}.png" for i in range(6)]  # arrival order kept through the retries
            assert watch.retries >= 4
    finally:
        consumer.close()


def test_recursive_takes_new_subfolders_and_keys_by_relative_path(station_parts, tmp_path):
    folder, store, consumer = station_parts
    with WatchInput(folder, consumer.submit, store.seen, recursive=True, **FAST):
        (folder / "line1" / "cam2").mkdir(parents=True)
        (folder / "line1" / "cam2" / "x.png").write_bytes(png_bytes(40))
        (folder / ".trash").mkdir()
        (folder / ".trash" / "y.png").write_bytes(png_bytes(41))
        staged = tmp_path / "staged"  # a folder of finished images moved in at once
        staged.mkdir()
        (staged / "z.png").write_bytes(png_bytes(42))
        _old(staged / "z.png")
        os.rename(staged, folder / "batch7")
        assert wait_for(lambda: len(consumer.accepted) == 2)
        time.sleep(3 * FAST["rescan_s"])
        assert sorted(consumer.names()) == ["batch7/z.png", "line1/cam2/x.png"]
        x = next(j for j in consumer.accepted if j.name == "line1/cam2/x.png")
        assert x.key.startswith("watch:line1/cam2/x.png:")
    consumer.accepted.clear()
    with WatchInput(folder, consumer.submit, store.seen, **FAST):  # not recursive: files in subfolders are not its
        (folder / "line1" / "cam2" / "w.png").write_bytes(png_bytes(43))
        time.sleep(3 * FAST["rescan_s"])
        assert consumer.accepted == []


def test_lost_events_make_a_rescan_that_no_longer_trusts_open_counts(station_parts):
    lost = pytest.importorskip("watchdog.events").__dict__.get("EventsLostEvent")
    if lost is None:
        pytest.skip("this watchdog has no EventsLostEvent (watchdog >= 7 reports inotify overflows)")
    folder, store, consumer = station_parts
    with WatchInput(folder, consumer.submit, store.seen, **FAST) as watch:
        f = open(folder / "held.png", "wb")  # open for writing: the open count holds it back
        try:
            f.write(png_bytes(50))
            f.flush()
            _old(folder / "held.png")
            time.sleep(3 * FAST["rescan_s"])
            assert consumer.accepted == []
            # as if the kernel's queue had overflowed (its close could be among the lost events): the counts are
            # dropped and the file is taken by its age, as at startup
            watch._on_event(lost(str(folder), is_directory=True))
            assert wait_for(lambda: consumer.names() == ["held.png"])
        finally:
            f.close()
        time.sleep(3 * FAST["rescan_s"])
        assert consumer.names() == ["held.png"]  # its close (same size and mtime) is not a second image


def test_watch_refuses_a_missing_folder(tmp_path):
    with pytest.raises(EdgekitError, match="watch folder not found"):
        WatchInput(tmp_path / "nope", lambda j: True, lambda k: set()).start()


def test_temp_names():
    assert is_temp_name(".a.png") and is_temp_name("a.png.tmp") and is_temp_name("a.PART") and is_temp_name("d/.x/a.png")
    assert not is_temp_name("a.png") and not is_temp_name("sub/a.png")


# -- HTTP


class Worker:
    """A real submit side: a bounded queue and a thread that decodes each upload and answers its future (the
    station's worker does this after the commit)."""

    def __init__(self, maxsize=4, start=True):
        from edgekit.data.images import decode_gray

        self.decode = decode_gray
        self.q = queue.Queue(maxsize)
        self.stop_flag = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        if start:
            self.thread.start()

    def submit(self, job):
        try:
            self.q.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _run(self):
        while not self.stop_flag:
            try:
                job = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            img = self.decode(job.data)
            job.reply.set_result({"key": job.key, "source": job.source, "name": job.name, "decision": "OK",
                                  "shape": list(img.shape), "mean": float(img.mean())})

    def close(self):
        self.stop_flag = True
        if self.thread.is_alive():
            self.thread.join()


def post(url, data, timeout=10):
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture()
def http_station(request):
    worker = Worker(maxsize=1, start=getattr(request, "param", True))
    status = {"station": "test", "queue": 0}
    inp = HttpInput("127.0.0.1:0", worker.submit, lambda: status, timeout_s=10).start()
    yield inp, worker
    inp.stop()
    worker.close()


def test_http_post_a_real_image_answers_what_the_worker_set(http_station, sd900):
    from edgekit.data.images import read_gray

    inp, worker = http_station
    path = sd900 / "Source Images" / "Sc_1.bmp"
    code, body = post(f"http://{inp.address}/infer?name=../../etc/Sc_1.bmp", path.read_bytes())
    assert code == 200, body
    doc = json.loads(body)
    expected = read_gray(path)
    assert doc["shape"] == list(expected.shape) and doc["mean"] == pytest.approx(float(expected.mean()))
    assert doc["source"] == "http" and doc["key"].startswith("http:") and len(doc["key"]) == len("http:") + 36
    assert doc["name"] == "Sc_1.bmp"  # the path parts of ?name= are dropped (it may become a file name)
    code, body = post(f"http://{inp.address}/infer", png_bytes(7))
    assert code == 200 and json.loads(body)["name"] == "upload"
    with urllib.request.urlopen(f"http://{inp.address}/status", timeout=5) as r:
        assert json.loads(r.read()) == {"station": "test", "queue": 0}


def test_http_refusals_are_one_json_line(http_station):
    inp, worker = http_station
    for data in (b"this is not an image", png_bytes(8)[:40], b""):
        code, body = post(f"http://{inp.address}/infer?name=x.png", data)
        assert code == 400, (code, body)
        assert body.count(b"\n") == 1 and "not a readable image" in json.loads(body)["error"]
    code, body = post(f"http://{inp.address}/nowhere", b"x")
    assert code == 404 and body.count(b"\n") == 1 and "error" in json.loads(body)
    try:
        urllib.request.urlopen(f"http://{inp.address}/infer", timeout=5)
        raise AssertionError("GET /infer answered 200")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and "error" in json.loads(e.read())
    assert worker.q.empty()  # nothing undecodable reached the worker


@pytest.mark.parametrize("http_station", [False], indirect=True)  # the worker not started: the queue (1) fills
def test_http_queue_full_is_503_and_the_waiting_request_still_gets_its_result(http_station):
    inp, worker = http_station
    first = concurrent.futures.ThreadPoolExecutor(1).submit(post, f"http://{inp.address}/infer?name=a.png", png_bytes(11))
    assert wait_for(worker.q.full)
    code, body = post(f"http://{inp.address}/infer?name=b.png", png_bytes(12))
    assert code == 503 and "queue is full" in json.loads(body)["error"] and body.count(b"\n") == 1
    worker.thread.start()
    code, body = first.result(timeout=10)
    assert code == 200 and json.loads(body)["name"] == "a.png"


def test_http_body_limit_and_timeout(tmp_path):
    worker = Worker(maxsize=4, start=False)  # no worker: nothing answers
    inp = HttpInput("127.0.0.1:0", worker.submit, dict, timeout_s=0.3, max_bytes=1000).start()
    try:
        code, body = post(f"http://{inp.address}/infer", b"\0" * 2000)
        assert code == 413 and "over the limit" in json.loads(body)["error"]
        code, body = post(f"http://{inp.address}/infer", png_bytes(13, 8))
        assert code == 504 and "no result within" in json.loads(body)["error"]
    finally:
        inp.stop()
        worker.close()


BIG = 200_000_000  # the attack pass's upload: over the default 64 MiB limit
CHUNK = bytes(1 << 20)


def _stream(sock: socket.socket, total: int) -> None:
    """Send ``total`` zero bytes as a body, 1 MiB at a time."""
    sent = 0
    while sent < total:
        n = min(len(CHUNK), total - sent)
        sock.sendall(CHUNK[:n] if n < len(CHUNK) else CHUNK)
        sent += n


def _read_reply(sock: socket.socket) -> tuple:
    """(status line, headers text, body) of one HTTP reply read from ``sock``; the body by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole reply: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside the reply's body"
        body += chunk
    return lines[0], "\n".join(lines[1:]).lower(), body


def _is_413_line(status: str, body: bytes) -> bool:
    return (status.startswith("HTTP/1.1 413") and body.count(b"\n") == 1
            and json.loads(body)["error"] == f"body of {BIG} bytes is over the limit of {64 << 20}")


def test_http_200_mb_post_gets_a_readable_413(http_station):
    """A 200 MB POST used to be answered by closing the socket with the body unread: the kernel reset the
    connection and the client got a broken pipe instead of the 413. Now every kind of client reads the 413 line."""
    inp, worker = http_station
    request = f"POST /infer?name=big.png HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\n"
    t0 = time.monotonic()
    # a client that sends the whole body before it reads (as urllib and http.client do)
    with socket.create_connection((inp.host, inp.port), timeout=60) as sock:
        sock.sendall((request + "\r\n").encode())
        _stream(sock, BIG)
        status, headers, body = _read_reply(sock)
        assert _is_413_line(status, body) and "connection: close" in headers
        assert sock.recv(1) == b""  # then the server closes
    # a client that reads while it streams (curl without Expect): the 413 comes before the body is out
    with socket.create_connection((inp.host, inp.port), timeout=60) as sock:
        sock.sendall((request + "\r\n").encode())
        sender = concurrent.futures.ThreadPoolExecutor(1).submit(_stream, sock, BIG)
        status, headers, body = _read_reply(sock)
        assert _is_413_line(status, body)
        sender.result(timeout=60)  # the server drained the rest: no broken pipe for the sender either
    # Expect: 100-continue: the 413 instead of "100 Continue", before a byte of the body is sent
    with socket.create_connection((inp.host, inp.port), timeout=10) as sock:
        sock.sendall((request + "Expect: 100-continue\r\n\r\n").encode())
        status, headers, body = _read_reply(sock)
        assert _is_413_line(status, body)
        assert sock.recv(1) == b""
    # urllib (http.client underneath), the body streamed from an iterable
    req = urllib.request.Request(f"http://{inp.address}/infer", data=(CHUNK[:min(len(CHUNK), BIG - i)]
                                 for i in range(0, BIG, len(CHUNK))), method="POST",
                                 headers={"Content-Length": str(BIG), "Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and _is_413_line("HTTP/1.1 413", e.value.read())
    assert time.monotonic() - t0 < 120 and worker.q.empty()


def test_http_refused_body_is_dropped_within_bounds():
    """What a refused body may cost the station is bounded: past ``discard_bytes`` or ``discard_timeout_s`` the
    connection closes (a client still sending then gets a reset, but has had the 413 to read)."""
    inp = HttpInput("127.0.0.1:0", lambda job: pytest.fail("a refused body was submitted"), dict, max_bytes=1000,
                    discard_bytes=1 << 20, discard_timeout_s=1.0).start()
    try:
        request = f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\n\r\n".encode()
        # a client that streams far past the bound, reading meanwhile
        with socket.create_connection((inp.host, inp.port), timeout=30) as sock:
            sock.sendall(request)
            t0 = time.monotonic()
            sender = concurrent.futures.ThreadPoolExecutor(1).submit(_stream, sock, BIG)
            status, _, body = _read_reply(sock)
            assert status.startswith("HTTP/1.1 413") and "over the limit of 1000" in json.loads(body)["error"]
            with pytest.raises(OSError):  # reset once the server stopped reading, long before 200 MB went out
                sender.result(timeout=30)
            assert time.monotonic() - t0 < 30
        # a client that announces 200 MB and then trickles: the server stops reading at the deadline (1 s), not
        # after read_timeout_s (30 s) of each trickle
        with socket.create_connection((inp.host, inp.port), timeout=30) as sock:
            sock.sendall(request)
            t0 = time.monotonic()
            status, _, body = _read_reply(sock)
            assert status.startswith("HTTP/1.1 413") and sock.recv(1) == b""  # the reply ends: our side is shut
            with pytest.raises(OSError):  # a reset once the server closed
                while time.monotonic() - t0 < 10:
                    sock.sendall(b"x" * 100)
                    time.sleep(0.05)
            assert 0.9 < time.monotonic() - t0 < 10
    finally:
        inp.stop()


def test_http_addresses():
    assert parse_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    for bad in ("8080", "127.0.0.1:", "host:port", "127.0.0.1:70000"):
        with pytest.raises(EdgekitError, match="HOST:PORT"):
            parse_addr(bad)
    assert safe_upload_name("a b/c.png") == "c.png" and safe_upload_name("..") == "upload"
    assert safe_upload_name("x y$.png") == "x_y_.png" and safe_upload_name(None) == "upload"
    busy = HttpInput("127.0.0.1:0", lambda j: True, dict).start()
    try:
        with pytest.raises(EdgekitError, match="cannot listen on"):
            HttpInput(busy.address, lambda j: True, dict).start()
    finally:
        busy.stop()


# -- mask regions against scipy's labelling


def _reference_regions(prob, threshold, min_px):
    ndimage = pytest.importorskip("scipy.ndimage")
    fg = prob >= threshold
    lab, _ = ndimage.label(fg, structure=np.ones((3, 3)))
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        inside = lab[sl] == i
        area = int(inside.sum())
        if area >= min_px:
            out.append((area, [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], float(prob[sl][inside].max())))
    return sorted(out, key=lambda r: (-r[0], r[1][1], r[1][0]))


def _ours(prob, threshold, min_px):
    regions = mask_regions(prob, threshold, min_px)
    size = prob.shape[0] * prob.shape[1]
    for r in regions:
        assert r["area_frac"] == pytest.approx(r["area_px"] / size)
    assert [r["area_px"] for r in regions] == sorted((r["area_px"] for r in regions), reverse=True)
    return sorted(((r["area_px"], r["bbox"], r["peak"]) for r in regions), key=lambda r: (-r[0], r[1][1], r[1][0]))


def test_regions_match_scipy_on_every_sd900_test_mask(sd900):
    from edgekit.data.images import read_gray

    names = json.loads((sd900 / "split.json").read_text())["test"]
    assert len(names) == 225
    nonempty = 0
    for name in names:
        gt = read_gray(sd900 / "Ground truth" / f"{name}.png").astype(np.float32) / 255.0
        ours = _ours(gt, 0.5, 1)
        assert ours == _reference_regions(gt, 0.5, 1), name
        nonempty += bool(ours)
    assert nonempty == 225  # every SD-900 image has a defect


def test_regions_match_scipy_on_random_masks():
    rng = np.random.default_rng(22)
    for trial in range(150):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        prob = (rng.random((h, w)) * rng.uniform(0.3, 2.0)).astype(np.float32)
        if trial % 3 == 0:  # blobs and diagonals, not only speckle
            prob = np.maximum(prob, np.kron(rng.random((h // 4 + 1, w // 4 + 1)), np.ones((4, 4)))[:h, :w])
        min_px = int(rng.integers(1, 6))
        assert _ours(prob, 0.5, min_px) == _reference_regions(prob, 0.5, min_px), trial


def test_regions_by_hand():
    m = np.zeros((6, 8), np.float32)
    m[1, 1] = 0.9          # touches the next one only diagonally: one region under 8-connectivity
    m[2, 2:5] = 0.6
    m[5, 7] = 0.7          # a 1-pixel speck
    r = mask_regions(m[None, None], 0.5, 1)  # (1, 1, H, W) is taken as H x W
    assert r == [{"area_px": 4, "area_frac": 4 / 48, "bbox": [1, 1, 5, 3], "peak": pytest.approx(0.9)},
                 {"area_px": 1, "area_frac": 1 / 48, "bbox": [7, 5, 8, 6], "peak": pytest.approx(0.7)}]
    assert len(mask_regions(m, 0.5, 2)) == 1 and mask_regions(np.zeros((4, 4)), 0.5, 1) == []
    assert segment_summary(m, 0.5, 2)["defect_frac"] == pytest.approx(5 / 48)
    with pytest.raises(EdgekitError, match="H x W"):
        mask_regions(np.zeros((2, 3, 4)), 0.5, 1)


# -- decision and its config

CFG = dict(ng_classes=["scratches"], min_prob=0.5, min_region_px=16, max_defect_frac=0.05)


@pytest.mark.parametrize("cls,seg,ood,cfg,expected", [
    ({"class": "patches", "prob": 0.9}, None, None, CFG, ("OK", [])),
    ({"class": "scratches", "prob": 0.9}, None, None, CFG, ("NG", ["class scratches"])),
    ({"class": "patches", "prob": 0.41}, None, None, CFG, ("NG", ["unsure (prob 0.41 < 0.5)"])),
    ({"class": "scratches", "prob": 0.41}, None, None, CFG, ("NG", ["class scratches", "unsure (prob 0.41 < 0.5)"])),
    ({"class": "patches", "prob": 0.9}, None, None, dict(ok_classes=["ok"]), ("NG", ["class patches not in ok_classes"])),
    ({"class": "ok", "prob": 0.9}, None, None, dict(ok_classes=["ok"]), ("OK", [])),
    ({"class": "scratches", "prob": 0.1}, None, None, {}, ("OK", [])),  # defaults: no class is NG, never unsure
    (None, {"regions": [{"area_px": 15}], "defect_frac": 0.01}, None, CFG, ("OK", [])),
    (None, {"regions": [{"area_px": 812}, {"area_px": 15}], "defect_frac": 0.01}, None, CFG, ("NG", ["region 812 px"])),
    (None, {"regions": [{"area_px": 40}, {"area_px": 16}], "defect_frac": 0.01}, None, CFG,
     ("NG", ["2 regions, largest 40 px"])),
    (None, {"regions": [], "defect_frac": 0.06}, None, CFG, ("NG", ["defect_frac 0.0600 > 0.05"])),
    ({"class": "patches", "prob": 0.9}, None, {"score": 9.0, "threshold": 5.0, "flagged": True}, CFG, ("OK", ["novel"])),
    ({"class": "scratches", "prob": 0.9}, None, {"flagged": True}, CFG, ("NG", ["class scratches", "novel"])),
    ({"class": "patches", "prob": 0.9}, None, {"flagged": True}, dict(novel_is_ng=True), ("NG", ["novel"])),
    ({"class": "patches", "prob": 0.9}, None, {"flagged": True}, dict(drift_enabled=False), ("OK", [])),
    ({"class": "patches", "prob": 0.9}, None, {"flagged": False}, CFG, ("OK", [])),
    (None, None, None, {}, ("OK", [])),
])
def test_decide(cls, seg, ood, cfg, expected):
    assert decide(cls, seg, ood, StationConfig(**cfg)) == expected


def test_scaled_ood():
    from edgekit.station.decision import scaled_ood

    ood = {"score": 9.0, "threshold": 5.0, "flagged": True}
    assert scaled_ood(ood, StationConfig()) is ood
    assert scaled_ood(ood, StationConfig(drift_threshold_scale=2.0)) == {"score": 9.0, "threshold": 10.0, "flagged": False}
    assert scaled_ood(ood, StationConfig(drift_enabled=False)) is None and scaled_ood(None, StationConfig()) is None


def test_config_file_and_defaults(tmp_path):
    d = StationConfig.load(None)
    assert (d.ng_classes, d.ok_classes, d.min_prob, d.segment_threshold, d.min_region_px, d.max_defect_frac,
            d.drift_enabled, d.drift_threshold_scale, d.novel_is_ng) == ([], [], 0.0, 0.5, 16, 1.0, True, 1.0, False)
    f = tmp_path / "station.toml"
    f.write_text('[decision]\nng_classes = ["scratches", "inclusion"]\nmin_prob = 0.6\n'
                 '[segment]\nthreshold = 0.4\nmin_region_px = 32\nmax_defect_frac = 0.02\n'
                 '[drift]\nenabled = false\nthreshold_scale = 1.5\n')
    c = StationConfig.load(f)
    assert c.ng_classes == ["scratches", "inclusion"] and c.min_prob == 0.6 and c.segment_threshold == 0.4
    assert c.min_region_px == 32 and c.max_defect_frac == 0.02 and not c.drift_enabled and c.drift_threshold_scale == 1.5
    assert c.as_dict()["decision"]["ng_classes"] == ["scratches", "inclusion"]
    c.check_classes(["inclusion", "patches", "scratches"])
    with pytest.raises(EdgekitError, match="'scratches', which the serving adapter does not have"):
        c.check_classes(["crazing", "patches"])


@pytest.mark.parametrize("text,says", [
    ("[decison]\nmin_prob = 0.5\n", "unknown section [decison]"),
    ("[decision]\nmin_prob = 0.5\nng_class = ['a']\n", "unknown key 'ng_class' in [decision]"),
    ("[decision]\nmin_prob = 'high'\n", "[decision] min_prob must be a number from 0 to 1, got 'high'"),
    ("[decision]\nmin_prob = 1.5\n", "[decision] min_prob must be a number from 0 to 1, got 1.5"),
    ("[decision]\nng_classes = 'scratches'\n", "[decision] ng_classes must be a list of class names"),
    ("[decision]\nng_classes = ['a']\nok_classes = ['a']\n", "class 'a' is in both ng_classes and ok_classes"),
    ("[segment]\nmin_region_px = 3.5\n", "[segment] min_region_px must be a whole number >= 0, got 3.5"),
    ("[segment]\nmin_region_px = true\n", "[segment] min_region_px must be a whole number >= 0, got True"),
    ("[drift]\nenabled = 1\n", "[drift] enabled must be true or false, got 1"),
    ("[drift]\nthreshold_scale = 0\n", "[drift] threshold_scale must be a number > 0, got 0"),
    ("min_prob = 0.5\n", "key 'min_prob' outside any section"),
    ("[decision\nmin_prob = 0.5\n", "is not valid TOML"),
])
def test_config_refusals_are_one_line_naming_file_and_key(tmp_path, text, says):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(EdgekitError) as e:
        StationConfig.load(f)
    msg = str(e.value)
    assert says in msg and str(f) in msg and "\n" not in msg, msg


def test_config_missing_file(tmp_path):
    with pytest.raises(EdgekitError, match="station config not found"):
        StationConfig.load(tmp_path / "none.toml")


def test_http_client_that_stalls_or_resets_gets_408_and_no_traceback(tmp_path, capfd):
    """A body cut short used to hold its thread forever, and a client reset printed socketserver's traceback on
    the station's stderr; now a stall is a 408 after read_timeout_s and a reset is silent."""
    import socket
    import struct

    worker = Worker(maxsize=4, start=False)
    inp = HttpInput("127.0.0.1:0", worker.submit, dict, read_timeout_s=0.5).start()
    head = b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 600\r\n\r\n" + b"\x89PNG" * 5
    try:
        with socket.create_connection(("127.0.0.1", inp.port), timeout=10) as stalled:
            stalled.sendall(head)
            assert stalled.recv(200).startswith(b"HTTP/1.1 408")
        for _ in range(3):  # reset mid-body: RST instead of FIN
            s = socket.create_connection(("127.0.0.1", inp.port), timeout=10)
            s.sendall(head)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(0.3)
        with urllib.request.urlopen(f"http://{inp.address}/status", timeout=10) as r:
            assert r.status == 200  # still serving
    finally:
        inp.stop()
        worker.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_metrics_scraper_that_resets_prints_no_traceback(capfd):
    """prometheus_client's server printed socketserver's whole traceback for each client reset."""
    import socket
    import struct

    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed (pip install "
                                                    "'edgekit[station]')")
    from edgekit.station.metrics import StationMetrics

    m = StationMetrics("127.0.0.1:0")
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(0.3)
        with urllib.request.urlopen(m.url, timeout=10) as r:
            assert r.status == 200 and b"edgekit" in r.read()
    finally:
        m.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_topics_and_station_ids_with_control_characters_are_refused():
    """A newline in --topic or --station-id passed the check and split the one-line notes that quote them."""
    from edgekit.station.mqtt import _check_topic

    for bad in ("a\nb", "plant\t1", "x\0y", "edgekit/", "a/#"):
        with pytest.raises(EdgekitError, match="must be a plain MQTT topic prefix") as e:
            _check_topic(bad, "--topic")
        assert "\n" not in str(e.value)
    assert _check_topic("edgekit/plant 1", "--topic") == "edgekit/plant 1"


@pytest.mark.parametrize("headers, code, says", [
    # a chunked body behind a Content-Length: read by the length, its rest became the next request (smuggling)
    ("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", 411, "not a Transfer-Encoding"),
    ("Transfer-Encoding: chunked\r\n", 411, "not a Transfer-Encoding"),
    # two lengths: the first one won (a proxy in front may frame by the other)
    ("Content-Length: 5\r\nContent-Length: 500\r\n", 400, "2 different Content-Length headers (5, 500)"),
    ("Content-Length: -5\r\n", 400, "Content-Length '-5' is not a byte count"),
    ("Content-Length: abc\r\n", 400, "Content-Length 'abc' is not a byte count"),
])
def test_http_a_body_framed_any_other_way_than_one_length_is_refused_and_closed(http_station, headers, code, says):
    """POST /infer takes one Content-Length; anything else is refused on the headers, one JSON line, and the
    connection closes: what followed in the stream is never read as another request (here a GET /status
    smuggled after the body).  A length with whitespace around it is still a length."""
    inp, worker = http_station
    smuggled = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((inp.host, inp.port), timeout=10) as sock:
        sock.sendall(f"POST /infer HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + b"0\r\n\r\n" + smuggled)
        status, head, body = _read_reply(sock)
        assert status.startswith(f"HTTP/1.1 {code}") and body.count(b"\n") == 1 and says in json.loads(body)["error"]
        assert "connection: close" in head
        rest = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        assert rest == b""  # no second reply: the smuggled GET was not served
    with socket.create_connection((inp.host, inp.port), timeout=10) as sock:
        sock.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length:  3 \r\n\r\nabc")
        status, _, body = _read_reply(sock)
        assert status.startswith("HTTP/1.1 400") and "not a readable image" in json.loads(body)["error"]


def test_http_listens_on_an_ipv6_address_and_brackets_hold_only_one():
    """'[::1]:PORT', which the shared address parser takes, could not be listened on (the server's socket was
    AF_INET: 'Address family for hostname not supported'); and brackets around anything but an IPv6 address
    ('[::1]]:80' gave the host '::1]', '[broker.plant]:1883') passed the parser."""
    from edgekit.errors import EdgekitError
    from edgekit.utils import parse_host_port

    for text in ("[::1]]:80", "[broker.plant]:1883", "[127.0.0.1]:80", "[::1:80"):
        with pytest.raises(EdgekitError, match="give HOST:PORT"):
            parse_host_port(text, "--mqtt")
    assert parse_host_port("[fe80::1%eth0]:1883", "--mqtt") == ("fe80::1%eth0", 1883)
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"this machine has no IPv6 loopback: {e}")
    inp = HttpInput("[::1]:0", lambda job: True, lambda: {"station": "v6"}).start()
    try:
        assert inp.address == f"[::1]:{inp.port}" and parse_addr(inp.address) == ("::1", inp.port)
        with urllib.request.urlopen(f"http://{inp.address}/status", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read()) == {"station": "v6"}
    finally:
        inp.stop()
