"""Drift / novelty flag (issue 22): the out-of-distribution score on real NEU-CLS images with a class left out,
the calibrated threshold, the drift file in packages, and the bounded review folder that `edgekit adapt` takes
after labelling.

The NEU subset: the first 60 images (file-name order) of each of the six classes, pooled EfficientNet-Lite0
features computed once per module (cached on disk under the module's temp folder, so `edgekit adapt` in the
review test reads the same cache). Per class: 40 to train (a third held out: holdout_split 1/3, seed 0).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.mlff.drift import (DRIFT_NAME, ENERGY, INBOX, MAHALANOBIS, REVIEW_LOG, DriftScorer, ReviewFolder, auroc,
                                calibration_split)

PER_CLASS = 60
# AUROC bound for the test folds, from measurement on this subset (adapter on 200 images, 20 calibration
# images; benchmarks/drift_auroc.py on the full data: 0.991-0.999): scratches 0.993, rolled-in_scale 0.948
# (the hardest of the six here; crazing 0.992, inclusion 0.976, patches 0.977, pitted_surface 0.996)
AUROC_BOUND = 0.90


@pytest.fixture(scope="module")
def neu_subset(neu, tmp_path_factory):
    torch = pytest.importorskip("torch", reason="adapt side (add_task) needs torch")
    from edgekit.backends.registry import MissingBackendError
    from edgekit.models.backbones import load_backbone
    from edgekit.train.continual import extract_features, task_data_from_folder

    try:
        bb = load_backbone("efficientnet-lite0")
    except MissingBackendError as e:
        pytest.skip(str(e))
    full = task_data_from_folder(neu)
    paths, labels = [], []
    for c in range(len(full.classes)):
        mine = sorted((p for p, y in zip(full.paths, full.labels) if y == c), key=lambda p: p.name)[:PER_CLASS]
        paths += mine
        labels += [c] * len(mine)
    work = tmp_path_factory.mktemp("drift")
    # one thread: these are small matrix products, and on a shared 2-core machine two threads per process
    # made each adapter training 5-10x slower (measured 0.9-1.8 s vs 7-16 s at load 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    feats = extract_features(bb, paths, work / "cache", progress=False).numpy()
    yield {"bb": bb, "paths": paths, "labels": np.array(labels), "classes": full.classes, "feats": feats,
           "work": work}
    torch.set_num_threads(threads)


def fold(s, left_out: str, tmp: Path, **kw):
    """add_task on the other five classes' training part; returns (summary, station scorer, in, out features)."""
    import torch

    from edgekit.data.datasets import ClassSample, holdout_split
    from edgekit.mlff.adapter import load_adapter_arrays
    from edgekit.train.continual import TaskData, add_task

    out = s["classes"].index(left_out)
    keep = [c for c in range(len(s["classes"])) if c != out]
    samples = [ClassSample(p, keep.index(y)) for p, y in zip(s["paths"], s["labels"]) if y != out]
    train, test = holdout_split(samples, 1 / 3, seed=0)
    pos = {p: i for i, p in enumerate(s["paths"])}
    td = TaskData([x.path for x in train], [x.label for x in train], [s["classes"][c] for c in keep])
    r = add_task(tmp / "reg", s["bb"], "neu5", td, feats=torch.from_numpy(s["feats"][[pos[p] for p in td.paths]]),
                 cache_dir=None, **kw)
    arrays, meta = load_adapter_arrays(r["adapter_folder"])  # the station's path: numpy, from the saved folder
    scorer = DriftScorer.from_adapter(arrays, {**meta, "folder": r["adapter_folder"]})
    x_in = s["feats"][[pos[x.path] for x in test]]
    x_out = s["feats"][s["labels"] == out]
    return r, scorer, x_in, x_out, td


