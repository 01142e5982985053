"""The station's inputs: a watched folder and an HTTP endpoint. Each turns an image into a :class:`Job`
and hands it to ``submit(job) -> bool`` (False: the queue is full).

Watch folder (:class:`WatchInput`)
    An image counts once it is complete. Line software should write it under a temporary name (a hidden
    ``.name``, ``*.tmp`` or ``*.part``: ignored) and rename it into place: the rename is atomic, and the
    station sees a finished file. A file written in place also works: it counts when the last writer closes
    it (inotify IN_CLOSE_WRITE), not while chunks are still arriving. Files already in the folder at start,
    and any whose event was missed, are picked up by a rescan every few seconds unless the result store has
    already committed them (their key ``watch:<relative path>:<size>:<mtime_ns>``): a restarted station does
    not run an image twice, and a file rewritten with new content is a new image.

    The one gap: a writer that already had a file open when the station started, and then pauses for longer
    than ``rescan_settle_s`` (1 s) mid-file, may have the part written so far taken by a rescan (its open was
    never seen). The rename way has no such gap.

HTTP (:class:`HttpInput`)
    ``POST /infer?name=NAME`` with the encoded image as the body answers the committed Result as JSON (200);
    a body that is not an image gets 400, a full queue 503 (retry later), no result in time 504; each error
    is one line of JSON ``{"error": "..."}``. ``GET /status`` answers the station's status JSON.
    A body over the limit gets its 413 before any of it is read: instead of ``100 Continue`` when the client
    sent ``Expect: 100-continue``, and otherwise followed by reading and dropping the body (up to
    ``discard_bytes``, for at most ``discard_timeout_s``) so that a client that sends it all before reading
    (urllib, http.client) reads the 413 rather than a broken pipe.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import parse_qs, urlsplit

from edgekit.errors import EdgekitError, first_line
from edgekit.progress import write_stderr
from edgekit.station.jobs import Job
from edgekit.utils import parse_host_port

WATCH_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TEMP_SUFFIXES = (".tmp", ".part", "~")


def is_temp_name(rel: str) -> bool:
    """Hidden (any path part starting with a dot) or a temporary name a writer renames later."""
    parts = rel.replace(os.sep, "/").split("/")
    return any(p.startswith(".") for p in parts) or parts[-1].lower().endswith(TEMP_SUFFIXES)


class WatchInput:
    """Submits the complete images that appear in ``folder`` (see the module docstring).

    ``store_seen(keys) -> set`` answers which keys the store has committed; it is called from one thread
    only (this input's scanner). ``settle_s``: how long a path stays quiet after its last event before it is
    taken (a copy that sets the file's times after closing it, like Python's ``shutil.copy2``, is one
    image, not two). ``rescan_s``: the period of the full rescan (a safety net: the events find new files at
    once); a rescan stats every image in the folder, so a line that keeps hundreds of thousands of files there
    should archive them elsewhere or give a longer period. A rescan takes only files whose mtime is at least
    ``rescan_settle_s`` old (mtime and ctime) and that nobody has open, as far as the events tell.
    """

    def __init__(self, folder, submit: Callable[[Job], bool], store_seen: Callable[[Iterable[str]], set],
                 recursive: bool = False, exts=WATCH_EXTS, rescan_s: float = 5.0, settle_s: float = 0.05,
                 rescan_settle_s: float = 1.0, retry_s: float = 0.1):
        self.folder = Path(folder).resolve()
        self.submit, self.store_seen = submit, store_seen
        self.recursive = recursive
        self.exts = tuple(e.lower() for e in exts)
        self.rescan_s, self.settle_s, self.rescan_settle_s, self.retry_s = rescan_s, settle_s, rescan_settle_s, retry_s
        self._cond = threading.Condition()
        self._events: collections.deque = collections.deque()  # (kind, path, time): from the observer thread
        self._stopping = False
        # the scanner thread's own state (no lock: only it touches these)
        self._opens: dict[str, int] = {}        # path -> writers/readers open, as far as events tell
        self._due: dict[str, tuple[float, float]] = {}  # path -> (check at, last event): quiet-period timers
        self._inflight: dict[str, str] = {}     # key -> path: submitted, not yet seen committed
        self._waiting: collections.OrderedDict = collections.OrderedDict()  # key -> (path, received): submit said full
        self._done: set[str] = set()            # keys the store has committed (pruned to files still present)
        self._observer = None
        self._thread: Optional[threading.Thread] = None
        self.submitted = 0
        self.retries = 0

    # -- the observer side: only queue what happened; all decisions are the scanner's

    def _relevant(self, path: str) -> bool:
        try:
            rel = os.path.relpath(path, self.folder)
        except ValueError:
            return False
        if rel.startswith("..") or is_temp_name(rel):
            return False
        if not self.recursive and os.sep in rel:
            return False
        return rel.lower().endswith(self.exts)

    def _on_event(self, event) -> None:
        from watchdog.events import (FileClosedEvent, FileClosedNoWriteEvent, FileCreatedEvent, FileDeletedEvent,
                                     FileModifiedEvent, FileMovedEvent, FileOpenedEvent)

        import watchdog.events

        now = time.time()
        lost = getattr(watchdog.events, "EventsLostEvent", None)
        if lost is not None and isinstance(event, lost):  # the kernel's queue overflowed: look at everything
            self._queue("lost", "", now)
            return
        if event.is_directory:
            if self.recursive and event.event_type in ("created", "moved"):  # a folder moved in: its files need a look
                self._queue("rescan", "", now)
            return
        src = os.fsdecode(event.src_path)
        if isinstance(event, FileMovedEvent):
            self._queue("gone", src, now)
            self._queue("renamed", os.fsdecode(event.dest_path), now)
        elif isinstance(event, FileOpenedEvent):
            self._queue("open", src, now)
        elif isinstance(event, (FileClosedEvent, FileClosedNoWriteEvent)):
            self._queue("close" if isinstance(event, FileClosedEvent) else "close-read", src, now)
        elif isinstance(event, FileCreatedEvent):
            self._queue("changed", src, now)
        elif isinstance(event, FileModifiedEvent):
            self._queue("modified", src, now)
        elif isinstance(event, FileDeletedEvent):
            self._queue("gone", src, now)

    def _queue(self, kind: str, path: str, now: float) -> None:
        if kind not in ("rescan", "lost") and not self._relevant(path):
            return
        with self._cond:
            self._events.append((kind, path, now))
            self._cond.notify()

    # -- lifecycle

    def start(self) -> "WatchInput":
        try:
            import watchdog.events
            from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileClosedNoWriteEvent,
                                         FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent,
                                         FileOpenedEvent, FileSystemEventHandler)
            from watchdog.observers import Observer
        except ImportError:
            from edgekit.errors import MissingBackendError
            raise MissingBackendError("--watch", "watchdog") from None
        if not self.folder.is_dir():
            raise EdgekitError(f"watch folder not found: {self.folder}")

        outer = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                outer._on_event(event)

        # IN_OPEN and IN_CLOSE_NOWRITE count who has a file open: a file still open for writing is not taken,
        # whatever its size says; the others are the changes, a lost-events notice (watchdog >= 7) and, when
        # recursive, folders that appear
        wanted = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
                  FileClosedNoWriteEvent, FileOpenedEvent]
        if getattr(watchdog.events, "EventsLostEvent", None) is not None:
            wanted.append(watchdog.events.EventsLostEvent)
        if self.recursive:
            wanted += [DirCreatedEvent, DirMovedEvent]
        observer = Observer()
        try:
            observer.schedule(Handler(), str(self.folder), recursive=self.recursive, event_filter=wanted)
            observer.start()
        except OSError as e:
            raise EdgekitError(f"cannot watch {self.folder}: {e.strerror or e}") from None
        self._observer = observer
        # the observer runs before the first scan, so a file that lands during the scan is not missed
        self._thread = threading.Thread(target=self._run, name="edgekit-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the scanner thread

    def _run(self) -> None:
        next_rescan = 0.0  # the first pass is the startup scan
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                waits = [next_rescan - now]
                if self._due:
                    waits.append(min(t for t, _ in self._due.values()) - time.time())
                if self._waiting:
                    waits.append(self.retry_s)
                timeout = max(0.0, min(waits))
                if not self._events and timeout > 0:
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                events = list(self._events)
                self._events.clear()
            try:
                rescan = self._apply(events)
                if self._waiting:
                    self._retry()
                if self._due:
                    self._check_due()
                if rescan or time.monotonic() >= next_rescan:
                    self._rescan()
                    next_rescan = time.monotonic() + self.rescan_s
            except Exception as e:  # noqa: BLE001 - the watcher must outlive a bad moment (a busy DB, a stat race)
                write_stderr(f"warning: watch {self.folder}: {e.__class__.__name__}: {first_line(e)} (retrying)")
                time.sleep(self.retry_s)

    def _apply(self, events) -> bool:
        rescan = False
        for kind, path, when in events:
            if kind == "rescan":
                rescan = True
            elif kind == "lost":
                # opens and closes were lost too: the counts cannot be trusted, so a file counts again by its
                # age alone (the rescan's rule) rather than waiting for a close that may never come
                self._opens.clear()
                rescan = True
            elif kind == "open":
                self._opens[path] = self._opens.get(path, 0) + 1
            elif kind in ("close", "close-read"):
                n = self._opens.pop(path, 0) - 1
                if n > 0:
                    self._opens[path] = n
                if kind == "close":
                    self._touch(path, when)
            elif kind == "changed":
                self._touch(path, when)
            elif kind == "renamed":
                # a rename is atomic: the file is complete now, no quiet period to wait (the way the README
                # tells line software to write, so the fast path)
                self._touch(path, when, 0.0)
            elif kind == "modified" and path in self._due:
                # a write or a time set right after a close (shutil.copy2): the quiet period starts again. A
                # write with no close, creation or rename before it is a writer whose open this watch did not
                # see (it started first): its close will come as an event, so it waits for that
                self._touch(path, when)
            elif kind == "gone":
                self._opens.pop(path, None)
                self._due.pop(path, None)
        return rescan

    def _touch(self, path: str, when: float, settle_s: Optional[float] = None) -> None:
        # received = the last event's time: when the file was last seen complete (or changing), not the scan
        self._due[path] = (time.time() + (self.settle_s if settle_s is None else settle_s), when)

    def _check_due(self) -> None:
        now = time.time()
        ready = [(p, when) for p, (t, when) in self._due.items() if t <= now]
        found = []
        for path, when in ready:
            del self._due[path]
            if self._opens.get(path, 0) > 0:
                continue  # still open: its close comes as an event and starts the timer again
            key = self._key(path)
            if key is not None:
                found.append((key, path, when))
        self._offer(found)

    def _key(self, path: str) -> Optional[str]:
        try:
            st = os.stat(path)
        except OSError:
            return None  # gone again (moved on, deleted)
        if st.st_size == 0 or not os.path.isfile(path):
            return None  # an empty file is a writer that has not written yet: its close brings it back
        rel = Path(os.path.relpath(path, self.folder)).as_posix()
        return f"watch:{rel}:{st.st_size}:{st.st_mtime_ns}"

    def _offer(self, found: list) -> None:
        """Submit the new keys among ``found`` ((key, path, received) in arrival order) that are neither in
        flight, waiting nor committed; the rest of a refused batch waits for the retry, in order."""
        fresh = [(k, p, t) for k, p, t in found if k not in self._inflight and k not in self._waiting
                 and k not in self._done]
        if not fresh:
            return
        seen = self._seen([k for k, _, _ in fresh])
        if seen:
            self._done.update(seen)
        for key, path, received in fresh:
            if key in seen or key in self._inflight or key in self._waiting:
                continue
            if self._waiting or not self._submit(key, path, received):
                self._waiting[key] = (path, received)  # behind the ones already waiting: arrival order holds

    def _seen(self, keys: list) -> set:
        # in slices: one SQL statement has a bounded number of parameters
        out: set = set()
        for i in range(0, len(keys), 500):
            out |= set(self.store_seen(keys[i:i + 500]))
        return out

    def _submit(self, key: str, path: str, received: float) -> bool:
        rel = Path(os.path.relpath(path, self.folder)).as_posix()
        if not self.submit(Job(key=key, source="watch", name=rel, path=Path(path), received=received)):
            return False
        self._inflight[key] = path
        self.submitted += 1
        return True

    def _retry(self) -> None:
        while self._waiting:
            key, (path, received) = next(iter(self._waiting.items()))
            current = self._key(path)
            if current != key:  # changed or gone while it waited: the file as it is now is what counts
                del self._waiting[key]
                if current is not None:
                    self._touch(path, received)
                continue
            self.retries += 1
            if not self._submit(key, path, received):
                return
            del self._waiting[key]

    def _rescan(self) -> None:
        """Everything in the folder that is complete and not yet known; then forget what is committed."""
        now = time.time()
        present: dict[str, str] = {}
        found = []
        for path in self._listing():
            if self._opens.get(path, 0) > 0 or path in self._due:
                continue  # open for writing, or its quiet period is running: the events decide
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size == 0 or now - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < self.rescan_settle_s:
                # changed lately (ctime: any write or time set): may still be written by something whose open
                # event is still on its way, or was never seen
                continue
            rel = Path(os.path.relpath(path, self.folder)).as_posix()
            key = f"watch:{rel}:{st.st_size}:{st.st_mtime_ns}"
            present[key] = path
            found.append((key, path, now))
        if self._inflight:
            committed = self._seen(list(self._inflight))
            for key in committed:
                self._inflight.pop(key, None)
            self._done.update(committed)
        self._done &= set(present)  # keys of files no longer there (or changed) need no memory
        self._offer(found)

    def _listing(self) -> list[str]:
        out = []
        if self.recursive:
            for root, dirs, files in os.walk(self.folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [os.path.join(root, f) for f in sorted(files)]
        else:
            try:
                with os.scandir(self.folder) as it:
                    out = sorted(e.path for e in it if e.is_file())
            except FileNotFoundError:
                return []
        return [p for p in out if self._relevant(p)]

    def status(self) -> dict:
        return {"folder": str(self.folder), "submitted": self.submitted, "in_flight": len(self._inflight),
                "waiting": len(self._waiting)}


# -- HTTP

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_upload_name(raw: Optional[str]) -> str:
    """An upload's ``?name=`` as a plain file name (it may end up as a file in the review folder): the last
    path part, characters outside ``A-Za-z0-9._-`` replaced, at most 100 characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _SAFE_NAME.sub("_", name).lstrip(".")[:100]
    return name or "upload"


def parse_addr(addr: str, what: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port) through the shared parser; port 0 (the system picks a free one) is for
    library callers: the command refuses it before it gets here."""
    return parse_host_port(addr, what, allow_port_zero=True)


class HttpInput:
    """``POST /infer`` and ``GET /status`` on ``addr`` (``127.0.0.1:PORT``; port 0 picks a free one, see
    :attr:`address`). ``timeout_s``: how long a request waits for its committed result (then 504);
    ``max_bytes``: the largest body taken (then 413); ``read_timeout_s``: how long a connection may send nothing
    (a body cut short is then 408 and the connection closes, so a stalled client cannot hold a thread forever);
    ``discard_bytes``, ``discard_timeout_s``: how much of a refused body is read and dropped after the refusal,
    and for how long at most, before the connection closes (see the module's docstring)."""

    def __init__(self, addr: str, submit: Callable[[Job], bool], status: Callable[[], dict],
                 timeout_s: float = 30.0, max_bytes: int = 64 << 20, read_timeout_s: float = 30.0,
                 discard_bytes: int = 256 << 20, discard_timeout_s: float = 10.0):
        self.host, self.port = parse_addr(addr)
        self.submit, self.status = submit, status
        self.timeout_s, self.max_bytes, self.read_timeout_s = timeout_s, max_bytes, read_timeout_s
        self.discard_bytes, self.discard_timeout_s = discard_bytes, discard_timeout_s
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> "HttpInput":
        handler = type("StationHandler", (_Handler,), {"station_input": self, "timeout": self.read_timeout_s})
        # an IPv6 address ('[::1]:8080', which the address parser takes) needs an AF_INET6 socket: the server's
        # default AF_INET refused it ("Address family for hostname not supported")
        server_class = _Server6 if ":" in self.host else _Server
        try:
            server = server_class((self.host, self.port), handler)
        except OSError as e:
            raise EdgekitError(f"cannot listen on {self.address}: {e.strerror or e}") from None
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgekit-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # socketserver prints a whole traceback here; a client that hangs up or stalls (reset, broken pipe, timeout)
        # is no news for the station's stderr, and anything else is one line
        import sys

        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            return
        write_stderr(f"http: a request from {client_address[0]} failed: {e.__class__.__name__}: {first_line(e)}")


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    station_input: HttpInput  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "edgekit-station"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one stderr line per request would drown the station's own notes

    def _send(self, code: int, doc: dict, close: bool = False, headers: Optional[dict] = None) -> None:
        # default=str: a value JSON cannot encode (a numpy scalar in a status) goes as text, not as a dropped reply
        body = (json.dumps(doc, default=str) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, close: bool = False, headers: Optional[dict] = None) -> None:
        self._send(code, {"error": first_line(message)}, close=close, headers=headers)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/status":
            try:
                doc = self.station_input.status()
            except Exception as e:  # noqa: BLE001 - a status that cannot be read is the reply, not a crash
                return self._error(500, f"status unavailable: {e.__class__.__name__}: {first_line(e)}")
            return self._send(200, doc)
        if path == "/infer":
            return self._error(405, "POST the image bytes to /infer", headers={"Allow": "POST"})
        return self._error(404, f"not found: {path} (POST /infer, GET /status)")

    def _refusal(self) -> Optional[tuple]:
        """(code, message) for a POST refused on its request line and headers alone, before its body is read;
        None when the body is to be read."""
        inp = self.station_input
        path = urlsplit(self.path).path
        length = self.headers.get("Content-Length")
        length = None if length is None else length.strip()  # optional whitespace around a field value
        if path != "/infer":
            return ((405, "use GET /status") if path == "/status"
                    else (404, f"not found: {path} (POST /infer, GET /status)"))
        # the body's framing must be one byte count: a Transfer-Encoding (chunked) beside or instead of it, or two
        # Content-Length values, would be read here one way and by a proxy in front another (the rest of the body
        # taken as the next request on this connection: request smuggling, RFC 9112 6.1 and 6.3)
        if self.headers.get_all("Transfer-Encoding"):
            return 411, "POST /infer takes a body with a Content-Length, not a Transfer-Encoding (chunked)"
        lengths = self.headers.get_all("Content-Length") or []
        if len({v.strip() for v in lengths}) > 1:
            return 400, f"{len(lengths)} different Content-Length headers ({', '.join(lengths)[:80]})"
        if length is None:
            return 411, "POST /infer needs a Content-Length (the image bytes as the body)"
        if not length.isascii() or not length.isdigit():
            return 400, f"Content-Length {length[:40]!r} is not a byte count"
        if int(length) > inp.max_bytes:
            return 413, f"body of {int(length)} bytes is over the limit of {inp.max_bytes}"
        return None

    def _refuse(self, code: int, message: str) -> None:
        """The refusal, then the body dropped unread (see ``_discard_body``); the connection closes after."""
        self._error(code, message, close=True)
        self._discard_body()

    def _discard_body(self) -> None:
        """Read and drop the announced body, up to ``discard_bytes`` and for at most ``discard_timeout_s``. Closing
        a socket with unread bytes makes the kernel answer with a reset, and a client still sending (urllib and
        http.client read the reply only once the whole body is out) then gets a broken pipe instead of the reply
        already sent. Our side is shut for writing first, so a client that reads meanwhile sees the reply end."""
        inp = self.station_input
        length = self.headers.get("Content-Length", "").strip()
        framed = len(set(self.headers.get_all("Content-Length") or [])) == 1 and not self.headers.get_all("Transfer-Encoding")
        left = min(int(length), inp.discard_bytes) if framed and length.isascii() and length.isdigit() else 0
        deadline = time.monotonic() + inp.discard_timeout_s
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:  # the client closed: nothing more to drop
                    break
                left -= len(chunk)
        except OSError:  # gone, reset or stalled past the deadline (TimeoutError): close now
            pass

    def handle_expect_100(self):
        # ``Expect: 100-continue`` (curl sends it for large bodies): a body we would refuse is refused now, before
        # the client sends a byte of it, instead of "100 Continue" followed by a 413
        if self.command == "POST":
            refusal = self._refusal()
            if refusal is not None:
                self._refuse(*refusal)
                return False
        return super().handle_expect_100()

    def do_POST(self):
        from edgekit.data.images import decode_gray

        inp = self.station_input
        url = urlsplit(self.path)
        refusal = self._refusal()
        if refusal is not None:
            return self._refuse(*refusal)
        n = int(self.headers["Content-Length"])
        try:
            data = self.rfile.read(n)
        except TimeoutError:
            return self._error(408, f"body not received within {inp.read_timeout_s:g} s", close=True)
        if len(data) != n:
            return self._error(400, f"body cut short: {len(data)} of {n} bytes", close=True)
        name = safe_upload_name(parse_qs(url.query).get("name", [None])[0])
        try:
            decode_gray(data, f"posted as {name!r}")
        except EdgekitError as e:
            return self._error(400, str(e))
        job = Job(key=f"http:{uuid.uuid4()}", source="http", name=name, data=data,
                  reply=concurrent.futures.Future())
        if not inp.submit(job):
            return self._error(503, "the station's queue is full; retry later", headers={"Retry-After": "1"})
        try:
            result = job.reply.result(timeout=inp.timeout_s)
        except concurrent.futures.TimeoutError:
            return self._error(504, f"no result within {inp.timeout_s:g} s (the job {job.key} is still queued)")
        except Exception as e:  # noqa: BLE001 - the worker's failure, told in one line
            return self._error(500, f"{e.__class__.__name__}: {first_line(e)}")
        return self._send(200, result)
