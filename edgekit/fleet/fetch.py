"""Downloads with a total deadline: TUF's slow-retrieval defence for ``edgekit update``.

A per-read socket timeout (``--timeout``) stops a server that goes silent, not one that sends a byte every
second: each read then succeeds. The TUF specification lists this *slow retrieval attack* (an attacker responds
with a very slow stream of data so the client never finishes), and python-tuf's SECURITY notes say its own
client only has the per-read timeout (theupdateframework/python-tuf PR #928). So this fetcher, a python-tuf
``FetcherInterface``, gives every file a deadline (``file_deadline``) inside one deadline for the whole run
(``run_deadline``, a ``time.monotonic()`` instant): when it passes, a watchdog timer shuts the download's sockets
down, which ends a blocked read at once (in the headers as well as in the body), and the fetch raises
``SlowRetrievalError``. urllib3 does the HTTP, as in python-tuf's own ``Urllib3Fetcher``; proxies come from the
usual environment variables.
"""
from __future__ import annotations

import socket
import threading
import time
import urllib.request
import weakref
from typing import Iterator, Optional
from urllib.parse import urlsplit

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

CHUNK = 64 * 1024


class DeadlineFetcher(FetcherInterface):
    """``socket_timeout``: seconds without a byte (per read); ``file_deadline``: seconds for one file, headers and
    body; ``run_deadline``: the ``time.monotonic()`` instant after which no fetch may run or continue."""

    def __init__(self, socket_timeout: float, file_deadline: float, run_deadline: float,
                 user_agent: str = "edgekit-update"):
        self.socket_timeout = float(socket_timeout)
        self.file_deadline = float(file_deadline)
        self.run_deadline = float(run_deadline)
        self._sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self._headers = {"User-Agent": user_agent}
        self._managers: dict = {}
        self._expired: Optional[threading.Event] = None  # the fetch in progress's

    def _track(self, sock: socket.socket) -> None:
        self._sockets.add(sock)
        if self._expired is not None and self._expired.is_set():  # a retry's new connection after the deadline
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a blocked recv() returns at once
        except OSError:
            pass

    # --- connections whose sockets the watchdog can reach --------------------------------------------------------

    def _manager(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = None
        if not urllib.request.proxy_bypass(parts.hostname or ""):
            proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy not in self._managers:
            track = self._track

            class Conn(urllib3.connection.HTTPConnection):
                def connect(self):
                    super().connect()
                    track(self.sock)

            class TLSConn(urllib3.connection.HTTPSConnection):
                def connect(self):
                    super().connect()
                    track(self.sock)

            class Pool(urllib3.HTTPConnectionPool):
                ConnectionCls = Conn

            class TLSPool(urllib3.HTTPSConnectionPool):
                ConnectionCls = TLSConn

            manager = (urllib3.ProxyManager(proxy, headers=self._headers) if proxy
                       else urllib3.PoolManager(headers=self._headers))
            manager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}
            self._managers[proxy] = manager
        return self._managers[proxy]

    def _cut(self, expired: threading.Event) -> None:
        expired.set()
        for sock in list(self._sockets):
            self._shut(sock)

    # --- FetcherInterface ----------------------------------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        started = time.monotonic()
        budget = min(self.file_deadline, self.run_deadline - started)
        if budget <= 0:
            raise exceptions.SlowRetrievalError(f"the update's deadline passed before {url} was fetched")
        what = (f"the update's deadline" if budget < self.file_deadline
                else f"the deadline of {self.file_deadline:g} s per file")
        expired = self._expired = threading.Event()
        watchdog = threading.Timer(budget, self._cut, (expired,))
        watchdog.daemon = True
        watchdog.start()
        per_read = max(0.001, min(self.socket_timeout, budget))
        try:
            response = self._manager(url).request("GET", url, preload_content=False,
                                                  timeout=urllib3.Timeout(connect=per_read, read=per_read),
                                                  retries=urllib3.Retry(total=2, read=0, redirect=0,
                                                                        raise_on_status=False))
        except Exception as e:
            watchdog.cancel()
            if expired.is_set():
                raise exceptions.SlowRetrievalError(f"{url}: {what} passed ({budget:.3g} s)") from e
            if isinstance(e, urllib3.exceptions.MaxRetryError) and isinstance(e.reason,
                                                                              urllib3.exceptions.TimeoutError):
                raise exceptions.SlowRetrievalError(f"{url}: no data for {per_read:g} s") from e
            raise
        if response.status >= 400:
            watchdog.cancel()
            response.release_conn()
            raise exceptions.DownloadHTTPError(f"HTTP error occurred with status {response.status}", response.status)
        return self._chunks(url, response, watchdog, expired, what, budget)

    def _chunks(self, url, response, watchdog, expired, what, budget) -> Iterator[bytes]:
        try:
            while True:
                if expired.is_set():
                    raise exceptions.SlowRetrievalError(f"{url}: {what} passed ({budget:.3g} s)")
                try:
                    data = response.read(CHUNK)
                except Exception as e:
                    if expired.is_set():
                        raise exceptions.SlowRetrievalError(f"{url}: {what} passed ({budget:.3g} s)") from e
                    if isinstance(e, urllib3.exceptions.TimeoutError):
                        raise exceptions.SlowRetrievalError(f"{url}: no data for {self.socket_timeout:g} s") from e
                    raise
                if expired.is_set():  # a read cut short by the watchdog ends as if the file were complete
                    raise exceptions.SlowRetrievalError(f"{url}: {what} passed ({budget:.3g} s)")
                if not data:
                    return
                yield data
        finally:
            watchdog.cancel()
            response.release_conn()