@pytest.mark.parametrize("left_out", ["scratches", "rolled-in_scale"])
def test_ood_score_separates_a_left_out_class(neu_subset, tmp_path, left_out):
    r, scorer, x_in, x_out, _ = fold(neu_subset, left_out, tmp_path)
    assert scorer.method == MAHALANOBIS and r["drift"]["method"] == MAHALANOBIS
    s_in, s_out = scorer.score(x_in), scorer.score(x_out)
    a = auroc(s_in, s_out)
    assert a >= AUROC_BOUND, f"AUROC {a:.3f} for left-out {left_out}"
    # the threshold flags the new class far more often than the adapter's own held-out images (measured: 88 % vs
    # 2 % with scratches left out, 65 % vs 3 % with rolled-in_scale)
    assert scorer.flagged(s_out).mean() > 0.5 > 0.1 >= scorer.flagged(s_in).mean()


def test_threshold_is_calibrated_on_held_out_images(neu_subset, tmp_path):
    # a 90th percentile on 30 % of each class (60 calibration images): the rate on new in-distribution images
    # (never trained on, never calibrated on) comes out near 10 %: measured 11 % here (scratches left out; 5-21 %,
    # mean 10.7 %, over the six folds of this subset)
    r, scorer, x_in, _, td = fold(neu_subset, "scratches", tmp_path, drift_holdout=0.3, drift_percentile=90.0)
    d = r["drift"]
    assert (d["percentile"], d["calibration"], d["calibrated_on"]) == (90.0, "held-out images", 60)
    assert d["fitted_on"] == len(td.paths) - 60 and r["images"] == len(td.paths)
    assert d["expected_flag_rate"] == pytest.approx(0.1)
    rate = scorer.flagged(scorer.score(x_in)).mean()
    assert 0.03 <= rate <= 0.2, f"flags {rate:.3f} of held-out in-distribution images at the 90th percentile"
    # the threshold is the percentile of the calibration images' scores (numpy embedding here, PyTorch at adapt
    # time: the same numbers to float32 rounding)
    _, cal = calibration_split(td.labels, 0.3, 0)
    x_cal = neu_subset["feats"][[neu_subset["paths"].index(td.paths[i]) for i in cal]]
    assert scorer.threshold == pytest.approx(np.percentile(scorer.score(x_cal), 90, method="weibull"), rel=1e-4)
    assert d["calibration_flag_rate"] == pytest.approx(scorer.flagged(scorer.score(x_cal)).mean(), abs=1 / 60)
    # the calibration images were kept out of the adapter's training
    meta = json.loads((Path(r["adapter_folder"]) / "adapter.json").read_text())
    assert meta["training"]["images"] == len(td.paths) - 60 and meta["drift"] == d


def test_default_calibration_and_file_size(neu_subset, tmp_path):
    r, scorer, x_in, x_out, td = fold(neu_subset, "inclusion", tmp_path)
    d = r["drift"]
    # 10 % of 40 per class = 4 x 5 classes: the minimum (20) to hold out; at p99 it is their largest score
    assert (d["percentile"], d["calibrated_on"], d["dim"], d["classes"]) == (99.0, 20, 160, 5)
    assert d["expected_flag_rate"] == pytest.approx(1 / 21, abs=1e-4)
    size = (Path(r["adapter_folder"]) / DRIFT_NAME).stat().st_size
    assert size == d["bytes"] and 40_000 < size < 64 * 1024  # 5 x 160 means + a packed 160 x 160 triangle
    assert scorer.flagged(scorer.score(x_in)).mean() <= 0.1


