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
import threading
import time
from pathlib import Path

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


# --- the station: canary verdicts on live images, hot swap under a stream ---------------------------------------

def job_for(path: Path, tag: str = ""):
    from edgekit.station.jobs import Job

    st = path.stat()
    return Job(key=f"watch:{tag}{path.name}:{st.st_size}:{st.st_mtime_ns}", source="watch", name=path.name, path=path)


STATUS = []


def wait_for(predicate, timeout=60.0, what="the station"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {STATUS[0]() if STATUS else None}")


def rows(db):
    from edgekit.station.store import ResultStore

    store = ResultStore(db, read_only=True)
    try:
        n = store.counts()["rows"]
        return sorted(store.recent(n + 10), key=lambda r: r["id"]), store.events(1000)[::-1]
    finally:
        store.close()


def start_station(device, db, **kw):
    from edgekit.station.models import StationModels
    from edgekit.station.service import Station

    s = Station(StationModels(device), db, **kw).start()
    STATUS[:] = [s.status]
    return s


def feed(station, jobs):
    for job in jobs:
        wait_for(lambda: station.submit(job), 30, "room in the queue")


def test_canary_rejects_a_bad_adapter_that_passes_its_health_check_and_promotes_a_good_one(env, tmp_path):
    hold(env, "1.1.0")  # the bad one: passed the health check on its own samples
    db = tmp_path / "station.db"
    station = start_station(env["device"], db, batch=4, station_id="line1")
    try:
        assert station.models.trial.version == "1.1.0" and station.models.serving.version == "1.0.0"
        feed(station, [job_for(p) for p in env["live"][:POLICY["images"]]])
        verdict = wait_for(lambda: station.last_verdict, what="the canary verdict")
        assert verdict["verdict"] == "reject" and verdict["action"] == "rejected" and verdict["images"] == 12
        assert verdict["agreement"] < POLICY["min_agreement"], verdict
        state = InstallRoot(env["device"]).read()
        assert state.trial is None and state.current["version"] == "1.0.0"
        assert state.blocked["1.1.0"].startswith("canary: agreement ") and "on 12 live images" in state.blocked["1.1.0"]
        assert state.history[-1]["action"] == "failed" and state.history[-1]["reason"] == state.blocked["1.1.0"]
        one_error_line(update(env), "1.1.0, the newest the repository offers, is blocked")
        wait_for(lambda: station.models.trial is None, what="the trial to be dropped")
        # the good one: published, held by update while the station runs, picked up between batches, promoted
        r = hold(env, "1.2.0")
        assert "1.0.0 is still in service" in r["reason"]
        wait_for(lambda: station.models.trial is not None, what="the station to load the trial")
        feed(station, [job_for(p, "2/") for p in env["live"][POLICY["images"]:]])
        verdict = wait_for(lambda: station.last_verdict if station.last_verdict["version"] == "1.2.0" else None,
                           what="the second verdict")
        assert verdict["verdict"] == "promote" and verdict["action"] == "promoted", verdict
        assert verdict["agreement"] >= POLICY["min_agreement"]
        state = InstallRoot(env["device"]).read()
        assert state.current["version"] == "1.2.0" and state.trial is None and "1.2.0" not in state.blocked
        assert state.history[-1]["action"] == "commit" and state.history[-1]["reason"].startswith("canary: agreement")
        wait_for(lambda: station.models.serving.version == "1.2.0", what="the swap to the promoted version")
        feed(station, [job_for(p, "3/") for p in env["live"][:3]])
        wait_for(lambda: station.status()["counts"]["images"] == len(env["live"]) + 3, what="the last images")
    finally:
        station.stop()
    results, events = rows(db)
    assert len(results) == len(env["live"]) + 3 and len({r["key"] for r in results}) == len(results)
    shadowed = [r for r in results if r["trial"] is not None]
    assert {r["trial"]["version"] for r in shadowed} == {"1.1.0", "1.2.0"}
    assert sum(r["trial"]["version"] == "1.1.0" for r in shadowed) == 12  # exactly the N images counted
    # the serving adapter answered every image; the bad trial said "b" for a's images and back
    bad = [r for r in shadowed if r["trial"]["version"] == "1.1.0"]
    assert all(r["class"] == r["name"][0] for r in results[:12])
    assert sum(r["trial"]["class"] != r["class"] for r in bad) >= 6
    assert [r["serving"]["version"] for r in results[-3:]] == ["1.2.0"] * 3
    verdicts = [e for e in events if e["kind"] == "canary"]
    assert [(e["version"], e["verdict"], e["action"]) for e in verdicts] == [("1.1.0", "reject", "rejected"),
                                                                             ("1.2.0", "promote", "promoted")]
    swaps = [e["detail"] for e in events if e["kind"] == "swap"]
    assert "trial 1.1.0 -> none" in swaps[0] and "trial none -> 1.2.0" in swaps[1]
    assert "serving 1.0.0 -> 1.2.0" in swaps[2]


def test_hot_swap_under_a_steady_stream_loses_and_duplicates_nothing(env, tmp_path):
    db = tmp_path / "station.db"
    publish(env, "1.2.0")
    stream = tmp_path / "stream"
    paths = live_images(stream, 40)  # 120 images
    station = start_station(env["device"], db, batch=4, queue_size=8)
    submitted = []
    done = threading.Event()

    def producer():
        for p in paths:
            job = job_for(p)
            wait_for(lambda: station.submit(job), 60, "room in the queue")
            submitted.append(job.key)
            time.sleep(0.004)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        wait_for(lambda: station.status()["counts"]["images"] >= 20, what="the first images")
        r = json.loads(ok(update(env, "--json")).stdout)  # commits 1.2.0 while images stream (no canary policy)
        assert r["action"] == "installed" and r["version"] == "1.2.0"
        at_swap = station.status()["counts"]["images"]
        wait_for(lambda: station.status()["counts"]["images"] >= at_swap + 20, what="images after the swap")
        ok(env["cli"]("rollback", "--root", env["device"]))  # and back, still streaming
        wait_for(done.is_set, 120, "the producer")
        wait_for(lambda: station.status()["counts"]["images"] == len(paths), what="every image")
    finally:
        thread.join(60)
        station.stop()
    results, events = rows(db)
    keys = [r["key"] for r in results]
    assert len(submitted) == len(paths) == len(results) and set(keys) == set(submitted) and len(set(keys)) == len(keys)
    assert all(r["decision"] in ("OK", "NG") for r in results)
    # every batch ran on one version; the versions in commit order: 1.0.0, then 1.2.0, then 1.0.0 again
    versions = [r["serving"]["version"] for r in results]
    runs = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert runs == ["1.0.0", "1.2.0", "1.0.0"], runs
    swaps = [e["detail"] for e in events if e["kind"] == "swap"]
    assert swaps == ["serving 1.0.0 -> 1.2.0", "serving 1.2.0 -> 1.0.0"]


def test_a_restarted_station_counts_the_canary_again_from_zero(env, tmp_path):
    hold(env, "1.2.0")
    db = tmp_path / "station.db"
    first = start_station(env["device"], db, batch=4)
    try:
        feed(first, [job_for(p) for p in env["live"][:8]])
        wait_for(lambda: first.status()["counts"]["images"] == 8, what="8 images")
        assert first.status()["canary"]["images"] == 8 and first.last_verdict is None
    finally:
        first.stop()
    assert InstallRoot(env["device"]).read().held["version"] == "1.2.0"  # no verdict on 8 of 12 images
    second = start_station(env["device"], db, batch=4)
    try:
        feed(second, [job_for(p, "again/") for p in env["live"][8:16]])
        wait_for(lambda: second.status()["counts"]["images"] == 8, what="8 more images")
        assert second.status()["canary"]["images"] == 8 and second.last_verdict is None  # 16 seen, 8 by this one
        feed(second, [job_for(p, "again/") for p in env["live"][16:20]])
        verdict = wait_for(lambda: second.last_verdict, what="the verdict")
        assert verdict["images"] == 12 and verdict["action"] == "promoted"
    finally:
        second.stop()
    assert InstallRoot(env["device"]).read().current["version"] == "1.2.0"


def test_a_held_trial_the_station_cannot_load_is_rejected(env, tmp_path):
    hold(env, "1.2.0")
    folder = env["device"] / InstallRoot(env["device"]).read().trial["dir"]
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.name != "health.safetensors")
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # bit rot after its health check
    weights.write_bytes(bytes(data))
    station = start_station(env["device"], tmp_path / "station.db", batch=4)
    try:
        verdict = wait_for(lambda: station.last_verdict, what="the verdict")
        assert verdict["action"] == "rejected" and verdict["images"] == 0
        assert verdict["reason"].startswith("canary: the station could not load it") and "sha256" in verdict["reason"]
        assert station.models.serving.version == "1.0.0" and station.models.trial is None
    finally:
        station.stop()
    state = InstallRoot(env["device"]).read()
    assert state.trial is None and state.blocked["1.2.0"] == verdict["reason"]


