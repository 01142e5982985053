"""The station's trust side: canary hold, shadow verdicts on live images, hot swap under a stream.

A module fixture builds a small real fleet (as tests/test_fleet.py does): a tiny GMBINet backbone compiled to an
ONNX backbone artifact, three adapter packages with health samples and a TUF repository served on 127.0.0.1:

* 1.0.0: trained on the product's three classes (seed 0), the version in service;
* 1.1.0 "bad": trained with classes a and b swapped (its images of a are labelled b and back); its packaged health
  samples were recorded on itself, so it PASSES the device's health check, and disagrees on live images;
* 1.2.0 "good": the same data as 1.0.0 with another seed.

Live images are new draws of the three classes (other noise than the training images).
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tuf", reason="tuf not installed (pip install 'edgekit[ota]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")

from edgekit.data.images import write_png  # noqa: E402
from edgekit.device.state import InstallRoot  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.ota import installed  # noqa: E402

from test_fleet import TASK, ok, one_error_line, serve  # noqa: E402
from test_mlff import _image, make_folders  # noqa: E402

CLASSES = ["a", "b", "c"]
POLICY = {"images": 12, "min_agreement": 0.8}


def live_images(folder: Path, n_per_class: int, start: int = 100) -> list:
    """New draws of the product's classes (noise the adapters never saw), as PNG files; returns their paths."""
    paths = []
    for i in range(n_per_class):
        for k, c in enumerate(CLASSES):
            p = folder / f"{c}_{start + i}.png"
            write_png(p, _image(k, start + i))
            paths.append(p)
    return paths


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    import torch
    from click.testing import CliRunner

    from edgekit.cli import main
    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.mlff.registry import Registry
    from edgekit.models.backbones import load_backbone
    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet, GMBINetConfig
    from edgekit.ota import generate_keypair
    from edgekit.pipeline.compile import compile_model
    from edgekit.train.continual import add_task, task_data_from_folder

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    w = tmp_path_factory.mktemp("plant")
    mp = pytest.MonkeyPatch()
    mp.setenv("NO_PROXY", "127.0.0.1")
    mp.setenv("no_proxy", "127.0.0.1")
    torch.manual_seed(0)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    ckpt = Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(w / "backbone.pt")
    data = make_folders(w / "data", CLASSES, n=8)
    swapped = w / "swapped"  # a's images labelled b, b's labelled a
    for src, dst in (("a", "b"), ("b", "a"), ("c", "c")):
        shutil.copytree(data / src, swapped / dst)
    regs = {}
    for name, seed, folder in (("serving", 0, data), ("bad", 0, swapped), ("good", 1, data)):
        regs[name] = w / f"reg-{name}"
        add_task(regs[name], load_backbone(str(ckpt)), TASK, task_data_from_folder(folder), epochs=150, lr=1e-2, rehearsal=0,
                 seed=seed, fc_dim=16, cache_dir=None)
    adapters = {n: Registry.open(r).adapter_folder() for n, r in regs.items()}
    art = w / "backbone_onnx"
    compile_model(str(regs["serving"]), "onnx", "fp32", str(art), parity_data=str(data), log=lambda *_: None)
    key, pub, _ = generate_keypair(w / "package-key")
    pkgs = {}
    for version, name, samples in (("1.0.0", "serving", data), ("1.1.0", "bad", swapped), ("1.2.0", "good", data)):
        pkgs[version] = w / f"{TASK}-{version}.zip"
        ok(cli("package", adapters[name], "--key", key, "--version", version, "--out", pkgs[version],
               "--samples", samples))
    repo = w / "repo"
    ok(cli("repo", "init", repo, "--keys", w / "keys", "--package-key", pub, "--tasks", "crack-*"))
    trust = w / "trust-bundle"
    ok(cli("repo", "provision", repo, "--out", trust))
    ok(cli("repo", "add", repo, pkgs["1.0.0"]))
    ok(cli("repo", "publish", repo))
    server_cm = serve(repo)
    server, url = server_cm.__enter__()
    device = w / "device"
    first = json.loads(ok(cli("update", "--repo", url, "--root", device, "--trust", trust, "--backbone", art,
                              "--task", TASK, "--json")).stdout)
    assert first["action"] == "installed" and first["version"] == "1.0.0"
    live = live_images(w / "live", 8)
    yield {"w": w, "cli": cli, "server": server, "url": url, "repo": repo, "trust": trust, "device": device,
           "art": art, "data": data, "pkgs": pkgs, "adapters": adapters, "live": live}
    server_cm.__exit__(None, None, None)
    mp.undo()


@pytest.fixture()
def env(plant, tmp_path):
    """Copies of the repository (served) and of the device with 1.0.0 in service."""
    repo, device = tmp_path / "repo", tmp_path / "device"
    shutil.copytree(plant["repo"], repo, symlinks=True)
    shutil.copytree(plant["device"], device, symlinks=True)
    plant["server"].root = repo
    yield dict(plant, repo=repo, device=device)
    plant["server"].root = plant["repo"]


