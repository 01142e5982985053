"""Metrics on hand-made cases; dataset readers on real and synthetic data."""
import numpy as np
import pytest

from edgekit.data.datasets import holdout_split, load_class_folders, open_segmentation
from edgekit.data.images import write_png
from edgekit.data.preprocess import PreprocessSpec, preprocess
from edgekit.data.synthetic import generate
from edgekit.errors import EdgekitError
from edgekit.eval.metrics import SegMetrics, image_scores


def test_perfect_and_empty_predictions():
    gt = np.zeros((20, 20), bool)
    gt[5:10, 5:15] = True
    mae, iou, p, r = image_scores(gt.astype(np.float32), gt)
    assert mae == 0 and iou == 1
    empty = np.zeros((8, 8), bool)
    assert image_scores(np.zeros((8, 8)), empty)[1] == 1.0  # nothing to find, nothing found
    m = SegMetrics()
    m.add(gt.astype(np.float32), gt, "a")
    assert m.summary()["overall"]["max_f"] == pytest.approx(1.0)


def test_iou_mae_known_values():
    gt = np.zeros((10, 10), bool)
    gt[:, :5] = True  # 50 px
    prob = np.zeros((10, 10), np.float32)
    prob[:, 2:7] = 0.8  # 50 px predicted, 30 overlap
    mae, iou, _, _ = image_scores(prob, gt)
    assert iou == pytest.approx(30 / 70)
    assert mae == pytest.approx((20 * 1.0 + 30 * 0.2 + 20 * 0.8) / 100)


def test_per_class_and_overall_are_per_image_means():
    m = SegMetrics()
    gt = np.ones((4, 4), bool)
    m.add(np.ones((4, 4)), gt, "x")  # IoU 1
    m.add(np.zeros((4, 4)), gt, "y")  # IoU 0
    m.add(np.zeros((4, 4)), gt, "y")
    s = m.summary()
    assert s["per_class"]["x"]["iou"] == 1 and s["per_class"]["y"]["iou"] == 0
    assert s["overall"]["iou"] == pytest.approx(1 / 3) and s["overall"]["images"] == 3


def test_sd900_split(sd900):
    sizes = {s: len(open_segmentation(str(sd900), s)) for s in ("train", "val", "test", "all")}
    assert sizes == {"train": 600, "val": 75, "test": 225, "all": 900}
    ds = open_segmentation(str(sd900), "test")
    assert ds.classes == ["inclusion", "patches", "scratches"]
    img, mask = ds.samples[0].load()
    assert img.shape == mask.shape == (200, 200) and img.dtype == np.uint8 and mask.dtype == bool


def test_neu_class_folders(neu):
    samples, names = load_class_folders(neu)
    assert names == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert len(samples) == 1800
    train, test = holdout_split(samples, 0.2, seed=0)
    assert len(test) == 360 and not {s.path for s in train} & {s.path for s in test}


def test_preprocess_matches_spec():
    img = np.full((10, 10), 100, np.uint8)
    img[0, 0] = 200
    x = preprocess([img], PreprocessSpec(input_size=(10, 10)))
    assert x.shape == (1, 3, 10, 10)
    assert x[0, 0, 0, 0] == pytest.approx((1.0 - 0.4669) / 0.2437, rel=1e-5)
    assert x[0, 2, 5, 5] == pytest.approx((0.5 - 0.4669) / 0.2437, rel=1e-5)


def test_synthetic_generator_is_deterministic_and_labelled():
    a, ma, ca = generate(4, seed=7)
    b, mb, cb = generate(4, seed=7)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and ca == cb
    classes = {generate(i)[2] for i in range(6)}
    assert classes == {"inclusion", "patches", "scratches"}
    for i in range(6):
        img, mask, _ = generate(i)
        assert 0 < mask.mean() < 0.5  # every image has a defect, none is all defect
        assert img[mask].mean() != pytest.approx(img[~mask].mean(), abs=3)  # visible


def test_pairs_folder_and_bad_inputs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_png(tmp_path / "images" / "a_1.png", np.zeros((20, 20), np.uint8))
    write_png(tmp_path / "masks" / "a_1.png", np.zeros((10, 10), np.uint8))
    ds = open_segmentation(str(tmp_path), "test")
    with pytest.raises(EdgekitError, match="mask .* is 10x10 but its image is 20x20"):
        ds.samples[0].load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgekitError, match="no images"):
        open_segmentation(str(tmp_path / "empty"))
    (tmp_path / "images" / "b_1.png").write_text("not an image")
    with pytest.raises(EdgekitError, match="not a readable image"):
        open_segmentation(str(tmp_path), "test").samples[1].load()


def test_a_limit_takes_images_across_all_classes(sd900):
    """SD-900 lists are sorted by class: 'the first N' would be N inclusions (calibration, parity
    checks and eval --limit all take their N images through limit_samples)."""
    from edgekit.data.datasets import limit_samples
    from edgekit.pipeline.sources import GMBINetSource

    train = open_segmentation(str(sd900), "train")
    assert {s.cls for s in train.samples[:100]} == {"inclusion"}
    picked = limit_samples(train.samples, 9)
    assert [s.cls for s in picked].count("inclusion") == 3 and len({s.cls for s in picked}) == 3
    spec = PreprocessSpec(input_size=(32, 32))
    source = GMBINetSource(sd900, spec, base={})
    np.testing.assert_array_equal(np.concatenate(source.calibration_batches(train, 9)),
                                  preprocess([s.image() for s in picked], spec))
    assert limit_samples(train.samples, None) == train.samples