def test_the_verdict_and_every_result_are_published_on_mqtt(env, tmp_path, mqtt_broker):
    from test_station_outputs import Subscriber

    from edgekit.station.mqtt import MqttPublisher

    hold(env, "1.1.0")
    db = tmp_path / "station.db"
    sub = Subscriber(mqtt_broker, "plant/#")
    station = start_station(env["device"], db, batch=4, station_id="line1")
    station.publisher = MqttPublisher(db, "127.0.0.1", mqtt_broker.port, "plant", "line1", station.status).start()
    try:
        feed(station, [job_for(p) for p in env["live"][:POLICY["images"]]])
        verdict = wait_for(lambda: station.last_verdict, what="the verdict")
        assert verdict["action"] == "rejected"

        def published():
            results = [m for m in sub.messages if "key" in m and "decision" in m]
            canary = [m for m in sub.messages if m.get("kind") == "canary"]
            return (results, canary) if len(results) == POLICY["images"] and canary else None

        results, canary = wait_for(published, 30, "the results and the verdict on MQTT")
        assert len({r["key"] for r in results}) == POLICY["images"]
        assert canary[0]["version"] == "1.1.0" and canary[0]["reason"] == verdict["reason"]
        status = wait_for(lambda: [m for m in sub.messages if m.get("station") == "line1"
                                   and (m.get("last_verdict") or {}).get("version") == "1.1.0"], 30,
                          "a retained status with the verdict")
        assert status[-1]["serving"] == "1.0.0"
    finally:
        station.stop()
        station.publisher.stop()
        sub.close()


@pytest.fixture()
def mqtt_broker(tmp_path):
    from test_station_outputs import Broker, mosquitto_binary

    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run installs it as root)")
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed (pip install 'edgekit[station]')")
    folder = tmp_path / "broker"
    folder.mkdir()
    b = Broker(binary, folder).start()
    yield b
    b.stop()
