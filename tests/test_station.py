"""``edgekit station``: the command as a real process over a real install root (watch folder, SQLite), its
subcommands (status, promote, reject), its one-line refusals, and kill -9 at random moments while images stream.

A module fixture builds a device without a repository: a tiny GMBINet backbone compiled to an ONNX backbone
artifact, three adapter packages (1.0.0, 1.1.0, 1.2.0), 1.0.0 installed with ``edgekit install``. Trials are put on
canary hold through the install root's own transitions (what ``edgekit update`` does after a passing health
check; tests/test_station_canary.py runs that path through a real TUF repository).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("watchdog", reason="watchdog not installed (pip install 'edgekit[station]')")

from PIL import Image  # noqa: E402

from edgekit.data.images import write_png  # noqa: E402
from edgekit.device.state import InstallRoot  # noqa: E402

from test_fleet import ok, one_error_line  # noqa: E402
from test_mlff import _image, make_folders  # noqa: E402

PY = sys.executable
TASK = "crack-line1"


@pytest.fixture(scope="module")
def device(tmp_path_factory):
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

    w = tmp_path_factory.mktemp("station")
    torch.manual_seed(0)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    ckpt = Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(w / "backbone.pt")
    data = make_folders(w / "data", ["a", "b", "c"], n=6)
    key, pub, _ = generate_keypair(w / "key")
    pkgs, regs = {}, {}
    for version, seed in (("1.0.0", 0), ("1.1.0", 1), ("1.2.0", 2)):
        regs[version] = w / f"reg-{version}"
        add_task(regs[version], load_backbone(str(ckpt)), TASK, task_data_from_folder(data), epochs=3,
                 rehearsal=0, seed=seed, fc_dim=16, cache_dir=None)
        pkgs[version] = w / f"{TASK}-{version}.zip"
        ok(cli("package", Registry.open(regs[version]).adapter_folder(), "--key", key, "--version", version,
               "--out", pkgs[version], "--samples", data))
    art = w / "backbone_onnx"
    compile_model(str(regs["1.0.0"]), "onnx", "fp32", str(art), parity_data=str(data), log=lambda *_: None)
    seg = w / "segment_onnx"  # the same tiny GMBINet as a segmentation artifact: masks become regions
    compile_model(str(ckpt), "onnx", "fp32", str(seg), log=lambda *_: None)
    root = w / "root"
    ok(cli("install", pkgs["1.0.0"], "--root", root, "--pubkey", pub, "--backbone", art))
    return {"w": w, "cli": cli, "art": art, "seg": seg, "pkgs": pkgs, "pub": pub, "root": root}


@pytest.fixture()
def root(device, tmp_path):
    copy = tmp_path / "root"
    import shutil

    shutil.copytree(device["root"], copy, symlinks=True)
    return copy


def put_on_hold(root: Path, pkg: Path, pub) -> str:
    """What ``edgekit update`` does on a root with a canary policy once the trial's health check passed."""
    from edgekit.ota import verify_package
    from edgekit.ota.install import check_version_folder, package_files

    p = verify_package(pkg, {pub})
    version = p.manifest["version"]
    dev = InstallRoot(root)
    with dev.lock():
        rel = dev.add_version(version, package_files(p), lambda f: check_version_folder(f, p.manifest))
        dev.begin_trial(rel, version, p.signer.key_id)
        dev.hold_for_canary(version, None)
    return version


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drop_image(folder: Path, name: str, cls: int, i: int) -> None:
    """A complete image appears at once: written under a temp name the watcher ignores, then renamed in."""
    tmp = folder / f".{name}.part"
    write_png(tmp, _image(cls, i))
    os.replace(tmp, folder / name)


def station_cmd(*args):
    return [PY, "-c", "from edgekit.cli import main; main()", "station", *[str(a) for a in args]]


