"""The built wheel, installed away from the source checkout, has what the package needs: the CLI
starts, the embedded default checkpoint (package data) loads, and a compile runs from there."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _source_copy(dest: Path) -> Path:
    """The working tree's files (tracked and new, not ignored) copied out, so that building leaves
    no build/ or egg-info behind in the checkout."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the project's files")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """edgekit's wheel built (no build isolation: offline) and installed into a fresh --target folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("edgekit-*.whl"))
    target = tmp / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return target


def _env(target: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGEKIT_SHARED")}
    return dict(env, PYTHONPATH=str(target), EDGEKIT_NO_PROGRESS="1")


def _edgekit(target: Path, cwd: Path, *args):
    # the console script pip wrote, run with this interpreter (its shebang may name another)
    return subprocess.run([sys.executable, str(target / "bin" / "edgekit"), *map(str, args)], cwd=cwd,
                          env=_env(target), capture_output=True, text=True, timeout=600)


def test_wheel_has_every_module_and_the_package_data(installed):
    """Every file inside edgekit/ of the checkout (modules of every subpackage, assets, kernel sources, ...)
    is installed: a folder without __init__.py, or data not declared, would be left out."""
    files = subprocess.run(["git", "ls-files", "edgekit"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert "edgekit/assets/gmbinet_edgekit.pt" in files
    missing = [f for f in files if not (installed / f).is_file() and not Path(f).name.startswith(".")]  # .gitignore
    assert missing == [], f"not in the wheel: {missing}"


def test_installed_wheel_runs_away_from_the_checkout(installed, tiny_ckpt, tmp_path):
    where = subprocess.run([sys.executable, "-c", "import edgekit; print(edgekit.__file__)"], cwd=tmp_path,
                           env=_env(installed), capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr
    r = _edgekit(installed, tmp_path, "--help")
    assert r.returncode == 0 and "compile" in r.stdout, r.stderr
    r = _edgekit(installed, tmp_path, "info", "--json")  # the embedded default checkpoint: package data
    assert r.returncode == 0, r.stderr
    assert Path(json.loads(r.stdout)["path"]).is_relative_to(installed) and "note: no model given" in r.stderr
    r = _edgekit(installed, tmp_path, "compile", tiny_ckpt, "--target", "onnx", "--out", "art")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())  # parity checked with ONNX Runtime
    assert manifest["target"] == "onnx" and manifest["parity"]["max_abs_diff"] < 1e-4


def test_installed_wheel_builds_and_runs_cpu_fused(installed, tiny_ckpt, tmp_path):
    """The kernel source is package data: the installed wheel compiles cpu-fused (with the system g++) and
    runs it, away from the checkout."""
    from edgekit.kernels.cpu.runtime import supported_isas

    if shutil.which("g++") is None or not supported_isas():
        pytest.skip("cpu-fused needs g++ and an AVX2+FMA (or AVX-512) CPU")
    r = _edgekit(installed, tmp_path, "compile", tiny_ckpt, "--target", "cpu-fused", "--out", "cf")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "cf" / "manifest.json").read_text())
    assert manifest["target"] == "cpu-fused" and manifest["parity"]["max_abs_diff"] < 1e-4
    r = _edgekit(installed, tmp_path, "eval", "cf", "--data", "synthetic:2", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["overall"]["images"] == 2, r.stderr
