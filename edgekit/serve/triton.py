"""The ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, run on an edgekit model repository.

The wheel (0.7.x: Triton 2.51, python backend only) is installed with ``--no-deps --target`` into its own
folder (``triton_home()``), never into edgekit's environment: pytriton pins ``numpy<2``, and only its
server binary, its libraries and its python-backend stubs are used, not its Python package. Beside it,
``stub-site/`` holds ``numpy<2`` for the stub: the stub's pybind11 reads numpy arrays with the numpy 1
ABI (with numpy 2 it silently reads wrong values: input [1, 2, 3] arrived as [1, 1, 1] here).

Two traps this module handles for the user:

* the stub links ``libpython3.X.so``; the loader would take the system's, which breaks under another
  interpreter (``'_thread.RLock' object has no attribute '_recursion_count'``): ``LD_LIBRARY_PATH``
  starts with the running interpreter's ``LIBDIR``;
* the stub ignores ``PYTHONPATH``: the generated ``model.py`` reads ``EDGEKIT_SERVE_PYTHONPATH`` instead.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from edgekit.errors import EdgekitError, first_line
from edgekit.utils import parse_host_port

PYTRITON = "nvidia-pytriton==0.7.0"
STUB_NUMPY = "numpy<2"
READY_FILE = "edgekit-triton.json"


def cache_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def triton_home() -> Path:
    """Where the server lives: ``$EDGEKIT_TRITON_HOME``, else a folder in edgekit's cache per wheel and Python."""
    env = os.environ.get("EDGEKIT_TRITON_HOME")
    if env:
        return Path(env)
    tag = PYTRITON.replace("==", "-") + f"-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / "serve" / tag


@dataclass
class TritonDist:
    home: Path

    @property
    def root(self) -> Path:
        return self.home / "server" / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.home / "server" / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        v = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return self.root / "python_backend_stubs" / v / "triton_python_backend_stub"

    @property
    def stub_site(self) -> Path:
        return self.home / "stub-site"


def install_triton(home: Optional[Path] = None, timeout: float = 900, log=lambda m: None) -> TritonDist:
    """pip-install the wheel (no dependencies) and numpy<2 for the stub into ``home``, atomically.

    Returns the distribution; records how long the install took in ``home/edgekit-triton.json``.
    """
    home = Path(home or triton_home())
    if (home / READY_FILE).is_file():
        return find_triton(home)
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}.", dir=home.parent))
    t0 = time.monotonic()
    try:
        for target, req in (("server", PYTRITON), ("stub-site", STUB_NUMPY)):
            log(f"installing {req} into {home / target}")
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                   str(tmp / target), req]
            left = timeout - (time.monotonic() - t0)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, left))
            except subprocess.TimeoutExpired:
                raise EdgekitError(f"installing {req} took more than {timeout:.0f} s: gave up") from None
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise EdgekitError(f"could not install {req} for the bundled tritonserver: {last}")
        (tmp / READY_FILE).write_text(json.dumps({"wheel": PYTRITON, "stub_numpy": STUB_NUMPY,
                                                  "install_s": round(time.monotonic() - t0, 1),
                                                  "python": sys.version.split()[0]}) + "\n")
        try:
            os.replace(tmp, home)
        except OSError:  # another process installed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return find_triton(home)


def find_triton(home: Optional[Path] = None) -> TritonDist:
    dist = TritonDist(Path(home or triton_home()))
    if not (dist.home / READY_FILE).is_file() or not dist.binary.is_file():
        raise EdgekitError(f"no bundled tritonserver at {dist.home}: run edgekit serve --install once "
                           f"(pip-installs {PYTRITON} there, without touching this environment)")
    if not dist.stub.is_file():
        raise EdgekitError(f"{PYTRITON} has no python-backend stub for Python "
                           f"{sys.version_info[0]}.{sys.version_info[1]} (it ships 3.8-3.13)")
    return dist


