"""Issue 19 item 6, your own data: --input-size at compile (and --size at bench), --resize
stretch|letterbox in the preprocessing spec (and a note when images are stretched), the numpy
preprocessing (no torch on a device) equal to the torch one it replaced, training's normalisation
equal to inference's, and own image/mask folders that `edgekit train` can split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line


from test_preprocess_numpy import _torch_preprocess  # the old PyTorch preprocessing: the reference


# float32 rounding only: the numpy path computes the source positions as PyTorch's kernel does (its fused
# multiply-add included), on inputs of magnitude ~3
TORCH_ROUNDING = 2e-6


@pytest.mark.parametrize("src, dst", [((200, 200), (512, 512)), ((200, 300), (96, 128)), ((512, 512), (200, 200)),
                                      ((7, 5), (3, 11)), ((1, 1), (4, 4))])
def test_numpy_bilinear_resize_equals_torch(src, dst):
    import torch
    import torch.nn.functional as F

    from edgekit.data.preprocess import resize_bilinear

    a = (np.random.default_rng(0).random(src) * 3 - 1).astype(np.float32)
    want = F.interpolate(torch.from_numpy(a)[None, None], size=dst, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(resize_bilinear(a, dst), want.numpy(), atol=TORCH_ROUNDING, rtol=0)


@pytest.mark.parametrize("spec_kw", [{}, {"input_size": (96, 128), "scale": "255"},
                                     {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                      "input_size": (64, 64)}])
def test_numpy_preprocess_equals_the_torch_one_it_replaced(spec_kw):
    from edgekit.data.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec(**spec_kw)
    rng = np.random.default_rng(1)
    images = [(rng.random((200, 200)) * 255).astype(np.uint8), (rng.random((120, 260)) * 200).astype(np.uint8)]
    np.testing.assert_allclose(preprocess(images, spec), _torch_preprocess(images, spec), atol=TORCH_ROUNDING, rtol=0)


def test_preprocess_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from edgekit.data.preprocess import PreprocessSpec, preprocess, resize_probs; "
            "x = preprocess([np.full((30, 50), 9, np.uint8)], PreprocessSpec(resize='letterbox')); "
            "resize_probs(x[0, :1], (30, 50), PreprocessSpec(resize='letterbox')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_the_mean():
    from edgekit.data.preprocess import PreprocessSpec, letterbox_box, preprocess

    spec = PreprocessSpec(input_size=(64, 64), resize="letterbox")
    img = np.full((100, 200), 200, np.uint8)  # 2:1, a uniform image: normalised to (1 - mean) / std
    x = preprocess([img], spec)[0]
    assert letterbox_box((100, 200), (64, 64)) == (16, 0, 32, 64)
    assert np.all(x[:, :16] == 0) and np.all(x[:, 48:] == 0)  # padding = 0 after normalisation = the mean
    np.testing.assert_allclose(x[:, 16:48], (1 - spec.mean) / spec.std, rtol=1e-6)
    stretched = preprocess([img], PreprocessSpec(input_size=(64, 64)))[0]
    assert np.all(stretched != 0)  # stretch fills the whole input


def test_letterbox_spec_round_trips_through_a_manifest_dict():
    from edgekit.data.preprocess import PreprocessSpec

    d = PreprocessSpec(input_size=(96, 128), resize="letterbox").to_dict()
    assert d["resize"] == "letterbox" and d["input_size"] == [96, 128]
    assert PreprocessSpec.from_dict(d).resize == "letterbox"
    assert PreprocessSpec.from_dict({"mean": 0.5}).resize == "stretch"  # older manifests: what they did
    with pytest.raises(Exception, match="resize must be"):
        PreprocessSpec(resize="crop")


@pytest.mark.parametrize("shape", [(60, 200), (200, 60), (77, 91)])
def test_a_letterboxed_output_maps_back_to_the_image_unpadded(shape):
    """The mask through letterbox and back (un-pad, then resize) lands where it was; mapped back as if
    stretched, it would not."""
    from edgekit.data.preprocess import PreprocessSpec, preprocess, resize_probs

    mask = np.zeros(shape, np.uint8)
    h, w = shape
    mask[h // 5:h // 2, w // 4:(3 * w) // 4] = 255
    spec = PreprocessSpec(mean=0.0, std=1.0, scale="255", channels=1, input_size=(64, 64), resize="letterbox")
    net_out = preprocess([mask], spec)[0, 0]  # a "network" that returns its input
    back = resize_probs(net_out, shape, spec) >= 0.5
    truth = mask > 0
    iou = (back & truth).sum() / (back | truth).sum()
    assert back.shape == shape and iou > 0.9, iou
    wrong = resize_probs(net_out, shape, PreprocessSpec(input_size=(64, 64))) >= 0.5
    assert (wrong & truth).sum() / (wrong | truth).sum() < iou


def _non_square(folder, n=2, size=(60, 140)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        p = folder / f"tile_{i}.jpg"
        Image.fromarray((rng.random(size) * 255).astype("uint8")).save(p)
        m = np.zeros(size, "uint8")
        m[10:30, 20:90] = 255
        Image.fromarray(m).save(folder / f"tile_{i}.png")
        paths.append(p)
    return paths


def test_predict_and_eval_say_once_that_non_square_images_are_stretched(cli, tmp_path):
    paths = _non_square(tmp_path / "imgs")
    r = cli("predict", *paths, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.stderr
    said = [l for l in r.stderr.splitlines() if "stretched" in l]
    assert len(said) == 1 and "140x60" in said[0] and "2.33:1" in said[0] and "letterbox" in said[0], r.stderr
    r = cli("eval", "--data", tmp_path / "imgs", "--batch", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert len([l for l in r.stderr.splitlines() if "stretched" in l]) == 1
    json.loads(r.stdout)  # stdout stays the result
    square = tmp_path / "square"
    _non_square(square, size=(50, 50))
    r = cli("eval", "--data", square)
    assert r.exit_code == 0 and "stretched" not in r.stderr


# -- compile --input-size / --resize ---------------------------------------------------------------

def _targets_here():
    import os
    import shutil

    return ["onnx", "openvino"] + (["cpu-fused"] if shutil.which(os.environ.get("CXX", "g++")) else [])


@pytest.mark.parametrize("target", _targets_here())
def test_compile_input_size_builds_records_and_checks_parity_at_that_size(cli, tmp_path, tiny_ckpt, target):
    """The tiny checkpoint is 64x64; built for 48x80 letterbox, every fixed-shape target runs at 48x80, the
    manifest says so, parity ran at it, and predict maps the masks back to each image's own size."""
    from edgekit import runtime

    out = tmp_path / "art"
    r = cli("compile", tiny_ckpt, "--target", target, "--input-size", "48x80", "--resize", "letterbox",
            "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["preprocess"]["input_size"] == [48, 80] and m["preprocess"]["resize"] == "letterbox"
    assert m["input"]["shape"][-2:] == [48, 80] and m["parity"]["input_size"] == [48, 80]
    runner = runtime.load(out)
    assert runner.input_shape == (3, 48, 80) and runner.spec.resize == "letterbox"
    assert runner.infer(np.zeros((1, 3, 48, 80), np.float32)).shape == (1, 1, 48, 80)
    paths = _non_square(tmp_path / "imgs", n=1, size=(60, 140))
    r = cli("predict", out, *paths, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.stderr
    assert "stretched" not in r.stderr  # letterbox: nothing is stretched
    assert np.asarray(Image.open(tmp_path / "pred" / "tile_0_mask.png")).shape == (60, 140)


def test_compile_input_size_of_an_artifact_needs_the_checkpoint(cli, tmp_path, tiny_ckpt):
    assert cli("compile", tiny_ckpt, "--target", "onnx", "--out", tmp_path / "a").exit_code == 0
    line = one_error_line(cli("compile", tmp_path / "a", "--target", "ort", "--input-size", "32",
                              "--out", tmp_path / "b"))
    assert "built for 64x64" in line and "32x32" in line and "checkpoint" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("value", ["0", "abc", "12x", "5000x10"])
def test_a_bad_input_size_is_one_error_line(cli, tmp_path, tiny_ckpt, value):
    r = cli("compile", tiny_ckpt, "--target", "onnx", "--input-size", value, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "--input-size" in one_error_line(r)
    assert not (tmp_path / "a").exists()


# -- bench --size ----------------------------------------------------------------------------------

def test_bench_size_runs_every_row_at_that_size(cli, tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    r = cli("bench", tiny_ckpt, "--backends", "torch,onnx", "--size", "48x80", "--limit", "2", "--rounds", "1",
            "--iters", "2", "--batch", "1", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["settings"]["input_sizes"] == ["48x80"]
    built = list((tmp_path / "cache" / "bench").glob("*/onnx_fp32_48x80/manifest.json"))
    assert len(built) == 1 and json.loads(built[0].read_text())["preprocess"]["input_size"] == [48, 80]


def test_bench_size_refuses_an_artifact_of_another_size(cli, tmp_path, tiny_ckpt):
    assert cli("compile", tiny_ckpt, "--target", "onnx", "--out", tmp_path / "a").exit_code == 0
    line = one_error_line(cli("bench", tmp_path / "a", "--size", "32", "--limit", "1", "--rounds", "1"))
    assert "runs at 64x64" in line and "--size 32x32" in line


# -- training's preprocessing = inference's ---------------------------------------------------------

@pytest.mark.parametrize("spec_kw", [
    {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": (64, 96)},  # failed: list - tensor
    {"input_size": (64, 64), "resize": "letterbox"},
    {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": (48, 48), "resize": "letterbox"},
    {"input_size": (80, 80), "scale": "255"},
])
def test_training_normalisation_equals_inference_preprocessing(spec_kw):
    import torch

    from edgekit.data.preprocess import PreprocessSpec, preprocess
    from edgekit.train.data import normalize

    spec = PreprocessSpec(**spec_kw)
    rng = np.random.default_rng(5)
    images = [(rng.random((60, 140)) * 255).astype(np.uint8) for _ in range(2)]
    got = normalize(torch.from_numpy(np.stack(images).astype(np.float32)), spec).numpy()
    np.testing.assert_allclose(got, preprocess(images, spec), atol=TORCH_ROUNDING, rtol=0)


def test_training_masks_are_letterboxed_like_the_images():
    import torch

    from edgekit.data.preprocess import PreprocessSpec, preprocess
    from edgekit.train.data import resize_masks

    mask = np.zeros((60, 140), np.uint8)
    mask[10:40, 30:100] = 255
    as_image = PreprocessSpec(mean=0.0, std=1.0, scale="255", channels=1, input_size=(64, 64), resize="letterbox")
    got = resize_masks(torch.from_numpy(mask[None].astype(np.float32) / 255), (64, 64), "letterbox")[0, 0].numpy()
    np.testing.assert_allclose(got, preprocess([mask], as_image)[0, 0], atol=TORCH_ROUNDING)


def test_a_folder_without_split_json_splits_by_name_the_same_way_every_time(tmp_path):
    from edgekit.data.datasets import open_segmentation, split_by_name

    folder = tmp_path / "own"
    _non_square(folder, n=10, size=(40, 60))
    ds = open_segmentation(str(folder), "train")
    parts = {k: [s.name for s in split_by_name(ds, k).samples] for k in ("train", "val", "test")}
    assert [len(parts[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert len(set(sum(parts.values(), []))) == 10  # disjoint, every image somewhere
    shuffled = open_segmentation(str(folder), "train")
    shuffled.samples.reverse()
    assert [s.name for s in split_by_name(shuffled, "val").samples] == parts["val"]


def test_eval_split_test_on_a_folder_without_split_json_scores_what_train_held_out(cli, tmp_path):
    """A new user's eval --split test on their own image/mask folder scored every image, train images included."""
    from edgekit.data.datasets import open_segmentation, split_by_name

    folder = tmp_path / "own"
    _non_square(folder, n=10, size=(40, 60))
    held_out = [s.name for s in split_by_name(open_segmentation(str(folder), "test"), "test").samples]
    runs = {}
    for args in ((), ("--split", "test"), ("--split", "all")):
        r = cli("eval", "--data", folder, *args, "--json")
        assert r.exit_code == 0, r.stderr
        runs[args] = (json.loads(r.stdout), json.loads(r.stdout).get("split_note", ""))
    (everything, said_all), (test, said_test), (explicit_all, _) = runs.values()
    assert everything["overall"]["images"] == explicit_all["overall"]["images"] == 10 and everything["split"] == "all"
    assert "all 10 images scored" in said_all
    assert test["overall"]["images"] == len(held_out) == 2 and test["split"] == "test"
    assert "the test part by file name" in said_test


def test_predict_on_a_folder_with_masks_beside_images_predicts_the_images_only(cli, tmp_path):
    """Used to fail: x.jpg and its mask x.png were two inputs named x ("their outputs would overwrite")."""
    _non_square(tmp_path / "imgs", n=2, size=(40, 40))
    (tmp_path / "imgs" / "tile_1.png").rename(tmp_path / "imgs" / "tile_1_mask.png")
    r = cli("predict", tmp_path / "imgs", "--out", tmp_path / "pred", "--json")
    assert r.exit_code == 0, r.stderr
    assert sorted(Path(x["image"]).name for x in json.loads(r.stdout)) == ["tile_0.jpg", "tile_1.jpg"]


def test_train_on_class_folders_says_masks_are_needed_in_one_line(cli, tmp_path, neu):
    from conftest import ROOT

    line = one_error_line(cli("train", ROOT / "recipes" / "gmbinet_sd900.yaml", "--profile", "cpu", "--data", neu,
                              "--iterations", "1", "--out", tmp_path / "run"))
    assert "class folders" in line and "masks" in line and "edgekit adapt" in line


def test_train_input_size_below_32_is_one_error_line(cli, tmp_path):
    from conftest import ROOT

    line = one_error_line(cli("train", ROOT / "recipes" / "gmbinet_sd900.yaml", "--data", "synthetic:4",
                              "--input-size", "16x64", "--out", tmp_path / "run"))
    assert "--input-size 16x64" in line and "32" in line
