"""cpu-fused's finite check, folded into the stem kernel (issue 20 item 1): the stem counts the NaN/inf values of
the input while it reads it, the runner refuses such a batch with the base class's one line and never returns its
output, and ``Runner.infer`` skips its own pass over the batch (``kernel_checks_finite``).

For every ISA library this CPU runs (avx2, avx512, avx512amx), on a tiny random GMBINet at an odd input size
(37 x 53: rows and columns off every vector width), NaN, +inf and -inf at the first, middle and last element of
each channel of the first and the last image of a batch of 3, through ``runtime.load(...).infer``; and the kernel's
count against numpy's at odd sizes (down to 7 x 5, narrower than one vector), batches 1 and 3, 1 and 2 threads,
from NaN-poisoned arenas.  Removing the count from the stem (the mutation) fails every refusal below.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgekit.errors import EdgekitError

from conftest import random_gmbinet, tiny_config

from edgekit.kernels.cpu import runtime as cpu_fused

H, W = 37, 53


def _isa_or_skip(isa: str) -> str:
    if shutil.which("g++") is None:
        pytest.skip("cpu-fused builds its kernels with g++, which is not installed")
    if isa not in cpu_fused.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} library")
    return isa


@pytest.fixture(scope="module", params=list(cpu_fused.ISA_LEVELS))
def built(request, tmp_path_factory):
    """(isa, artifact folder, its library): a tiny random GMBINet at H x W, compiled for that ISA alone."""
    import torch

    from edgekit.artifact import write_manifest
    from edgekit.backends.cpu_fused.build import build_cpu_fused
    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet
    from edgekit.pipeline.sources import open_source

    isa = _isa_or_skip(request.param)
    torch.manual_seed(0)
    ck = Checkpoint.from_model(GMBINet(tiny_config()).eval(), classes=["inclusion", "patches", "scratches"])
    ck.preprocess.input_size = (H, W)
    path = ck.save(tmp_path_factory.mktemp("ck") / "tiny_odd.pt")
    src = open_source(str(path))
    out = tmp_path_factory.mktemp(f"nonfinite_{isa}") / "A"
    out.mkdir()
    precision = "bf16" if isa in cpu_fused.OPT_IN_ISAS else "fp32"
    fields = build_cpu_fused(src.checkpoint, out, precision, isas=[isa], log=lambda *_: None)
    files = [fields["model_file"], *fields.pop("extra_files")]
    write_manifest(out, {"target": "cpu-fused", "precision": precision, **fields, **src.base}, files)
    lib = out / fields["kernels"]["libraries"][isa]["file"]
    return isa, out, lib


def _message(n: int, size: int) -> str:
    return f"cpu-fused: the batch holds {n:,} non-finite values (NaN or inf) of {size:,}; refused"


def test_runner_refuses_nan_and_inf_anywhere_with_one_line(built):
    from edgekit import runtime

    isa, art, _ = built
    with runtime.load(art, threads=2) as runner:
        assert runner.isa == isa
        assert runner.kernel_checks_finite, "the library's stem must count the non-finite inputs"
        c, h, w = runner.input_shape
        assert (h, w) == (H, W)
        good = np.random.default_rng(1).standard_normal((3, c, h, w)).astype(np.float32)
        ref = runner.infer(good)
        assert np.isfinite(ref).all()
        # the kernel check changes nothing in a finite batch's result
        np.testing.assert_array_equal(ref, runner.fused.forward(good))
        refused = 0
        for value in (np.nan, np.inf, -np.inf):
            for img in (0, 2):
                for ch in range(c):
                    for (y, x) in ((0, 0), (h // 2, w // 2), (h - 1, w - 1)):
                        bad = good.copy()
                        bad[img, ch, y, x] = value
                        with pytest.raises(EdgekitError) as e:
                            runner.infer(bad)
                        assert str(e.value) == _message(1, bad.size) and "\n" not in str(e.value)
                        refused += 1
        assert refused == 3 * 2 * c * 3
        # several at once, in every image: the kernel's count is the message's
        bad = good.copy()
        bad[0, 0, 0, :3] = np.nan
        bad[1, c - 1, h - 1, w - 1] = np.inf
        bad[2, :, h // 2, 0] = -np.inf
        with pytest.raises(EdgekitError) as e:
            runner.infer(bad)
        assert str(e.value) == _message(3 + 1 + c, bad.size)
        # the runner still works after a refusal, and a huge finite batch (its fp32 sum overflows) is not refused
        np.testing.assert_array_equal(runner.infer(good), ref)
        assert runner.infer(np.full((1, c, h, w), 3e38, np.float32)).shape == (1, 1, h, w)


def test_runner_without_the_kernel_count_still_refuses(built):
    """A library without the count (an older artifact): the base class's own pass, same line."""
    from edgekit import runtime

    _, art, _ = built
    with runtime.load(art, threads=1) as runner:
        runner.kernels._take_nonfinite = None  # what CpuKernels holds for a library without the symbol
        runner.kernel_checks_finite = runner.kernels.counts_nonfinite
        assert not runner.kernel_checks_finite
        x = np.zeros((2, *runner.input_shape), np.float32)
        x[1, 0, H - 1, W - 1] = np.nan
        with pytest.raises(EdgekitError) as e:
            runner.infer(x)
        assert str(e.value) == _message(1, x.size)


@pytest.mark.parametrize("threads", [1, 2])
def test_stem_count_matches_numpy_at_odd_sizes(built, threads):
    _, _, lib = built
    from edgekit.kernels.fold import fold_gmbinet

    net = fold_gmbinet(random_gmbinet(tiny_config(), seed=3))
    blob, offsets = net.param_layout()
    fused = cpu_fused.FusedNet(cpu_fused.CpuKernels(lib, threads), net, blob, offsets)
    rng = np.random.default_rng(threads)
    for n, h, w in ((1, 7, 5), (3, 37, 53), (1, 33, 17), (2, 18, 35), (1, 64, 64)):
        x = rng.standard_normal((n, 3, h, w)).astype(np.float32)
        out, count = fused.forward(x, poison=True, count_nonfinite=True)
        assert count == 0 and np.isfinite(out).all(), (n, h, w)
        for k in (1, 2, 7):
            bad = x.copy()
            flat = bad.reshape(-1)
            where = rng.choice(flat.size, size=k, replace=False)
            where[0] = flat.size - 1  # the last element, always
            flat[where] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=k)
            flat[rng.integers(flat.size)] = 3e38  # huge but finite: not counted (unless it overwrote one above)
            _, count = fused.forward(bad, poison=True, count_nonfinite=True)
            assert count == int((~np.isfinite(bad)).sum()), (n, h, w, k)
        # the count is per call: a clean call after a poisoned one reads zero
        assert fused.forward(x, poison=True, count_nonfinite=True)[1] == 0
    fused.kernels.close()
