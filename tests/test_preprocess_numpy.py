"""data/preprocess.py runs in numpy (a station has no torch): its output equals the PyTorch path it replaced
(``F.interpolate(mode="bilinear", align_corners=False)``) within 1e-6, for up- and downscaling, odd and equal
sizes, both scalings and per-channel normalisation, on random images and real SD-900 images."""
from __future__ import annotations

import numpy as np
import pytest

from edgekit.data.preprocess import PreprocessSpec, preprocess, resize_probs

torch = pytest.importorskip("torch", reason="the reference is the PyTorch path; torch is not installed")
F = torch.nn.functional

TOL = 1e-6


def _torch_preprocess(images, spec: PreprocessSpec) -> np.ndarray:
    """The PyTorch implementation data/preprocess.py had before (commit f819e5e), kept as the reference."""
    out = np.empty((len(images), spec.channels, *spec.input_size), dtype=np.float32)
    for i, img in enumerate(images):
        x = torch.from_numpy(np.asarray(img, dtype=np.float32))
        if spec.scale == "max":
            m = float(x.max())
            x = x / m if m > 0 else x
        else:
            x = x / 255.0
        if isinstance(spec.mean, list) or isinstance(spec.std, list):
            x = F.interpolate(x[None, None], size=spec.input_size, mode="bilinear", align_corners=False)
            x = x[0].expand(spec.channels, -1, -1)
            mean = torch.tensor(spec.mean, dtype=torch.float32).reshape(-1, 1, 1)
            std = torch.tensor(spec.std, dtype=torch.float32).reshape(-1, 1, 1)
            out[i] = ((x - mean) / std).numpy()
            continue
        x = (x - spec.mean) / spec.std
        x = F.interpolate(x[None, None], size=spec.input_size, mode="bilinear", align_corners=False)
        out[i] = x[0].expand(spec.channels, -1, -1).numpy()
    return out


def _torch_resize_probs(probs, size):
    p = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)).reshape(1, 1, *probs.shape[-2:])
    if tuple(p.shape[-2:]) != tuple(size):
        p = F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
    return p[0, 0].clamp_(0, 1).numpy()


SPECS = [dict(), dict(scale="255"),
         dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], scale="255"),  # an MLFF backbone's ImageNet spec
         dict(channels=1)]


@pytest.mark.parametrize("shape", [(200, 200), (37, 91), (600, 333), (1, 5), (64, 64)])
def test_numpy_preprocess_equals_the_torch_path(shape):
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    worst = 0.0
    for size in [(512, 512), (224, 224), (31, 77), shape, (1, 1)]:
        for kw in SPECS:
            spec = PreprocessSpec(input_size=size, **kw)
            got, want = preprocess([img], spec), _torch_preprocess([img], spec)
            assert got.dtype == np.float32 and got.shape == want.shape
            worst = max(worst, float(np.abs(got - want).max()))
        probs = rng.random(shape, dtype=np.float32)
        got, want = resize_probs(probs, size), _torch_resize_probs(probs, size)
        assert got.shape == want.shape == tuple(size)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= TOL, f"max abs difference {worst:.3g} > {TOL}"


def test_numpy_preprocess_equals_the_torch_path_on_sd900(sd900):
    from edgekit.data.datasets import open_segmentation

    samples = open_segmentation(str(sd900), "test").samples[:6]
    images = [s.image() for s in samples]
    for spec in (PreprocessSpec(), PreprocessSpec(input_size=(256, 256)), PreprocessSpec(input_size=(177, 203))):
        got, want = preprocess(images, spec), _torch_preprocess(images, spec)
        assert float(np.abs(got - want).max()) <= TOL


def test_all_black_image_and_batch_shape():
    spec = PreprocessSpec(input_size=(8, 12))
    imgs = [np.zeros((5, 7), np.uint8), np.full((9, 3), 200, np.uint8)]
    got = preprocess(imgs, spec)
    assert got.shape == (2, 3, 8, 12)
    np.testing.assert_allclose(got, _torch_preprocess(imgs, spec), atol=TOL, rtol=0)
    np.testing.assert_allclose(got[0], (0 - spec.mean) / spec.std, atol=TOL)  # max 0: not divided


@pytest.mark.parametrize("shape", [(200, 200), (224, 224), (37, 300)])
def test_backbone_preprocess_in_numpy_equals_the_pytorch_backbones(shape):
    """A compiled MLFF backbone's inputs (edgekit.mlff.runner.backbone_preprocess, numpy: the station's path) are
    the PyTorch backbone's (edgekit.models.backbones.preprocess_images), for ImageNet and edgekit specs."""
    from edgekit.mlff.runner import backbone_preprocess
    from edgekit.models.backbones import _imagenet_spec, preprocess_images

    rng = np.random.default_rng(shape[1])
    imgs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]
    for spec in (_imagenet_spec(224), _imagenet_spec(96),
                 {"kind": "edgekit", "preprocess": PreprocessSpec(input_size=(64, 64)).to_dict()}):
        got, want = backbone_preprocess(imgs, spec), preprocess_images(imgs, spec).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        assert float(np.abs(got - want).max()) <= TOL
