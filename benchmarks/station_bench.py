"""Station throughput and latency: images dropped in a watch folder -> committed SQLite rows, against the bare
``runtime.infer`` rate of the same backbone artifact on the same machine (issue 22: >= 90 %, p99 reported).

    python benchmarks/station_bench.py --work /tmp/edgekit-station-bench --out benchmarks/out/station.json

Setup (once, cached in --work; needs the dev install: torch, onnxruntime): the published GMBINet checkpoint from
../shared as the MLFF backbone (512 x 512), an adapter trained on SD-Saliency-900 train images (In/Pa/Sc, a few
per class), the backbone compiled to an artifact (--target, default onnx fp32), the adapter packaged, signed and
installed into an install root with ``edgekit keygen/package/install`` (the paths a plant takes).

Measured, interleaved over --rounds (the order of the three rotates per round, so drift in the machine's load
falls on all):
  bare      ``runtime.load(artifact).infer`` on batches of --batch already preprocessed images: the images per
            second of the artifact alone (no decoding, preprocessing, heads, decision or storage);
  station   a fresh result database and an empty watch folder per round; a ``Station`` (S1's service) with a
            ``WatchInput``; --images SD-900 test images are renamed into the folder at once (written under a
            hidden temporary name first, as the README tells line software), the clock runs from the first
            rename to the last row's commit time (the ``committed`` column).
  direct    the same service without the watch input (Jobs submitted straight to ``Station.submit``): what the
            input itself costs;
  serial    with --serial: "station" with ``Station(prefetch=False)``, the worker decoding and preprocessing each
            batch itself in series with the inference (the service before its prepare thread), for a before/after
            in one run.
Then one paced run for latency: the images arrive at --pace of the slowest station round's rate, each file's
appearance (the moment after its rename) -> its row's commit time; p50/p90/p99/max (with --serial, the same paced
run through the serial station too).

On a shared machine the rates swing several-fold within seconds (other processes): read the per-round ratios
and the load averages, not the medians alone.

Prints and writes (--out) one JSON document: per-round rates, median and min-max of each, the ratio per round
and its median, the latencies, the load average before and after, the machine's CPU count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
CKPT = SHARED / "checkpoints" / "gmbinet_sd900_official.pt"
SD900 = SHARED / "datasets" / "sd-saliency-900"
TASK = "sd900-defects"


def cli(*args) -> str:
    from click.testing import CliRunner

    from edgekit.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if r.exit_code != 0:
        raise SystemExit(f"edgekit {' '.join(map(str, args[:2]))} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def setup(work: Path, target: str, per_class: int, epochs: int) -> dict:
    """The artifacts and the install root, built once (``work/ready.json`` says they are complete)."""
    done = work / "ready.json"
    if done.exists():
        return json.loads(done.read_text())
    from edgekit.mlff.registry import Registry
    from edgekit.models.backbones import load_backbone
    from edgekit.pipeline.compile import compile_model
    from edgekit.train.continual import add_task, task_data_from_folder

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    split = json.loads((SD900 / "split.json").read_text())
    data = work / "train"
    classes = split["classes"]  # prefix -> class name
    for prefix, name in classes.items():
        (data / name).mkdir(parents=True)
        for stem in [s for s in split["train"] if s.startswith(prefix + "_")][:per_class]:
            os.symlink(SD900 / "Source Images" / f"{stem}.bmp", data / name / f"{stem}.bmp")
    reg = work / "registry"
    t = time.time()
    add_task(reg, load_backbone(str(CKPT)), TASK, task_data_from_folder(data), epochs=epochs, rehearsal=0,
             cache_dir=None)
    print(f"adapter trained in {time.time() - t:.0f} s", file=sys.stderr)
    adapter = Registry.open(reg).adapter_folder()
    art = work / f"backbone_{target}"
    compile_model(str(reg), target, "fp32", str(art), log=lambda *_: None)
    cli("keygen", "--out", work / "key")
    pkg = work / f"{TASK}-1.0.0.zip"
    cli("package", adapter, "--key", work / "key" / "private_key.pem", "--version", "1.0.0", "--out", pkg,
        "--samples", data / "scratches")
    device = work / "device"
    cli("install", pkg, "--root", device, "--pubkey", work / "key" / "public_key.pem", "--backbone", art)
    ready = {"artifact": str(art), "root": str(device), "target": target}
    done.write_text(json.dumps(ready))
    return ready


def test_images(n: int) -> list:
    split = json.loads((SD900 / "split.json").read_text())
    return [SD900 / "Source Images" / f"{s}.bmp" for s in split["test"][:n]]


def bare_rate(runner, batches: list) -> float:
    n = sum(len(b) for b in batches)
    t = time.perf_counter()
    for b in batches:
        runner.infer(b)
    return n / (time.perf_counter() - t)


def rows(db: Path) -> list:
    """(name, committed) of every result row, read-only (the station's own connection is not disturbed)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [(json.loads(r)["name"], c) for r, c in con.execute("SELECT result, committed FROM results")]
    finally:
        con.close()


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def station_run(models, images: list, work: Path, batch: int, pace_s: float = 0.0, timeout_s: float = 600.0,
                direct: bool = False, prefetch: bool = True):
    """One station over a fresh database and folder; the images renamed in (all at once, or one every
    ``pace_s``). Returns (appeared: {name: time}, rows: [(name, committed)], first rename time).
    ``direct``: no watch folder; each image is a Job submitted straight to the station (what the service costs
    without the input), retried while the queue is full."""
    from edgekit.station.inputs import WatchInput
    from edgekit.station.jobs import Job
    from edgekit.station.service import Station

    run = work / f"run-{time.time_ns()}"
    folder = run / "in"
    folder.mkdir(parents=True)
    db = run / "station.db"
    for p in images:  # written under hidden names first (not counted), so the clock covers no disk copy
        shutil.copyfile(p, folder / f".{p.name}.tmp")
    station = Station(models, db, batch=batch, queue_size=64, prefetch=prefetch).start()
    watch = None if direct else WatchInput(folder, station.submit, station.seen).start()
    appeared = {}
    try:
        t0 = time.time()
        for p in images:
            os.rename(folder / f".{p.name}.tmp", folder / p.name)
            appeared[p.name] = time.time()
            if direct:
                job = Job(key=f"direct:{p.name}", source="watch", name=p.name, path=folder / p.name,
                          received=appeared[p.name])
                while not station.submit(job):
                    time.sleep(0.005)
            if pace_s:
                time.sleep(max(0.0, t0 + pace_s * len(appeared) - time.time()))
        end = time.monotonic() + timeout_s
        while count_rows(db) < len(images):
            if time.monotonic() > end:
                raise SystemExit(f"the station committed {count_rows(db)} of {len(images)} rows in {timeout_s} s")
            time.sleep(0.02)
    finally:
        if watch is not None:
            watch.stop()
        station.stop()
    got = rows(db)
    shutil.rmtree(run, ignore_errors=True)
    return appeared, got, t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-station-bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--target", default="onnx", help="compile target of the backbone artifact (default onnx)")
    ap.add_argument("--images", type=int, default=96, help="images per station round (SD-900 test images; "
                    "a burst: the first and last batch are fixed costs, so fewer images understate a steady line)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="inference threads (both sides; default: the runtime's)")
    ap.add_argument("--pace", type=float, default=0.7, help="latency run: arrival rate as a fraction of the "
                    "slowest measured station round (default 0.7: below capacity, so the latency is not a queue)")
    ap.add_argument("--serial", action="store_true", help="also measure the station without its prepare thread "
                    "(Station(prefetch=False)), interleaved with the others")
    ap.add_argument("--per-class", type=int, default=10, help="adapter training images per class")
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args(argv)
    if not (CKPT.exists() and SD900.exists()):
        raise SystemExit(f"needs {CKPT} and {SD900} (../shared)")

    from edgekit import runtime
    from edgekit.data.images import read_gray
    from edgekit.mlff.runner import CompiledBackbone
    from edgekit.station.models import StationModels

    load_before = os.getloadavg()
    ready = setup(a.work, a.target, a.per_class, a.epochs)
    images = test_images(a.images)
    cb = CompiledBackbone(ready["artifact"], threads=a.threads)
    x = cb.preprocess([read_gray(p) for p in images])
    batches = [np.ascontiguousarray(x[i:i + a.batch]) for i in range(0, len(x), a.batch)]
    runner = runtime.load(ready["artifact"], threads=a.threads)
    runner.infer(batches[0])  # warm both before the clock
    models = StationModels(ready["root"], backbone_artifact=ready["artifact"], threads=a.threads)
    models.run([read_gray(images[0])])

    bare, station, direct, serial = [], [], [], []
    sides = ["bare", "station", "direct"] + (["serial"] if a.serial else [])
    for r in range(a.rounds):
        k = r % len(sides)
        for side in sides[k:] + sides[:k]:  # rotated each round
            if side == "bare":
                bare.append(bare_rate(runner, batches))
            else:
                appeared, got, t0 = station_run(models, images, a.work, a.batch, direct=side == "direct",
                                                prefetch=side != "serial")
                assert sorted(n for n, _ in got) == sorted(appeared), "rows do not match the images dropped"
                {"station": station, "direct": direct, "serial": serial}[side].append(
                    len(got) / (max(c for _, c in got) - t0))
        print(f"round {r + 1}: bare {bare[-1]:.2f} img/s, station {station[-1]:.2f} img/s "
              f"({station[-1] / bare[-1]:.1%}), without the watch input {direct[-1]:.2f} img/s"
              + (f", serial {serial[-1]:.2f} img/s ({serial[-1] / bare[-1]:.1%})" if serial else "")
              + f" (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    ratios = [s / b for s, b in zip(station, bare)]
    rate = statistics.median(station)
    arrival = a.pace * min(station + serial)  # the slowest round: a loaded moment must not make the latency a queue

    def latency(prefetch: bool) -> dict:
        appeared, got, _ = station_run(models, images, a.work, a.batch, pace_s=1.0 / arrival, prefetch=prefetch)
        lat = np.array(sorted(c - appeared[n] for n, c in got))
        return {"arrival_img_s": arrival, "n": int(len(lat)), "p50": float(np.percentile(lat, 50)),
                "p90": float(np.percentile(lat, 90)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
                "what": "file appeared (after its rename into the folder) -> its row's commit time"}
    doc = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "artifact": {"target": ready["target"], "path": ready["artifact"], "backbone": str(CKPT.name),
                     "input": list(cb.input_spec["shape"])},
        "images": len(images), "batch": a.batch, "threads": a.threads, "rounds": a.rounds,
        "bare_img_s": {"rounds": bare, "median": statistics.median(bare), "min": min(bare), "max": max(bare)},
        "station_img_s": {"rounds": station, "median": rate, "min": min(station), "max": max(station)},
        "direct_img_s": {"rounds": direct, "median": statistics.median(direct), "min": min(direct),
                         "max": max(direct), "what": "the service without the watch input: Jobs submitted directly"},
        "ratio": {"rounds": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                  "target": 0.90},
        "latency_s": latency(True),
    }
    if serial:
        sratios = [s / b for s, b in zip(serial, bare)]
        doc["serial_img_s"] = {"rounds": serial, "median": statistics.median(serial), "min": min(serial),
                               "max": max(serial), "what": "station without its prepare thread (prefetch=False)"}
        doc["serial_ratio"] = {"rounds": sratios, "median": statistics.median(sratios), "min": min(sratios),
                               "max": max(sratios)}
        doc["serial_latency_s"] = latency(False)
        doc["machine"]["loadavg_after"] = os.getloadavg()
    text = json.dumps(doc, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
