"""`pip install edgekit` is the station runtime: in a fresh virtual environment (no system site-packages) the
wheel installed with its own dependencies only, no extras, so no torch. There:

* `edgekit --help` lists every command, and each build command fails with one line naming the pip install;
* artifacts built elsewhere (in this test's main environment, which has torch) run: `predict` and `eval` of a
  cpu-fused artifact (needs nothing beyond the runtime) and of an ONNX artifact (with onnxruntime, a backend
  runtime, installed beside the runtime: still no torch), and `bench` of both;
* the fleet's device side: an MLFF adapter package installed with `edgekit install`, then health-checked by
  `edgekit update` from a TUF repository served on 127.0.0.1 (the adapter heads in numpy on a compiled ONNX
  backbone), a package whose recorded outputs do not match refused by that check, `rollback`, and
  `classify` giving the main environment's (PyTorch) classes.

What it does not cover: a backbone compiled to cpu-fused (cpu-fused compiles GMBINet segmentation models, not
MLFF backbones), so the MLFF part needs onnxruntime (or openvino) on the station; and an OpenVINO artifact.
The runtime's installed size is measured (du of site-packages, before onnxruntime) and printed (-s).

Slow (a venv and pip installs: about a minute with pip's cache warm); skipped, with the reason, when the
dependencies cannot be fetched (offline).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the artifacts are built in the main environment, with torch")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")

pytestmark = pytest.mark.slow

TASK = "crack-line1"
PIP_TIMEOUT = 900


def _run(cmd, timeout=300, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _online() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    """A fresh venv with `pip install edgekit` (this checkout, with its install_requires) only."""
    from test_wheel import _source_copy

    tmp = tmp_path_factory.mktemp("station")
    src = _source_copy(tmp / "src")  # the checkout's files, so that building leaves nothing in it
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", venv])  # no --system-site-packages: nothing of this environment
    assert made.returncode == 0, made.stderr[-2000:]
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    before = _du(site)
    # `pip install .`, as a user does: built in pip's isolated build environment, installed with its dependencies
    pip = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", src], timeout=PIP_TIMEOUT)
    if pip.returncode != 0:
        if not _online():
            pytest.skip(f"the runtime's dependencies cannot be fetched (offline): {pip.stderr.strip()[-300:]}")
        raise AssertionError(f"pip install edgekit failed:\n{pip.stderr[-3000:]}")
    no_torch = _run([py, "-c", "import torch"])
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    runtime_bytes = _du(site) - before  # what `pip install edgekit` added (the venv's own pip and setuptools aside)
    listed = _run([py, "-m", "pip", "list", "--format", "json"])
    packages = sorted(p["name"].lower() for p in json.loads(listed.stdout))
    print(f"\nruntime-only install: {runtime_bytes / 1e6:.1f} MB in site-packages ({', '.join(packages)})")
    # onnxruntime is a backend runtime, installed beside the runtime for the ONNX artifacts (MLFF backbone); no torch
    ort = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "onnxruntime>=1.18"], timeout=PIP_TIMEOUT)
    if ort.returncode != 0:
        if not _online():
            pytest.skip(f"onnxruntime cannot be fetched (offline): {ort.stderr.strip()[-300:]}")
        raise AssertionError(f"pip install onnxruntime failed:\n{ort.stderr[-3000:]}")
    assert _run([py, "-c", "import torch"]).returncode != 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(EDGEKIT_NO_PROGRESS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cwd = tmp / "cwd"  # not the checkout: the venv's edgekit must be the installed one
    cwd.mkdir()

    def edgekit(*args, timeout=300):
        return _run([venv / "bin" / "edgekit", *args], timeout=timeout, env=env, cwd=cwd)

    where = _run([py, "-c", "import edgekit; print(edgekit.__file__)"], env=env, cwd=cwd).stdout
    assert str(site) in where, where
    return {"edgekit": edgekit, "python": py, "env": env, "cwd": cwd, "runtime_bytes": runtime_bytes,
            "packages": packages}


def _one_error(r) -> str:
    """A refused call: exit 2 and one `error:` line (notes on stderr aside)."""
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


def test_runtime_install_has_no_torch_and_its_size(station):
    assert not {"torch", "nvidia-cublas-cu12", "triton", "pyyaml", "onnx", "openvino", "rich", "pygments"} & set(
        station["packages"])
    assert {"numpy", "click", "pillow", "cryptography", "safetensors", "tuf"} <= set(station["packages"])
    # the runtime is tens of MB (numpy with its OpenBLAS, pillow, cryptography); torch alone is about 750 MB
    assert station["runtime_bytes"] < 200e6


def test_help_lists_every_command_and_build_commands_name_the_install(station, tmp_path):
    from edgekit.cli import main

    r = station["edgekit"]("--help")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert set(main.commands) <= set(listed), set(main.commands) - set(listed)
    build = ("compile", "quantize", "import", "train", "adapt")
    for name in build:
        assert "needs edgekit[build]" in listed[name], listed[name]
    assert "needs edgekit[prune]" in listed["prune"]
    for name in ("info", "eval", "predict", "bench", "classify", "install", "update", "rollback", "verify", "package"):
        assert "needs" not in listed[name], listed[name]
    for args in (("compile", "m.pt", "--target", "cpu-fused", "--out", tmp_path / "a"), ("quantize", "--help"),
                 ("import", "x.pt", "--out", tmp_path / "x.pt"), ("train", "r.yaml"), ("adapt", "--task", "t")):
        line = _one_error(station["edgekit"](*args))
        assert line == (f"error: edgekit {args[0]} needs the optional package torch: pip install 'edgekit[build]'"
                        if args[0] != "train" else
                        "error: edgekit train needs the optional packages torch, yaml: pip install 'edgekit[build]'")
    assert not (tmp_path / "a").exists()
    # a runtime command given a checkpoint (which runs in PyTorch) says what to install, in one line
    line = _one_error(station["edgekit"]("info"))
    assert "needs torch" in line and "pip install 'edgekit[build]'" in line


# --- artifacts built here, run there ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seg_artifacts(tmp_path_factory):
    from edgekit.data.images import write_png
    from edgekit.data.datasets import synthetic_dataset
    from edgekit.pipeline.compile import compile_model

    from conftest import random_gmbinet, tiny_config
    from edgekit.models.checkpoint import Checkpoint

    w = tmp_path_factory.mktemp("seg")
    ck = Checkpoint.from_model(random_gmbinet(tiny_config()))
    ck.preprocess.input_size = (64, 64)
    ckpt = ck.save(w / "tiny.pt")
    images = []
    for s in synthetic_dataset(2, size=(80, 96)).samples:
        images.append(w / "images" / f"{s.name}.png")
        write_png(images[-1], s._image)
    arts = {}
    for target in ("onnx", "cpu-fused"):
        arts[target] = w / f"art_{target}"
        try:
            compile_model(str(ckpt), target, "fp32", str(arts[target]), parity_data="synthetic:2", log=lambda *_: None)
        except Exception as e:  # noqa: BLE001 - cpu-fused needs g++ and AVX2 here
            arts[target] = e
    return {"ckpt": ckpt, "images": images, "arts": arts, "w": w}


def _predict_here(art, images, out) -> dict:
    from click.testing import CliRunner

    from edgekit.cli import main

    r = CliRunner().invoke(main, ["predict", str(art), *map(str, images), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return {Path(x["image"]).name: x["defect_fraction"] for x in json.loads(r.stdout)}


def _predict_there(station, art, images, out) -> dict:
    r = station["edgekit"]("predict", art, *images, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return {Path(x["image"]).name: x["defect_fraction"] for x in json.loads(r.stdout)}


def test_onnx_artifact_predict_and_eval_without_torch(station, seg_artifacts, tmp_path):
    art = seg_artifacts["arts"]["onnx"]
    assert isinstance(art, Path), art
    there = _predict_there(station, art, seg_artifacts["images"], tmp_path / "there")
    here = _predict_here(art, seg_artifacts["images"], tmp_path / "here")
    assert there == here  # the same masks: the numpy preprocessing there, the same runtime
    for img in seg_artifacts["images"]:
        a = (tmp_path / "there" / f"{img.stem}_mask.png").read_bytes()
        assert a == (tmp_path / "here" / f"{img.stem}_mask.png").read_bytes()
    r = station["edgekit"]("eval", art, "--data", "synthetic:4", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["overall"]["images"] == 4


def test_cpu_fused_artifact_predict_and_eval_without_torch(station, seg_artifacts, tmp_path):
    """cpu-fused needs nothing beyond the runtime: its loading chain (edgekit.kernels.cpu.runtime) is numpy and
    ctypes, so predict and eval run where torch cannot be imported."""
    art = seg_artifacts["arts"]["cpu-fused"]
    if not isinstance(art, Path):
        pytest.skip(f"no cpu-fused artifact could be built here: {art}")
    there = _predict_there(station, art, seg_artifacts["images"], tmp_path / "there")
    here = _predict_here(art, seg_artifacts["images"], tmp_path / "here")
    assert there.keys() == here.keys()
    assert all(abs(there[k] - here[k]) < 1e-3 for k in here)
    r = station["edgekit"]("eval", art, "--data", "synthetic:4", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["overall"]["images"] == 4


def test_bench_artifacts_without_torch(station, seg_artifacts):
    """`edgekit bench ARTIFACT...` on the station: artifacts alone are their own rows (no default rows are planned,
    so no torch row is checked), and an artifact's PyTorch reference is said to be unavailable instead of run."""
    arts = [a for a in seg_artifacts["arts"].values() if isinstance(a, Path)]
    r = station["edgekit"]("bench", *arts, "--batch", "1", "--rounds", "1", "--iters", "2", "--eval-limit", "2",
                           "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(r.stdout)["rows"]) == len(arts)


# --- the fleet's device side: install, update with the health check, rollback, classify ---------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Built here (torch): a small GMBINet backbone compiled to an ONNX MLFF backbone artifact, two adapters of one
    task, packages with health samples (and one whose recorded outputs are another adapter's), a TUF repository."""
    from click.testing import CliRunner

    from edgekit.cli import main
    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.fleet.health import record_health
    from edgekit.mlff.registry import Registry
    from edgekit.models.backbones import load_backbone
    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet, GMBINetConfig
    from edgekit.ota import build_package, generate_keypair
    from edgekit.pipeline.compile import compile_model
    from edgekit.train.continual import add_task, task_data_from_folder

    from test_mlff import make_folders

    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r

    w = tmp_path_factory.mktemp("fleet")
    torch.manual_seed(0)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    ckpt = Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(w / "backbone.pt")
    data = make_folders(w / "data", ["a", "b", "c"], n=6)
    regs = {}
    for seed in (0, 1):
        regs[seed] = w / f"reg{seed}"
        add_task(regs[seed], load_backbone(str(ckpt)), TASK, task_data_from_folder(data), epochs=20, rehearsal=0,
                 seed=seed, fc_dim=16, cache_dir=None)
    adapters = {s: Registry.open(r).adapter_folder() for s, r in regs.items()}
    art = w / "backbone_onnx"
    compile_model(str(regs[0]), "onnx", "fp32", str(art), parity_data=str(data), log=lambda *_: None)
    key, pub, _ = generate_keypair(w / "package-key")
    pkgs = {}
    for version, seed in (("1.0.0", 0), ("1.1.0", 1)):
        pkgs[version] = w / f"{TASK}-{version}.zip"
        cli("package", adapters[seed], "--key", key, "--version", version, "--out", pkgs[version], "--samples", data)
    health, info = record_health(adapters[1], load_backbone(str(ckpt)), sorted(data.rglob("*.png"))[::5])
    pkgs["bad"] = w / f"{TASK}-1.2.0-bad.zip"  # adapter 0, outputs recorded on adapter 1: must fail the check
    build_package(adapters[0], key, "1.2.0", pkgs["bad"], health=health, health_info=info)
    repo = w / "repo"
    cli("repo", "init", repo, "--keys", w / "keys", "--package-key", pub, "--tasks", "crack-*")
    cli("repo", "provision", repo, "--out", w / "bundle")
    # what the PyTorch backbone and heads answer, for classify on the station
    want = json.loads(cli("classify", data, "--registry", regs[0], "--json").stdout)
    return {"w": w, "cli": cli, "repo": repo, "bundle": w / "bundle", "art": art, "pub": pub, "pkgs": pkgs,
            "data": data, "reg": regs[0], "classes": {Path(r["image"]).name: r["class"] for r in want}}


def test_install_update_health_check_rollback_classify_without_torch(station, fleet, tmp_path):
    from test_fleet import serve

    ek, f = station["edgekit"], fleet
    # edgekit install: verified, put in service, the backbone identity checked against the compiled artifact
    r = ek("install", f["pkgs"]["1.0.0"], "--root", tmp_path / "manual", "--pubkey", f["pub"], "--backbone", f["art"],
           "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["installed"] == "1.0.0"
    r = ek("install", f["pkgs"]["1.1.0"], "--root", tmp_path / "manual", "--pubkey", f["pub"], "--backbone", f["art"])
    assert r.returncode == 0, r.stderr
    r = ek("rollback", "--root", tmp_path / "manual", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == "1.0.0"
    # edgekit update: TUF, the package seal, then the health check on the compiled backbone (numpy heads)
    device = tmp_path / "device"
    with serve(f["repo"]) as (server, url):
        f["cli"]("repo", "add", f["repo"], f["pkgs"]["1.0.0"])
        f["cli"]("repo", "publish", f["repo"])
        r = ek("update", "--repo", url, "--root", device, "--trust", f["bundle"], "--backbone", f["art"], "--task", TASK,
               "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        first = json.loads(r.stdout)
        assert first["action"] == "installed" and first["version"] == "1.0.0" and first["health"]["ok"], first
        assert first["health"]["top1_agreement"] == 1.0 and first["health"]["max_abs_diff"] < 1e-4, first
        # a version whose outputs do not match those recorded: the check (numpy heads) fails it, 1.0.0 keeps serving
        f["cli"]("repo", "add", f["repo"], f["pkgs"]["bad"])
        f["cli"]("repo", "publish", f["repo"])
        line = _one_error(ek("update", "--repo", url, "--root", device, "--trust", f["bundle"]))
        assert "health check of 1.2.0 failed" in line and "1.0.0 is still in service" in line, line
    state = _run([station["python"], "-c", "import json, sys; from edgekit.ota import installed; "
                  "print(json.dumps(installed(sys.argv[1])))", device], env=station["env"], cwd=station["cwd"])
    assert json.loads(state.stdout)["version"] == "1.0.0", state.stderr
    # classify on the compiled backbone: the classes PyTorch gives here
    r = ek("classify", f["data"], "--registry", f["reg"], "--backbone-artifact", f["art"], "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {Path(x["image"]).name: x["class"] for x in json.loads(r.stdout)} == f["classes"]
    # the adapter in service on the device (ROOT and ROOT/current), on the backbone update recorded: numpy heads
    for where in (device, Path(device) / "current"):
        r = ek("classify", f["data"], "--adapters", where, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert {Path(x["image"]).name: x["class"] for x in json.loads(r.stdout)} == f["classes"]
    # without a compiled backbone the station cannot run the PyTorch one: one line naming the way out
    line = _one_error(ek("classify", f["data"], "--registry", f["reg"]))
    assert "pip install 'edgekit[build]'" in line and "--backbone-artifact" in line