def _site_dirs() -> List[str]:
    """The folders this interpreter's site processing puts on ``sys.path``: each site-packages folder (and the
    user's, when enabled) followed by the folders its ``.pth`` files name, as ``site.addsitedir`` does. The stub
    runs no site processing of this environment, so without the ``.pth`` folders a package installed behind one
    (a venv reaching another environment's packages, an editable install) was missing in the server: openvino
    there gave "needs the optional package 'openvino'" although ``edgekit compile`` had just used it."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    out: List[str] = []
    for d in dirs:
        if not Path(d).is_dir():
            continue
        out.append(d)
        for pth in sorted(Path(d).glob("*.pth")):  # addsitedir's order
            try:
                lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.rstrip()
                if not line or line.startswith("#") or line.startswith(("import ", "import\t")):
                    continue  # comments, and the import lines site runs (not paths)
                folder = Path(d, line)
                if folder.is_dir():
                    out.append(str(folder.resolve()))
    return list(dict.fromkeys(out))


def stub_python_path() -> List[str]:
    """What the python-backend model needs on ``sys.path``: numpy<2 first, then edgekit and its packages."""
    import edgekit

    paths = [str(Path(edgekit.__file__).resolve().parents[1])]
    paths += [p for p in _site_dirs() if p not in paths]
    return paths


def server_env(dist: TritonDist) -> dict:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise EdgekitError(f"{sys.executable} is built without libpython{sys.version_info[0]}.{sys.version_info[1]}.so, "
                           "which Triton's python-backend stub links: use a Python built with --enable-shared")
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(dist.libs), env.get("LD_LIBRARY_PATH")) if p)
    env["EDGEKIT_SERVE_PYTHONPATH"] = os.pathsep.join([str(dist.stub_site), *stub_python_path()])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # no __pycache__ beside model.py: the repository check refuses any file it did not export
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def parse_address(addr: str, what: str) -> Tuple[str, int]:
    return parse_host_port(addr, what, example="127.0.0.1:8000")


def _drop_bytecode_cache(vdir: Path) -> None:
    """Remove ``__pycache__`` from a python-backend version folder before it is checked. The stub's interpreter
    ignores ``PYTHONDONTWRITEBYTECODE`` (as it ignores ``PYTHONPATH``) and caches ``model.py``'s bytecode there
    as it loads it, so every repository that was served once was refused the next time ("__pycache__ is not
    part of the exported model"). Bytecode that is removed cannot run in place of ``model.py``, so this keeps
    the check's guarantee; a symlink named ``__pycache__`` is left for the check to refuse."""
    cache = vdir / "__pycache__"
    if cache.is_dir() and not cache.is_symlink():
        shutil.rmtree(cache)


def check_repository(repo: Path, trusted_keys=None) -> List[str]:
    """Model names of a Triton repository the bundled server can run (python backend only), or one error line.

    Every version folder of every model is checked file by file first (``verify_python_model``: model.py,
    the artifact's signature with ``trusted_keys`` or ``EDGEKIT_TRUSTED_KEYS``, every hash, nothing extra)."""
    from edgekit.serve.repository import parse_triton_config, verify_python_model

    if not repo.is_dir():
        raise EdgekitError(f"{repo}: no such model repository")
    names = []
    for cfg in sorted(repo.glob("*/config.pbtxt")):
        try:
            c = parse_triton_config(cfg)
        except Exception as e:
            raise EdgekitError(f"{cfg}: not a valid Triton model config ({str(e).splitlines()[0]})") from None
        if c.backend != "python":
            route = c.platform or c.backend
            raise EdgekitError(f"{cfg.parent.name}: {route} models need Triton's {route} backend, which the bundled "
                               "tritonserver lacks (python backend only): re-export with --triton-backend python, "
                               "or serve the repository with NVIDIA's Triton container")
        versions = [v for v in sorted(cfg.parent.iterdir()) if v.is_dir() and v.name.isdigit()]
        if not versions:
            raise EdgekitError(f"{cfg.parent.name}: no version folder to serve")
        for vdir in versions:
            _drop_bytecode_cache(vdir)
            verify_python_model(vdir, trusted_keys)
        names.append(c.name or cfg.parent.name)
    if not names:
        raise EdgekitError(f"{repo}: no models (no */config.pbtxt): write one with edgekit export-repo --format triton")
    return names


class TritonServer:
    """A ``tritonserver`` process on a repository; ``start()`` returns once every model is ready."""

    def __init__(self, repo, http: str = "127.0.0.1:8000", grpc: Optional[str] = "127.0.0.1:8001",
                 dist: Optional[TritonDist] = None, log_file: Optional[Path] = None, threads: Optional[int] = None,
                 poll_secs: Optional[int] = None, trusted_keys: Optional[Sequence] = None):
        self.repo = Path(repo).resolve()
        self.models = check_repository(self.repo, trusted_keys)
        # the model.py in the server verifies again as it loads (runtime.load): the same keys, by file
        self.trusted_key_files = [str(Path(k).resolve()) for k in trusted_keys] if trusted_keys else None
        self.http = parse_address(http, "--http")
        self.grpc = parse_address(grpc, "--grpc") if grpc else None
        self.dist = dist or find_triton()
        self.threads = threads
        self.poll_secs = poll_secs
        self.workdir = Path(tempfile.mkdtemp(prefix="edgekit-triton-"))
        self.log_file = Path(log_file) if log_file else self.workdir / "tritonserver.log"
        self.proc: Optional[subprocess.Popen] = None

    def _backends(self) -> Path:
        """A backend folder holding the python backend and the stub for this interpreter (as pytriton does)."""
        dst = self.workdir / "backends" / "python"
        dst.mkdir(parents=True)
        src = self.dist.root / "backends" / "python"
        for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(src / f, dst / f)
        shutil.copy2(self.dist.stub, dst / "triton_python_backend_stub")
        return dst.parent

    def command(self) -> List[str]:
        cmd = [str(self.dist.binary), "--model-repository", str(self.repo), "--backend-directory",
               str(self._backends()), "--cache-directory", str(self.dist.root / "caches"),
               "--http-address", self.http[0], "--http-port", str(self.http[1]), "--allow-metrics", "false",
               "--strict-readiness", "true", "--exit-on-error", "true", "--log-verbose", "0"]
        if self.poll_secs:  # a new version folder (export-repo --add) is loaded without a restart
            cmd += ["--model-control-mode", "poll", "--repository-poll-secs", str(self.poll_secs)]
        if self.grpc:
            cmd += ["--grpc-address", self.grpc[0], "--grpc-port", str(self.grpc[1])]
        else:
            cmd += ["--allow-grpc", "false"]
        return cmd

    @property
    def http_url(self) -> str:
        return f"{self.http[0]}:{self.http[1]}"

    @property
    def grpc_url(self) -> Optional[str]:
        return f"{self.grpc[0]}:{self.grpc[1]}" if self.grpc else None

    def start(self, timeout: float = 180) -> "TritonServer":
        env = server_env(self.dist)
        if self.threads:
            env["EDGEKIT_SERVE_THREADS"] = str(self.threads)
        if self.trusted_key_files:
            from edgekit.artifact import TRUSTED_KEYS_ENV

            env[TRUSTED_KEYS_ENV] = os.pathsep.join(self.trusted_key_files)
        self._log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise EdgekitError(f"tritonserver exited ({self.proc.returncode}) before it was ready: "
                                       f"{self.failure_line()} (log: {self.log_file})")
                if self.ready():
                    return self
                time.sleep(0.5)
        except BaseException:  # an interrupt while it starts: the server is in its own session, stop it here
            self.stop()
            raise
        self.stop()
        raise EdgekitError(f"tritonserver was not ready within {timeout:.0f} s (log: {self.log_file})")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def failure_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        bad = [l for l in lines if l.startswith("E") or "error" in l.lower() or "failed" in l.lower()]
        return first_line((bad or lines or ["no output"])[-1], 300)

    def stop(self, timeout: float = 30) -> Optional[int]:
        """SIGTERM (Triton unloads models and exits), SIGKILL after ``timeout``; removes the work folder."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # the whole group: the python-backend stubs too
                os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(10)
        elif self.proc is not None:
            rc = self.proc.returncode
        if getattr(self, "_log", None):
            self._log.close()
        if self.log_file.parent != self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:  # keep the log, drop the copied backend
            shutil.rmtree(self.workdir / "backends", ignore_errors=True)
        return rc

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