def test_round_trip_and_refusals(tmp_path):
    from edgekit.mlff.adapter import load_weights_bytes

    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 12)).astype(np.float32) + np.repeat(np.eye(3, 12, dtype=np.float32) * 4, 100, axis=0)
    groups = np.repeat([0, 1, 2], 100)
    fitted = DriftScorer.fit(MAHALANOBIS, z[::2], groups[::2]).calibrate(
        DriftScorer.fit(MAHALANOBIS, z[::2], groups[::2]).score(embedding=z[1::2]), 95)
    info = fitted.meta(fitted_on=150)
    loaded = DriftScorer.from_arrays(load_weights_bytes(DRIFT_NAME, fitted.to_bytes()), json.loads(json.dumps(info)))
    probe = rng.normal(size=(50, 12)).astype(np.float32) * 3
    assert np.array_equal(loaded.score(embedding=probe), fitted.score(embedding=probe))
    assert loaded.threshold == fitted.threshold and loaded.dim == 12 and info["dim"] == 12
    # far from every class mean scores higher than a class mean itself
    assert fitted.score(embedding=np.full((1, 12), 50, np.float32))[0] > fitted.score(embedding=z[:1] * 0 + z[:100].mean(0))[0]
    # the energy score: no statistics, only the threshold
    e = DriftScorer.fit(ENERGY).calibrate(DriftScorer.fit(ENERGY).score(logits=z[:, :3]), 99)
    e2 = DriftScorer.from_arrays(load_weights_bytes(DRIFT_NAME, e.to_bytes()), e.meta())
    assert np.array_equal(e2.score(logits=probe[:, :3]), e.score(logits=probe[:, :3]))
    # an adapter saved before drift statistics existed: no scorer (the station reports drift unavailable)
    assert DriftScorer.from_adapter({}, {"task": "t"}) is None
    arrays = fitted.to_arrays()
    for bad_arrays, bad_info, phrase in [
            ({**arrays, "whiten": arrays["whiten"][:-1]}, info, "packed 12x12"),
            ({**arrays, "means": arrays["means"][:, :5]}, info, "classes x 12"),
            ({**arrays, "means": arrays["means"] * np.nan}, info, "non-finite"),
            (arrays, {**info, "threshold": info["threshold"] + 1}, "differs from adapter.json"),
            (arrays, {**info, "method": "knn"}, "unknown method")]:
        with pytest.raises(EdgekitError, match=phrase):
            DriftScorer.from_arrays(bad_arrays, bad_info)


def test_package_carries_drift_and_a_tampered_drift_file_is_refused(neu_subset, tmp_path, cli):
    from edgekit.mlff.adapter import load_adapter_arrays
    from edgekit.ota import active_adapter_dir, build_package, generate_keypair, install_package
    from edgekit.ota.keys import load_private_key
    from edgekit.ota.package import seal_archive

    r, scorer, x_in, _, _ = fold(neu_subset, "patches", tmp_path)
    folder = Path(r["adapter_folder"])
    private, public, _ = generate_keypair(tmp_path / "keys")
    pkg = tmp_path / "neu5-1.0.0.zip"
    manifest = build_package(folder, private, "1.0.0", pkg)
    entry = {e["name"]: e for e in manifest["files"]}[DRIFT_NAME]
    assert entry["sha256"] == hashlib.sha256((folder / DRIFT_NAME).read_bytes()).hexdigest()
    root = tmp_path / "device"
    install_package(pkg, root, [public])
    installed = active_adapter_dir(root)
    assert (installed / DRIFT_NAME).read_bytes() == (folder / DRIFT_NAME).read_bytes()
    arrays, meta = load_adapter_arrays(installed)
    on_device = DriftScorer.from_adapter(arrays, {**meta, "folder": str(installed)})
    assert on_device.threshold == scorer.threshold
    assert np.array_equal(on_device.score(x_in), scorer.score(x_in))

    # one flipped byte in the drift file, the archive resealed by the (trusted) signer: refused at install
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(pkg) as zin, zipfile.ZipFile(tampered, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "payload/" + DRIFT_NAME:
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(info, data)
    tampered.write_bytes(seal_archive(tampered.read_bytes(), load_private_key(private)))
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    res = cli("install", tampered, "--root", root, "--pubkey", public, "--allow-downgrade")
    assert res.exit_code == 2 and res.stdout == ""
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "does not match its sha256" in lines[0] and DRIFT_NAME in lines[0], res.stderr
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before

    # an adapter folder whose drift file does not load is never packaged
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / DRIFT_NAME).write_bytes(b"not safetensors")
    with pytest.raises(EdgekitError, match="not a valid safetensors"):
        build_package(broken, private, "1.0.1", tmp_path / "broken.zip")
    assert not (tmp_path / "broken.zip").exists()
    # re-saving an adapter's tensors without its drift file (e.g. edited weights) drops the stale statistics
    from edgekit.mlff.adapter import load_adapter, read_adapter_meta, save_adapter

    tensors, meta = load_adapter(folder)
    resaved = save_adapter(tmp_path / "resaved", tensors, meta)
    assert "drift" not in read_adapter_meta(resaved) and not (resaved / DRIFT_NAME).exists()
    assert DriftScorer.from_adapter(*load_adapter_arrays(resaved)) is None


