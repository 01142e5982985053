"""Journey (issue 19): an artifact -> export-repo -> serve (a real tritonserver) -> bench --server -> stop -> serve again.

The user's steps through the CLI: compile, `export-repo --format triton`, `edgekit serve REPO --install` as its
own process (the bundled tritonserver is pip-installed into edgekit's cache on first use; this journey shares
the cache tests/test_serve.py installs into, $EDGEKIT_TRITON_HOME), `bench ART --server` while it runs, then
Ctrl-C's SIGTERM and a second `serve` of the same repository (a restart). Each hand-off is checked: the default
export (Triton's native openvino backend) is refused by the python-only bundled server in one line that says
what to do; the python-backend export carries the artifact's manifest; the served model gives the local
artifact's IoU; serve stops cleanly and serves the same repository again.

Skipped, with the server's own reason, only where the bundled server cannot run here (it cannot be installed,
no stub for this Python, a Python without libpython.so).
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from journey_cli import edgekit, edgekit_env

pytestmark = pytest.mark.slow
pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("tritonclient.http", reason="tritonclient not installed (pip install 'edgekit[serve]')")

# what `serve` says when the bundled server cannot run on this machine (edgekit/serve/triton.py)
CANNOT_RUN_HERE = ("could not install", "took more than", "has no python-backend stub", "is built without libpython")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Serve:
    """`edgekit serve REPO ...` as the user's own process, until stop() sends it Ctrl-C's SIGTERM."""

    def __init__(self, cwd: Path, env: dict, *args, log: str):
        self.http, self.grpc = _free_ports(2)
        self.err = open(cwd / f"{log}.stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", *map(str, args), "--http",
                                      f"127.0.0.1:{self.http}", "--grpc", f"127.0.0.1:{self.grpc}", "--threads", "1",
                                      "--log", f"{log}.log"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.err, start_new_session=True)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if _ready(self.http):
                return
            if self.proc.poll() is not None:
                err = self.stderr()
                if any(s in err for s in CANNOT_RUN_HERE):
                    pytest.skip(f"the bundled tritonserver cannot run here: {err.strip()}")
                pytest.fail(f"edgekit serve exited ({self.proc.returncode}) before it was ready:\n{err}")
            time.sleep(0.5)
        pytest.fail(f"edgekit serve not ready after {limit:.0f} s:\n{self.stderr()}")

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C's; its exit status. What it said stays in ``self.said``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its own process only, never by name
                self.proc.wait(10)
                pytest.fail("edgekit serve did not stop within 60 s of SIGTERM")
        self.said = self.stderr()
        self.err.close()
        return self.proc.returncode


def test_export_repo_serve_bench_server_then_serve_again(tmp_path, tiny_ckpt):
    from edgekit.serve.triton import triton_home

    work = tmp_path / "journey"
    work.mkdir()
    shutil.copy(tiny_ckpt, work / "model.pt")
    edgekit(work, "synth", "--out", "data", "-n", "3")
    edgekit(work, "compile", "model.pt", "--target", "openvino", "--out", "ov")
    manifest = json.loads((work / "ov" / "manifest.json").read_text())

    # the default export is Triton's native openvino backend: the bundled server says in one line what to do
    edgekit(work, "export-repo", "ov", "--format", "triton", "--out", "repo_native", "--name", "gmbinet")
    r = edgekit(work, "serve", "repo_native", expect=2)
    assert "--triton-backend python" in r.stderr

    edgekit(work, "export-repo", "ov", "--format", "triton", "--out", "repo", "--name", "gmbinet",
            "--triton-backend", "python", "--max-batch", 4, "--instances", 1)
    # hand-off 1: the repository carries the artifact, with the manifest it was compiled with
    vdir = work / "repo" / "gmbinet" / "1"
    served = json.loads((vdir / "edgekit.json").read_text())
    assert served["manifest"]["files"] == manifest["files"] and served["route"] == "python"
    assert json.loads((vdir / "artifact" / "manifest.json").read_text()) == manifest

    env = edgekit_env(work, EDGEKIT_TRITON_HOME=str(triton_home()))
    server = Serve(work, env, "repo", "--install", log="serve1")
    try:
        server.wait_ready(600)  # a first --install downloads ~150 MB; 5-10 s when it is there
        # hand-off 2: bench reads the served model's spec from the server and gives the local artifact's figures
        r = edgekit(work, "bench", "ov", "--server", f"127.0.0.1:{server.http}", "--model", "gmbinet",
                    "--data", "data", "--eval-limit", 3, "--rounds", 1, "--iters", 2, "--batch", 1,
                    "--concurrency", 2, "--json", env=env)
        rows = json.loads(r.stdout)["rows"]
        local, remote = [row for row in rows if row["backend"] == "openvino"], \
            [row for row in rows if row["backend"] == "server-http"]
        assert len(local) == 1 and len(remote) == 1, [row["name"] for row in rows]
        assert remote[0]["iou"] == pytest.approx(local[0]["iou"], abs=1e-6)
        assert remote[0]["latency_ms"]["p50"] > 0 and remote[0]["throughput_fps"] > 0
    finally:
        rc = server.stop()
    assert rc == 0, server.said
    assert not _ready(server.http)

    # hand-off 3: the same repository serves again (a restart)
    again = Serve(work, env, "repo", log="serve2")
    try:
        again.wait_ready(300)
    finally:
        rc = again.stop()
    assert rc == 0, again.said
