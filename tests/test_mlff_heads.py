"""The MLFF adapter heads in numpy (edgekit.mlff.heads, what a station runs without torch) against the PyTorch
heads (edgekit.models.mlff.MLFFAdapter) on real NEU-CLS images: adapters trained by edgekit's own continual
learning on the fleet's backbone (EfficientNet-Lite0; a small GMBINet where its weights package is missing),
evaluated on held-out images of every class. Top-1 agreement must be 100 % and the logits agree within
MAX_ABS_LOGIT_DIFF (measured: about 1e-6; float32 matrix products summed in another order)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is the PyTorch adapter; torch is not installed")

from edgekit.errors import EdgekitError, MissingBackendError  # noqa: E402
from edgekit.mlff.adapter import load_adapter, load_adapter_arrays  # noqa: E402
from edgekit.mlff.classifier import MLFFClassifier  # noqa: E402
from edgekit.mlff.heads import NumpyAdapter, head_logits  # noqa: E402
from edgekit.mlff.registry import Registry  # noqa: E402
from edgekit.models.mlff import MLFFAdapter, adapter_from_tensors  # noqa: E402
from edgekit.models.mlff_spec import adapter_shapes  # noqa: E402

MAX_ABS_LOGIT_DIFF = 1e-4  # the bound the test holds; the measured difference is printed (-s) and far below
CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
TRAIN, TEST = 6, 6  # images per class: the first TRAIN to train on, the next TEST held out


def _backbone(tmp_path_factory):
    from edgekit.models.backbones import load_backbone

    try:
        return load_backbone("efficientnet-lite0")
    except MissingBackendError:  # the fleet's backbone needs its weights package; a small GMBINet stands in
        from edgekit.data.preprocess import PreprocessSpec
        from edgekit.models.checkpoint import Checkpoint
        from edgekit.models.gmbinet import GMBINet, GMBINetConfig

        torch.manual_seed(0)
        net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
        path = tmp_path_factory.mktemp("bb") / "tiny.pt"
        return load_backbone(str(Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(64, 64))).save(path)))


@pytest.fixture(scope="module")
def neu_setup(neu, tmp_path_factory):
    from edgekit.data.images import read_gray
    from edgekit.train.continual import TaskData, add_task

    bb = _backbone(tmp_path_factory)
    files = {c: sorted((neu / c).glob("*.jpg"), key=lambda p: p.name)[:TRAIN + TEST] for c in CLASSES}
    with torch.no_grad():
        feats = {c: bb.pooled(bb.preprocess([read_gray(p) for p in fs])).float() for c, fs in files.items()}

    def task(names):
        paths = [p for c in names for p in files[c][:TRAIN]]
        labels = [i for i, c in enumerate(names) for _ in range(TRAIN)]
        return TaskData(paths, labels, list(names)), torch.cat([feats[c][:TRAIN] for c in names])

    root = tmp_path_factory.mktemp("heads")
    regs = {}
    for setting in ("class-incremental", "task-incremental"):
        reg = root / setting
        for name, names in (("t1", CLASSES[:3]), ("t2", CLASSES[3:])):  # two tasks: a grown head / a second head
            data, f = task(names)
            add_task(reg, bb, name, data, setting=setting, epochs=30, rehearsal=2, cache_dir=None, feats=f, distill=1.0)
        regs[setting] = reg
    test_feats = np.concatenate([feats[c][TRAIN:].numpy() for c in CLASSES])
    return {"regs": regs, "feats": test_feats, "backbone": bb}


@pytest.mark.parametrize("setting", ["class-incremental", "task-incremental"])
def test_numpy_heads_agree_with_pytorch_on_neu(neu_setup, setting):
    folder = Registry.open(neu_setup["regs"][setting]).adapter_folder()
    arrays, meta = load_adapter_arrays(folder)
    tensors, _ = load_adapter(folder)
    ours, ref = NumpyAdapter(arrays, meta["config"]), adapter_from_tensors(tensors, meta["config"])
    feats = neu_setup["feats"]
    assert feats.shape[0] == TEST * len(CLASSES)
    got = ours.head_logits(feats)
    with torch.no_grad():
        z = ref.embed(torch.from_numpy(feats))
        want = [h(z).numpy() for h in ref.heads]
    assert len(got) == len(want) == (1 if setting == "class-incremental" else 2)
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    agree = min(float((g.argmax(1) == w.argmax(1)).mean()) for g, w in zip(got, want))
    print(f"\n{setting} on {meta['backbone']}: {feats.shape[0]} held-out NEU images, top-1 agreement "
          f"{agree:.0%}, max abs logit difference {worst:.3g}")
    assert agree == 1.0
    assert worst <= MAX_ABS_LOGIT_DIFF
    assert all(g.dtype == np.float32 for g in got)
    # the classifier's answers (class, probability) are the same on either adapter
    a, b = MLFFClassifier(None, ours, meta), MLFFClassifier(None, ref, meta)
    for t in ([None] if setting == "class-incremental" else [None, "t1", "t2"]):
        pa, pb = a.predict_features(feats, t), b.predict_features(torch.from_numpy(feats), t)
        assert [p["class"] for p in pa] == [p["class"] for p in pb]
        assert max(abs(x["prob"] - y["prob"]) for x, y in zip(pa, pb)) < 1e-5
    # head_logits on the PyTorch adapter gives the same arrays the reference computed
    assert all(np.array_equal(x, y) for x, y in zip(head_logits(ref, feats), want))


@pytest.mark.parametrize("tap_dims,fc_dim,heads", [([8, 8, 16, 16], 32, [3]), ([24, 40, 112, 320], 160, [3, 3]),
                                                   ([5], 7, [1, 2, 9]), ([3, 3, 3], 10, [])])
def test_adapter_shapes_are_the_pytorch_state_dict(tap_dims, fc_dim, heads):
    with torch.device("meta"):
        sd = MLFFAdapter(tap_dims, fc_dim, heads).state_dict()
    assert list(adapter_shapes(tap_dims, fc_dim, heads).items()) == [(k, tuple(v.shape)) for k, v in sd.items()]


def test_numpy_adapter_refuses_what_the_pytorch_one_refuses():
    cfg = {"tap_dims": [4, 4], "fc_dim": 8, "head_sizes": [3]}
    sd = {k: v.numpy() for k, v in MLFFAdapter(cfg["tap_dims"], cfg["fc_dim"], cfg["head_sizes"]).state_dict().items()}
    NumpyAdapter(sd, cfg)
    bad = dict(sd, **{"heads.0.bias": np.array([0.0, np.inf, 0.0], np.float32)})
    with pytest.raises(EdgekitError, match=r"heads.0.bias holds Inf \(1 of 3 values\)"):
        NumpyAdapter(bad, cfg)
    with pytest.raises(EdgekitError, match="missing: fuse.0.weight"):
        NumpyAdapter({k: v for k, v in sd.items() if k != "fuse.0.weight"}, cfg)
    with pytest.raises(EdgekitError, match="weights must be floating point"):
        NumpyAdapter(dict(sd, **{"fuse.0.bias": sd["fuse.0.bias"].astype(np.int32)}), cfg)
    with pytest.raises(ValueError, match="expected N x 8"):
        NumpyAdapter(sd, cfg).head_logits(np.zeros((2, 9), np.float32))