def png_bytes(value: int, tmp: Path) -> bytes:
    from edgekit.data.images import write_png

    write_png(tmp / "x.png", np.full((8, 8), value, np.uint8))
    return (tmp / "x.png").read_bytes()


def test_review_folder_is_bounded(tmp_path):
    def png(i):
        return png_bytes(i, tmp_path)

    review = ReviewFolder(tmp_path / "rev", max_files=3, max_bytes=10_000)
    info = {"score": 123.5, "threshold": 99.0, "class": "crazing", "serving": {"version": "1.0.0"},
            "inf": float("inf")}
    results = [review.offer(png(i), f"cam 1/{i}.png", info) for i in range(5)]
    assert results == [True, True, True, False, False]
    st = review.stats()
    assert (st["files"], st["copied"], st["refused"]) == (3, 3, 2)
    inbox = tmp_path / "rev" / INBOX
    files = sorted(p.name for p in inbox.iterdir() if p.name != REVIEW_LOG)
    assert len(files) == 3 and all(re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-\d\.png", f) for f in files), files
    assert not any(f.startswith(".") for f in files)  # no temporary file left behind
    lines = [json.loads(x) for x in (inbox / REVIEW_LOG).read_text().splitlines()]
    assert [x["file"] for x in lines] == files and lines[0]["score"] == 123.5 and lines[0]["inf"] is None
    assert lines[0]["name"] == "cam 1/0.png" and lines[0]["serving"] == {"version": "1.0.0"}
    # too many bytes: refused even with file slots free
    big = ReviewFolder(tmp_path / "big", max_files=100, max_bytes=len(png(0)) + 10)
    assert big.offer(png(0), "a.png") and not big.offer(png(1), "b.png")
    # a name without an image extension gets one from the bytes, so `edgekit adapt` reads the file
    other = ReviewFolder(tmp_path / "ext")
    assert other.offer(png(3), "upload")
    assert [p.suffix for p in (tmp_path / "ext" / INBOX).iterdir() if p.name != REVIEW_LOG] == [".png"]
    # labelling (moving files out of the inbox) makes room again; a restarted folder counts what is there
    (tmp_path / "rev" / "crazing").mkdir()
    shutil.move(str(inbox / files[0]), tmp_path / "rev" / "crazing" / files[0])
    review.RESCAN_S = 0.0
    assert review.offer(png(9), "again.png") and not review.offer(png(10), "more.png")
    assert ReviewFolder(tmp_path / "rev", max_files=3).stats()["files"] == 3
    # a source that vanished before the copy: False, counted, nothing written
    assert not other.offer(tmp_path / "gone.png", "gone.png") and other.stats()["errors"] == 1
    assert len(list((tmp_path / "ext" / INBOX).iterdir())) == 2  # the one image and review.jsonl


def test_labelled_review_folder_is_taken_by_adapt(neu_subset, tmp_path, cli):
    s = neu_subset
    review = ReviewFolder(tmp_path / "review")
    picked = {"crazing": [], "scratches": []}
    for cls in picked:
        c = s["classes"].index(cls)
        for i, p in enumerate([p for p, y in zip(s["paths"], s["labels"]) if y == c][:8]):
            # half offered as a path (watch folder), half as bytes with a bare name (HTTP upload)
            assert review.offer(p if i % 2 else p.read_bytes(), p.name if i % 2 else "upload",
                                {"score": 1e4, "class": "inclusion"})
            picked[cls].append(json.loads((review.log.read_text().splitlines())[-1])["file"])
    res = cli("adapt", "--task", "t", "--data", tmp_path / "review", "--registry", tmp_path / "reg0")
    assert res.exit_code == 2 and "inbox" in res.stderr and "error: no class folders" in res.stderr
    # the operator labels: moves the images into class folders; one stays unlabelled in the inbox
    for cls, names in picked.items():
        (tmp_path / "review" / cls).mkdir()
        for name in names[:-1] if cls == "scratches" else names:
            shutil.move(str(review.inbox / name), tmp_path / "review" / cls / name)
    res = cli("adapt", "--task", "new-product", "--data", tmp_path / "review", "--registry", tmp_path / "reg",
              "--cache", s["work"] / "cache", "--epochs", "3", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["classes"] == ["crazing", "scratches"] and out["images"] == 15
    assert "drift: mahalanobis-embedding" in res.stderr and out["drift"]["calibration"] == "training images"
    res = cli("adapt", "--task", "t2", "--data", tmp_path / "review", "--classes", "inbox", "--registry",
              tmp_path / "reg2")
    assert res.exit_code == 2 and "reserved" in res.stderr


@pytest.mark.parametrize("rehearsal", [0, 10])
def test_second_task_statistics_cover_the_earlier_classes_through_rehearsal(neu_subset, tmp_path, rehearsal):
    import torch

    from edgekit.train.continual import TaskData, add_task

    s = neu_subset

    def task(names):
        idx = [i for i, y in enumerate(s["labels"]) if s["classes"][y] in names]
        td = TaskData([s["paths"][i] for i in idx], [names.index(s["classes"][s["labels"][i]]) for i in idx], names)
        return td, torch.from_numpy(s["feats"][idx])

    td, x = task(["crazing", "inclusion"])
    add_task(tmp_path / "reg", s["bb"], "a", td, feats=x, cache_dir=None, rehearsal=rehearsal, epochs=5)
    td, x = task(["patches"])
    d = add_task(tmp_path / "reg", s["bb"], "b", td, feats=x, cache_dir=None, rehearsal=rehearsal, epochs=5)["drift"]
    if rehearsal:  # the earlier classes' exemplars are part of the fit: one mean per class of the adapter
        assert d["classes"] == 3 and "covers" not in d and d["fitted_on"] == 60 + 2 * rehearsal  # 6 held out < 20: none
    else:  # without them only the new class has a mean, and adapt says so
        assert d["classes"] == 1 and d["covers"] == "1 of 3 classes"


def test_station_side_needs_no_torch(neu_subset, tmp_path):
    """The station's path (adapter folder -> DriftScorer -> scores, the review folder) in a process where
    importing torch fails: the same scores as here."""
    import subprocess
    import sys

    r, scorer, x_in, x_out, _ = fold(neu_subset, "crazing", tmp_path)
    x = np.concatenate([x_in[:10], x_out[:10]])
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, json, numpy as np\n"
        "sys.modules['torch'] = None  # any import of torch raises ImportError\n"
        "from edgekit.mlff.adapter import load_adapter_arrays\n"
        "from edgekit.mlff.drift import DriftScorer, ReviewFolder\n"
        f"folder = {str(r['adapter_folder'])!r}\n"
        "arrays, meta = load_adapter_arrays(folder)\n"
        "s = DriftScorer.from_adapter(arrays, {**meta, 'folder': folder})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"ok = ReviewFolder({str(tmp_path / 'review')!r}).offer(b'\\x89PNG\\r\\n\\x1a\\n', 'a', {{'score': 1.0}})\n"
        "print(json.dumps({'scores': s.score(x).tolist(), 'threshold': s.threshold, 'copied': ok}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["threshold"] == scorer.threshold and out["copied"]
    assert np.array_equal(np.array(out["scores"]), scorer.score(x))