def publish(e, version):
    ok(e["cli"]("repo", "add", e["repo"], e["pkgs"][version]))
    ok(e["cli"]("repo", "publish", e["repo"]))


def update(e, *extra):
    return e["cli"]("update", "--repo", e["url"], "--root", e["device"], "--trust", e["trust"], "--timeout", 2, *extra)


def hold(e, version):
    """Publish ``version`` and update a device with a canary policy: the trial passes its health check and is held."""
    InstallRoot(e["device"]).set_canary_policy(POLICY)
    publish(e, version)
    r = json.loads(ok(update(e, "--json")).stdout)
    assert r["action"] == "trial" and r["version"] == version and r["health"]["ok"], r
    return r


def read_gray_all(paths):
    from edgekit.data.images import read_gray

    return [read_gray(p) for p in paths]


# --- the state machine ------------------------------------------------------------------------------------------

def test_held_trial_never_serves_recover_leaves_it_update_installs_nothing(env):
    from edgekit.fleet.device import load_classifier

    r = hold(env, "1.1.0")
    dev = InstallRoot(env["device"])
    state = dev.read()
    assert state.trial["version"] == "1.1.0" and state.trial["phase"] == "canary" and state.held is not None
    assert state.trial["health"]["images"] >= 1 and state.canary["images"] == POLICY["images"]
    assert state.current["version"] == "1.0.0" and installed(env["device"])["version"] == "1.0.0"
    assert (env["device"] / "current").resolve() == (env["device"] / state.current["dir"]).resolve()
    assert "canary hold" in r["reason"] and "1.0.0 is still in service" in r["reason"]
    assert [h["action"] for h in state.history[-2:]] == ["trial", "canary-hold"]
    # a reader's recover() (what classify and every runtime loader run first) leaves a held trial alone
    assert dev.recover() is None and dev.read().trial == state.trial
    # classify --adapters ROOT keeps running the committed version
    clf = load_classifier(env["device"], backbone_artifact=env["art"])
    assert [p["class"] for p in clf.predict(read_gray_all(env["live"][:6]))] == CLASSES * 2  # 1.0.0, not the swap
    out = env["cli"]("classify", "--adapters", env["device"], "--backbone-artifact", env["art"], "--json",
                     *env["live"][:6])
    assert out.exit_code == 0, out.stderr
    assert [row["class"] for row in json.loads(out.stdout)] == CLASSES * 2
    # while it is held, update installs nothing new, says why, and even a newer published version waits
    publish(env, "1.2.0")
    again = update(env, "--json")
    assert again.exit_code == 0, again.stderr
    again = json.loads(again.stdout)
    assert again["action"] == "none" and again["trial"] == "1.1.0" and "canary hold" in again["reason"]
    assert "edgekit station promote|reject" in again["reason"]
    text = ok(update(env)).stdout
    assert text.startswith("nothing installed: 1.1.0 is on canary hold")
    after = dev.read()
    assert after.trial == state.trial and after.current == state.current
    assert sorted(p.name for p in (env["device"] / "versions").iterdir()) == ["1.0.0", "1.1.0"]


def test_operator_promote_commits_reject_blocks_with_reason(env):
    from edgekit.station.canary import promote, reject

    hold(env, "1.1.0")
    r = reject(env["device"], "labels look swapped")
    assert r["action"] == "rejected" and r["serving"] == "1.0.0"
    state = InstallRoot(env["device"]).read()
    assert state.trial is None and state.blocked["1.1.0"] == "rejected by the operator: labels look swapped"
    assert state.history[-1]["action"] == "failed" and "labels look swapped" in state.history[-1]["reason"]
    assert not (env["device"] / "versions" / "1.1.0").exists()
    # blocked: update never installs it again by itself (exit 3, one line)
    one_error_line(update(env), "1.1.0, the newest the repository offers, is blocked")
    with pytest.raises(EdgekitError, match="nothing to decide"):
        promote(env["device"])
    # the newer good one goes on hold, and the operator promotes it: committed, in the history with the reason
    hold(env, "1.2.0")
    p = promote(env["device"])
    assert p == {"action": "promoted", "version": "1.2.0", "serving": "1.2.0",
                 "reason": "promoted by the operator (edgekit station promote)"}
    state = InstallRoot(env["device"]).read()
    assert state.current["version"] == "1.2.0" and state.previous["version"] == "1.0.0" and state.trial is None
    assert state.history[-1]["action"] == "commit" and state.history[-1]["reason"].startswith("promoted")
    assert installed(env["device"])["version"] == "1.2.0"


def test_no_policy_commits_at_once_and_policy_is_checked(env):
    dev = InstallRoot(env["device"])
    for bad in ({"images": 0, "min_agreement": 0.5}, {"images": 5, "min_agreement": 1.5}, {"images": True,
                                                                                          "min_agreement": 0.5}):
        with pytest.raises(EdgekitError, match="canary"):
            dev.set_canary_policy(bad)
    assert dev.read().canary is None
    publish(env, "1.2.0")
    r = json.loads(ok(update(env, "--json")).stdout)
    assert r["action"] == "installed" and installed(env["device"])["version"] == "1.2.0"