def start(root: Path, watch: Path, art: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "EDGEKIT_NO_PROGRESS": "1"}
    return subprocess.Popen(station_cmd(root, "--watch", watch, "--backbone-artifact", art, "--batch", 4, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def status(root: Path) -> dict:
    r = subprocess.run(station_cmd("status", root, "--json"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(predicate, timeout=60.0, what="the station", proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the station exited ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def committed_keys(db: Path) -> list:
    """Every key in the results table, read as any other SQLite client would (read-only)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT key FROM results ORDER BY id")]
    except sqlite3.OperationalError:  # the tables are not created yet
        return []
    finally:
        conn.close()


def stop(proc: subprocess.Popen) -> tuple:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


# --- refusals -------------------------------------------------------------------------------------------------

def test_bad_input_is_one_error_line_and_nothing_written(device, root, tmp_path):
    cli = device["cli"]
    watch = tmp_path / "in"
    watch.mkdir()
    before = sorted(p.name for p in root.iterdir())
    cases = [
        ((tmp_path / "missing", "--watch", watch), "does not exist"),
        ((root, "--http", "127.0.0.1:http"), "--http"),
        ((root, "--http", "127.0.0.1:70000"), "--http"),
        ((root, "--http", "localhost:8080"), "IP address"),
        ((root, "--watch", watch, "--canary", 0), "--canary"),
        ((root, "--watch", watch, "--canary", -5), "--canary"),
        ((root, "--watch", watch, "--canary"), "--canary"),
        ((root, "--watch", watch, "--canary", 10, "--min-agreement", 1.5), "--min-agreement"),
        ((root, "--watch", watch, "--canary", 10, "--min-agreement", -0.1), "--min-agreement"),
        ((root, "--watch", watch, "--min-agreement", 0.9), "--min-agreement goes with --canary"),
        ((root,), "give an input"),
        ((root, "--watch", tmp_path / "nowhere"), "not a folder"),
        ((root, "--watch", watch, "--metrics", "0.0.0.0"), "--metrics"),
        ((root, "--watch", watch, "--mqtt", "broker"), "--mqtt"),
    ]
    for args, phrase in cases:
        r = cli("station", *args)
        one_error_line(r, phrase)
        assert r.exit_code == 2 and r.stdout == ""
    with socket.socket() as taken:  # a port in use: refused after the models load, before anything is written
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = cli("station", root, "--http", f"127.0.0.1:{taken.getsockname()[1]}", "--canary", 5,
                "--backbone-artifact", device["art"])
        one_error_line(r, "cannot listen on 127.0.0.1")
    one_error_line(cli("station", "status", tmp_path / "missing"), "does not exist")
    one_error_line(cli("station", "promote", root), "nothing to decide")
    one_error_line(cli("station", "reject", root), "nothing to decide")
    assert sorted(p.name for p in root.iterdir()) == before  # no database, no policy written
    assert InstallRoot(root).read().canary is None


def test_service_imports_no_torch():
    code = ("import sys, edgekit.station.service, edgekit.station.models, edgekit.station.canary, "
            "edgekit.commands.station; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --- the command as a process ------------------------------------------------------------------------------------

def test_watch_status_promote_reject_as_a_process(device, root, tmp_path):
    watch = tmp_path / "in"
    watch.mkdir()
    for i in range(3):  # already there at start: inspected too
        drop_image(watch, f"early_{i}.png", i % 3, 200 + i)
    config = tmp_path / "station.toml"
    # every pixel is defect: NG, one region; and every image counts as unlike the training data (the threshold
    # calibrated at adapt time scaled down to nothing): each one is flagged and lands in --review
    config.write_text("[segment]\nthreshold = 0.0\nmin_region_px = 1\n[drift]\nthreshold_scale = 1e-9\n")
    review = tmp_path / "review"
    http_port, metrics_port = free_port(), free_port()
    proc = start(root, watch, device["art"], "--canary", 1000, "--min-agreement", 0.5, "--station-id", "line1",
                 "--segment", device["seg"], "--config", config, "--http", f"127.0.0.1:{http_port}",
                 "--metrics", f"127.0.0.1:{metrics_port}", "--review", review)
    try:
        wait_for(lambda: len(committed_keys(root / "station.db")) == 3, what="the images already there", proc=proc)
        # an HTTP upload: the reply is the committed result
        png = io.BytesIO()
        Image.fromarray(_image(1, 250)).save(png, format="PNG")
        reply = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http_port}/infer?name=part.png", data=png.getvalue(), method="POST"), timeout=30).read())
        assert reply["source"] == "http" and reply["name"] == "part.png" and reply["id"] >= 1
        assert reply["decision"] == "NG" and reply["serving"]["version"] == "1.0.0" and reply["latency_s"] >= 0
        live = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=10).read())
        assert live["station"] == "line1" and live["serving"] == "1.0.0" and live["counts"]["images"] == 4
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'edgekit_station_images_total{decision="NG"} 4.0' in scrape
        for i in range(6):
            drop_image(watch, f"img_{i}.png", i % 3, 300 + i)
        (watch / "notes.txt").write_text("not an image")
        (watch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        wait_for(lambda: len(committed_keys(root / "station.db")) == 11, what="the new images", proc=proc)
        s = status(root)
        assert s["serving"] == "1.0.0" and s["trial"] is None
        assert s["canary_policy"] == {"images": 1000, "min_agreement": 0.5, "max_confidence_drop": 0.02}
        assert s["counts"]["images"] == 11 and s["counts"]["error"] == 1 and s["counts"]["ng"] == 10
        # a trial goes on hold while the station runs; the operator rejects it
        put_on_hold(root, device["pkgs"]["1.1.0"], device["pub"])
        assert status(root)["trial"] == "1.1.0" and status(root)["trial_phase"] == "canary"
        r = subprocess.run(station_cmd("reject", root, "--reason", "not this week"), capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("rejected 1.1.0: blocked"), r.stderr
        s = status(root)
        assert s["trial"] is None and s["blocked"]["1.1.0"] == "rejected by the operator: not this week"
        # the next one is promoted by hand: the running station swaps to it between two batches
        put_on_hold(root, device["pkgs"]["1.2.0"], device["pub"])
        r = subprocess.run(station_cmd("promote", root, "--json"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"action": "promoted", "version": "1.2.0", "serving": "1.2.0",
                                        "reason": "promoted by the operator (edgekit station promote)"}
        time.sleep(0.5)
        for i in range(3):
            drop_image(watch, f"late_{i}.png", i, 400 + i)
        wait_for(lambda: len(committed_keys(root / "station.db")) == 14, what="the images after the swap", proc=proc)
        s = status(root)
        assert s["serving"] == "1.2.0" and s["previous"] == "1.0.0" and s["counts"]["images"] == 14
        assert any(e["kind"] == "swap" and "serving 1.0.0 -> 1.2.0" in e["detail"] for e in s["events"])
    finally:
        code, out, err = stop(proc)
    assert code == 0, err
    assert out.strip() == f"stopped: 14 images (0 OK, 13 NG, 1 errors) in {root / 'station.db'}"
    from edgekit.station.store import ResultStore

    store = ResultStore(root / "station.db", read_only=True)
    results = sorted(store.recent(100), key=lambda r: r["id"])
    store.close()
    assert [r["serving"]["version"] for r in results[-3:]] == ["1.2.0"] * 3
    broken = [r for r in results if r["name"] == "broken.png"]
    assert len(broken) == 1 and broken[0]["decision"] == "ERROR" and "not a readable image" in broken[0]["error"]
    assert {r["station"] for r in results} == {"line1"}
    text = subprocess.run(station_cmd("status", root), capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "serving 1.2.0; trial -" and lines[1] == "canary: 1000 live images, agreement >= 0.5"
    assert lines[2] == "blocked: 1.1.0 (rejected by the operator: not this week)"
    assert lines[3].startswith("results: 14 images (0 OK, 13 NG, 1 errors), drift rate 1.000 (newest 13 scored); "
                               "last 20")
    # the flagged images wait in the review inbox with their scores, for labelling (edgekit adapt --data DIR)
    inbox = sorted(p.name for p in (review / "inbox").iterdir() if p.suffix == ".png")
    assert len(inbox) == 13 and any(n.endswith("part.png") for n in inbox)
    logged = [json.loads(line) for line in (review / "inbox" / "review.jsonl").read_text().splitlines()]
    assert len(logged) == 13 and all(e["ood"]["flagged"] and e["ood"]["score"] > e["ood"]["threshold"] for e in logged)
    seg_id = hashlib.sha256((device["seg"] / "manifest.json").read_bytes()).hexdigest()[:16]
    for r in results:
        if r["decision"] == "ERROR":
            continue
        assert r["segment"]["artifact"] == seg_id and r["segment"]["defect_frac"] == 1.0
        assert r["segment"]["regions"] == [{"area_px": 24 * 24, "area_frac": 1.0, "bbox": [0, 0, 24, 24],
                                            "peak": r["segment"]["regions"][0]["peak"]}]
        assert r["reasons"] == [f"region {24 * 24} px", "novel"] and r["decision"] == "NG"
        assert r["ood"]["flagged"] and r["ood"]["score"] > r["ood"]["threshold"] > 0


def test_kill_9_at_random_moments_loses_no_committed_result(device, root, tmp_path):
    watch = tmp_path / "in"
    watch.mkdir()
    db = root / "station.db"
    rng = random.Random(22)
    total, written, per_round = 90, 0, 25
    for round_ in range(3):
        proc = start(root, watch, device["art"])
        kill_at = time.monotonic() + rng.uniform(0.5, 4.0)  # from the start: in its startup, its scan or its batches
        quota = written + per_round
        while time.monotonic() < kill_at:  # images keep arriving until the kill
            if written < quota:
                drop_image(watch, f"img_{written:03d}.png", written % 3, 500 + written)
                written += 1
            time.sleep(0.03)
        before = committed_keys(db)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        after = committed_keys(db)
        assert after[:len(before)] == before, f"round {round_}: rows committed before the kill are gone"
        if db.exists():
            conn = sqlite3.connect(db)
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            conn.close()
        assert len(set(after)) == len(after)
        print(f"round {round_}: {written} images written, {len(before)} committed before the kill, {len(after)} after")
    while written < total:
        drop_image(watch, f"img_{written:03d}.png", written % 3, 500 + written)
        written += 1
    proc = start(root, watch, device["art"])
    try:
        wait_for(lambda: len(committed_keys(db)) >= total, 120, "the rest after the restart", proc=proc)
        time.sleep(1.0)  # a duplicate would show up now
    finally:
        code, out, err = stop(proc)
    assert code == 0, err
    keys = committed_keys(db)
    assert len(keys) == total and len(set(keys)) == total
    assert {k.split(":")[1] for k in keys} == {f"img_{i:03d}.png" for i in range(total)}


# --- the pipeline: prepare thread -> one slot -> worker ------------------------------------------------------------

def test_stop_commits_every_queued_and_prepared_batch_in_order(device, root, tmp_path):
    """With every image already queued when the threads start, the prepare thread runs ahead of the worker (a
    batch in the handover slot, another being decoded) and stop() comes at once: stop() returns only after each
    submitted image is a committed row, in submission order, the undecodable file an ERROR row; the queue depth
    counts images until they run and is 0 after. And run(images, prepared) is run(images)."""
    import numpy as np

    from edgekit.station.jobs import Job
    from edgekit.station.models import StationModels
    from edgekit.station.service import Station

    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"img{i:02d}.png" for i in range(21)]
    for i, name in enumerate(names):
        if i == 7:
            (folder / name).write_bytes(b"not an image")
        else:
            write_png(folder / name, _image(i % 3, i))
    models = StationModels(root, backbone_artifact=device["art"])
    images = [_image(c, 0) for c in range(3)]
    direct, staged = models.run(images), models.run(images, prepared=models.prepare(images))
    assert [d["classification"] for d in direct] == [s["classification"] for s in staged]
    assert np.allclose([d["ood"]["score"] for d in direct if d["ood"]], [s["ood"]["score"] for s in staged if s["ood"]])
    db = tmp_path / "station.db"
    station = Station(models, db, batch=4, queue_size=64)
    for name in names:
        assert station.submit(Job(key=f"t:{name}", source="watch", name=name, path=folder / name))
    assert station.queue_depth() == len(names) == station.queue.qsize()
    station.start()
    station.stop()
    assert not station.running and station.failure is None
    assert station.queue_depth() == 0
    assert committed_keys(db) == [f"t:{name}" for name in names]
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        decisions = dict(conn.execute("SELECT key, decision FROM results"))
    finally:
        conn.close()
    assert decisions.pop("t:img07.png") == "ERROR" and "ERROR" not in decisions.values()
    counts = station.status()["counts"]
    assert counts["images"] == len(names) and counts["error"] == 1 and station.status()["queue"] == 0


def test_malformed_mqtt_addresses_are_refused_not_retried_forever():
    """A host with a stray colon or a space used to pass and reach the MQTT client, which retried it forever."""
    from edgekit.commands.station import parse_addr
    from edgekit.errors import EdgekitError

    for text in ("127.0.0.1:1883:9", "a b:1883", "::1:1883", "[]:1883", " :1883"):
        with pytest.raises(EdgekitError, match="give HOST:PORT"):
            parse_addr(text, "--mqtt")
    assert parse_addr("broker.plant:1883", "--mqtt") == ("broker.plant", 1883)
    assert parse_addr("[::1]:1883", "--mqtt") == ("::1", 1883)


@pytest.mark.parametrize("addr", ["127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:", "8080", "a b:80",
                                  "127.0.0.1:1883:9"])
def test_every_host_port_option_refuses_the_same_addresses(tmp_path, addr):
    """--http, --metrics and --mqtt took port 0 while their message said 1-65535, and each command had a parser of
    its own. Now every HOST:PORT option (station, fleet status, serve, bench --server) refuses the same addresses
    with the same one line, before anything is written."""
    from click.testing import CliRunner

    from edgekit.cli import main

    root, watch = tmp_path / "root", tmp_path / "in"
    root.mkdir()
    watch.mkdir()
    cases = [("--http", ["station", root, "--http", addr]),
             ("--metrics", ["station", root, "--watch", watch, "--metrics", addr]),
             ("--mqtt", ["station", root, "--watch", watch, "--mqtt", addr]),
             ("--mqtt", ["fleet", "status", "--mqtt", addr, "--wait", "0.1"]),
             ("--http", ["serve", root, "--http", addr]),
             ("--grpc", ["serve", root, "--grpc", addr]),
             ("--server", ["bench", "--server", addr, "--model", "m"])]
    for option, args in cases:
        r = CliRunner().invoke(main, [str(a) for a in args])
        line = one_error_line(r, f"{option} {addr!r}: give HOST:PORT, e.g. ")
        assert line.endswith("(port 1-65535)") and r.exit_code == 2 and r.stdout == "", (args, line)
    assert list(root.iterdir()) == [] and list(watch.iterdir()) == []


@pytest.mark.parametrize("corrupt", ["garbage", {"version": 5, "dir": "versions/1.0.0"}, ["1.0.0"],
                                     {"version": "1.0.0"}])
def test_status_reports_a_corrupt_current_entry(device, root, corrupt):
    """state.json's "current" corrupted used to be read as "nothing recorded", so status (and the station) quietly
    took whatever ROOT/current points to and reported it as serving. It fails closed now, as every other corrupt
    field of the state does: one error line naming the file, exit 2, and the station refuses to start."""
    cli = device["cli"]
    assert json.loads(ok(cli("station", "status", root, "--json")).stdout)["serving"] == "1.0.0"
    state_path = root / "state.json"
    state = json.loads(state_path.read_text())
    state["current"] = corrupt
    state_path.chmod(0o644)
    state_path.write_text(json.dumps(state))
    for args in (("station", "status", root), ("station", "status", root, "--json")):
        r = cli(*args)
        line = one_error_line(r, f"{state_path} is malformed (current is ")
        assert r.exit_code == 2 and r.stdout == "" and "fix or remove it" in line
    watch = root.parent / "in"
    watch.mkdir()
    r = cli("station", root, "--watch", watch, "--backbone-artifact", device["art"])
    one_error_line(r, f"{state_path} is malformed (current is ")
    assert r.exit_code == 2 and not (root / "station.db").exists()


def test_segment_that_is_not_a_segmentation_artifact_is_refused_at_start(device, root, tmp_path):
    """The backbone artifact given as --segment used to load and then make every image an ERROR row."""
    watch = tmp_path / "in"
    watch.mkdir()
    before = sorted(p.name for p in root.iterdir())
    r = device["cli"]("station", root, "--watch", watch, "--segment", device["art"], "--backbone-artifact",
                      device["art"])
    one_error_line(r, "not a GMBINet segmentation artifact")
    assert r.exit_code == 2 and r.stdout == ""
    assert sorted(p.name for p in root.iterdir()) == before  # no database


def test_segment_given_as_a_bare_model_file_is_checked_too(device, root, tmp_path):
    """A bare .onnx (no manifest, so no recorded kind) was not checked at all: the backbone's model.onnx as
    --segment started, and every image became an ERROR row. The model's own output says what it is now: the
    backbone's (1 x 48 features) is refused at start, the segmentation model's mask (1 x 1 x 32 x 32) runs."""
    watch = tmp_path / "in"
    watch.mkdir()
    before = sorted(p.name for p in root.iterdir())
    # a process with a deadline: before the fix this station started and ran until stopped
    r = subprocess.run(station_cmd(root, "--watch", watch, "--segment", device["art"] / "model.onnx",
                                   "--backbone-artifact", device["art"]), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --segment ") and "its output is 1 x 48, not a mask (N x 1 x H x W): not a " \
        "segmentation model" in r.stderr
    assert sorted(p.name for p in root.iterdir()) == before  # no database
    config = tmp_path / "station.toml"
    config.write_text("[segment]\nthreshold = 0.0\nmin_region_px = 1\n")  # every pixel is defect: one region
    proc = start(root, watch, device["art"], "--segment", device["seg"] / "model.onnx", "--config", config)
    try:
        drop_image(watch, "part.png", 0, 300)
        wait_for(lambda: len(committed_keys(root / "station.db")) == 1, what="the image", proc=proc)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    conn = sqlite3.connect((root / "station.db").absolute().as_uri() + "?mode=ro", uri=True)
    try:
        (row,) = [json.loads(r[0]) for r in conn.execute("SELECT result FROM results")]
    finally:
        conn.close()
    assert row["decision"] == "NG" and row["error"] is None and row["segment"]["defect_frac"] == 1.0


def test_port_in_use_leaves_no_review_folder_behind(device, root, tmp_path):
    """--review DIR used to be created (DIR/inbox) before --http was bound, so a refused start left it behind."""
    review = tmp_path / "review"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = device["cli"]("station", root, "--http", f"127.0.0.1:{taken.getsockname()[1]}", "--review", review,
                          "--backbone-artifact", device["art"])
    one_error_line(r, "cannot listen on 127.0.0.1")
    assert r.exit_code == 2 and not review.exists()


def test_watching_the_review_inbox_is_refused(device, root, tmp_path):
    """--watch DIR/inbox with --review DIR used to feed every flagged copy back in: 1,000 rows of one image."""
    review = tmp_path / "lib"
    (review / "inbox" / "sub").mkdir(parents=True)
    before = sorted(p.name for p in root.iterdir())
    for watch in (review / "inbox", review / "inbox" / "sub", review / "inbox" / ".." / "inbox"):
        r = device["cli"]("station", root, "--watch", watch, "--review", review, "--backbone-artifact", device["art"])
        one_error_line(r, "where --review copies flagged images")
        assert r.exit_code == 2 and r.stdout == ""
    assert sorted(p.name for p in root.iterdir()) == before


def test_reject_reason_is_kept_on_one_line(device, root):
    """A --reason with a newline was stored as it was, and every later one-line message quoting it became two."""
    version = put_on_hold(root, device["pkgs"]["1.1.0"], device["pub"])
    one_error_line(device["cli"]("station", "reject", root, "--reason", " \n "), "--reason is empty")
    assert InstallRoot(root).read().held is not None  # the refusal left the trial on hold
    r = device["cli"]("station", "reject", root, "--reason", "bad\nerror: injected")
    assert r.exit_code == 0, r.output
    reason = InstallRoot(root).read().blocked[version]
    assert "\n" not in reason and reason.endswith("bad error: injected")


def test_a_second_station_on_the_same_database_is_refused(device, root, tmp_path):
    """Two stations on one database used to run side by side, each counting the canary's images and racing the
    other for the verdict."""
    watch = tmp_path / "in"
    watch.mkdir()
    first = start(root, watch, device["art"])
    try:
        wait_for(lambda: (root / "station.db.lock").exists() and (root / "station.db").exists(), proc=first)
        r = device["cli"]("station", root, "--watch", watch, "--canary", 5, "--backbone-artifact", device["art"])
        one_error_line(r, "another station is already running on")
        assert r.exit_code == 2 and InstallRoot(root).read().canary is None  # the refused one wrote no policy
    finally:
        code, _, err = stop(first)
    assert code == 0, err


@pytest.mark.parametrize("field, corrupt, says", [
    ("pinned", 5, "pinned is 5, not a version"),
    ("pinned", "", "pinned is \"\", not a version"),
    ("history", 5, "history is 5, not a list of records"),
    ("history", "garbage", "history is \"garbage\", not a list of records"),
])
def test_status_reports_a_corrupt_pin_or_history(device, root, field, corrupt, says):
    """A corrupt "pinned" was read as not pinned (update could install over the operator's hold) and a "history"
    that is a number was an internal error: each fails closed like every other corrupt field, one error line."""
    cli = device["cli"]
    state_path = root / "state.json"
    state = json.loads(state_path.read_text())
    state[field] = corrupt
    state_path.chmod(0o644)
    state_path.write_text(json.dumps(state))
    r = cli("station", "status", root)
    one_error_line(r, f"{state_path} is malformed ({says}")
    assert r.exit_code == 2 and r.stdout == ""
