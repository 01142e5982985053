"""GPU-resident training (``train.device_data``), time-budgeted runs (``--budget``) and budgeted
prune fine-tuning, all on the CPU with tiny sizes: the device path is the same code on any device.

The device pipeline draws its permutations and augmentation on the device and crops by one gather;
the host pipeline draws on the CPU and slices. The distributions must be the same: compared here by
two-sample Kolmogorov-Smirnov statistics of per-sample summaries over 2,000 samples of each.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import one_error_line
from test_train import RECIPE, write_recipe

N_ITER, BATCH = 250, 8  # 2,000 samples per pipeline


def _trainset(n=12, h=48, w=40):
    """Images with varied brightness and texture, each with an off-centre defect (asymmetric, so flips
    and crop positions show in the statistics)."""
    from edgekit.train.data import TrainSet

    g = torch.Generator().manual_seed(1)
    img = (torch.rand(n, h, w, generator=g) * 60 + torch.linspace(20, 120, n)[:, None, None]).to(torch.uint8)
    mask = torch.zeros_like(img)
    for i in range(n):
        r, c = 3 + (i * 5) % (h - 14), 2 + (i * 7) % (w - 12)
        img[i, r:r + 10, c:c + 8] = 240
        mask[i, r:r + 10, c:c + 8] = 255
    return TrainSet(img, mask, [str(i) for i in range(n)], ["a"] * n)


def _summaries(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per sample: image mean, std, left-minus-right and top-minus-bottom means, mask fraction, mask
    centroid row and column."""
    h, w = y.shape[-2:]
    img, m = x[:, 0], y[:, 0]
    rows = torch.arange(h, dtype=torch.float32)[None, :, None]
    cols = torch.arange(w, dtype=torch.float32)[None, None, :]
    mass = m.sum(dim=(1, 2)).clamp_min(1e-6)
    return torch.stack([
        img.mean(dim=(1, 2)), img.std(dim=(1, 2)),
        img[:, :, : w // 2].mean(dim=(1, 2)) - img[:, :, w // 2:].mean(dim=(1, 2)),
        img[:, : h // 2].mean(dim=(1, 2)) - img[:, h // 2:].mean(dim=(1, 2)),
        m.mean(dim=(1, 2)), (m * rows).sum(dim=(1, 2)) / mass, (m * cols).sum(dim=(1, 2)) / mass,
    ], 1).numpy()


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize("crop", [None, [32, 32]])
def test_device_pipeline_has_the_host_pipelines_distributions(crop):
    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.train.data import EpochSampler, batch_generator, make_batch
    from edgekit.train.device_data import DeviceBatches
    from edgekit.train.recipe import AugmentSection

    ts = _trainset()
    aug = AugmentSection(hflip=0.5, vflip=0.3, shift=0.1, scale=0.2, crop=crop)
    spec = PreprocessSpec(input_size=(64, 64))
    sampler = EpochSampler(len(ts), BATCH, seed=3)
    host = [_summaries(*make_batch(ts, sampler.indices(i), aug, spec, batch_generator(3, i))) for i in range(N_ITER)]
    dev = DeviceBatches(ts, BATCH, 3, aug, spec, torch.device("cpu"))
    device = [_summaries(*dev.batch(i)) for i in range(N_ITER)]
    host, device = np.concatenate(host), np.concatenate(device)
    assert host.shape == device.shape == (N_ITER * BATCH, 7)
    # KS critical value at alpha = 0.001 for n = m = 2000 is 1.95 * sqrt(2 / 2000) = 0.062
    stats = [_ks(host[:, k], device[:, k]) for k in range(host.shape[1])]
    assert max(stats) < 0.062, stats
    # and the draws are not the same numbers: the device path has its own generators
    assert not np.allclose(host[:BATCH], device[:BATCH])
    # the statistics see what they should: flips move the defect (a spread of centroids), crops halve the size
    assert device[:, 6].std() > 2 and (device[:, 4] > 0).mean() > (0.5 if crop else 0.99)


def test_device_batches_are_a_function_of_seed_and_iteration():
    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.train.device_data import DeviceBatches
    from edgekit.train.recipe import AugmentSection

    ts = _trainset(n=10)
    args = (ts, 4, 7, AugmentSection(crop=[32, 32]), PreprocessSpec(input_size=(64, 64)), torch.device("cpu"))
    a, b = DeviceBatches(*args), DeviceBatches(*args)
    seq = [a.indices(i) for i in range(5)]
    assert sorted(torch.cat(seq)[:10].tolist()) == list(range(10))  # an epoch without replacement
    assert torch.equal(b.indices(3), seq[3])  # any iteration, in any order
    xa, ya = a.batch(4)
    xb, yb = b.batch(4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 3, 32, 32)


def test_gather_crop_is_the_same_window_of_image_and_mask():
    from edgekit.train.data import random_crop
    from edgekit.train.device_data import gather_crop

    x = torch.randn(5, 3, 64, 64)
    y = torch.rand(5, 1, 64, 64)
    u = torch.rand(5, 2, generator=torch.Generator().manual_seed(0))
    cx, cy = gather_crop(x, y, (32, 32), u)
    tops = (u[:, 0] * 33).long().clamp(max=32)
    lefts = (u[:, 1] * 33).long().clamp(max=32)
    for i in range(5):
        t, l = int(tops[i]), int(lefts[i])
        assert torch.equal(cx[i], x[i, :, t:t + 32, l:l + 32]) and torch.equal(cy[i], y[i, :, t:t + 32, l:l + 32])
    # the host crop with the same draws picks the same windows
    g = torch.Generator().manual_seed(0)
    hx, hy = random_crop(x, y, (32, 32), g)
    assert torch.equal(hx, cx) and torch.equal(hy, cy)


def _device_recipe(tmp_path, **train):
    def edit(d):
        d["profiles"]["cpu"]["train"].update(device_data=True, **train)

    return write_recipe(tmp_path / "dev.yaml", edit)


def test_device_data_run_resumes_bit_for_bit(tmp_path, cli):
    """A device_data run (fused Adam where torch has it for the device) stopped after 2 of 4 iterations
    and resumed ends with the uninterrupted run's weights."""
    from edgekit.train.loop import train
    from edgekit.train.recipe import load_recipe

    recipe = _device_recipe(tmp_path)
    args = dict(data="synthetic:8", iterations=4, limit_images=6)
    full = train(load_recipe(recipe, "cpu"), out_dir=str(tmp_path / "full"), **args)
    part = train(load_recipe(recipe, "cpu"), out_dir=str(tmp_path / "part"), stop_after=2, **args)
    assert part.stopped_early
    res = train(load_recipe(recipe, "cpu"), resume=str(tmp_path / "part" / "last.pt"), **args)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert res.iteration == 4 and b["iteration"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["device_data"] is True and report["amp"] == "none" and report["optimizer"] in ("fused", "foreach")
    assert report["budget"] is None


def test_budget_run_ends_on_time_with_lr_annealed_and_report(tmp_path, cli):
    """--budget 10s on the CPU: the horizon comes from the measured steps, the run ends within the budget,
    the last lr is the cosine's min_lr, and best.pt and report.json are written."""
    recipe = _device_recipe(tmp_path, val_every=20, checkpoint_every=1000)
    out = tmp_path / "run"
    t0 = time.time()
    r = cli("train", recipe, "--profile", "cpu", "--data", "synthetic:8", "--limit-images", "6", "--budget", "10s",
            "--out", out)
    wall = time.time() - t0
    assert r.exit_code == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    b = report["budget"]
    assert b["budget_s"] == 10 and b["step_s"] > 0 and b["ended_by"] in ("schedule", "time guard")
    # the planned horizon, or fewer iterations where the guard ended a run whose steps slowed down (busy machine)
    assert report["iterations"] == b["planned_iterations"] if b["ended_by"] == "schedule" else \
        report["iterations"] < b["planned_iterations"]
    assert report["train_wall_s"] <= 10.0 and wall < 10.0 + 2.0, (report["train_wall_s"], wall)
    assert report["iterations"] > 10  # it did use the budget (tiny steps are ~10-50 ms here)
    last = report["history"][-1]
    assert last["iteration"] == report["iterations"]
    if b["ended_by"] == "schedule":
        assert last["lr"] == pytest.approx(1.0e-5, rel=1e-6)  # the cpu profile's min_lr: annealed
    assert (out / "best.pt").is_file() and "cosine horizon" in r.stderr
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["provenance"]["budget"] == b and ck["provenance"]["iterations"] == report["iterations"]


@pytest.mark.parametrize("args,expected", [
    (["--budget", "5s"], "under 10 s"),
    (["--budget", "soon"], "give a duration"),
    (["--budget", "1m", "--iterations", "3"], "--budget and --iterations exclude each other"),
])
def test_budget_refusals(tmp_path, cli, args, expected):
    recipe = write_recipe(tmp_path / "r.yaml")
    line = one_error_line(cli("train", recipe, "--profile", "cpu", "--data", "synthetic:8", "--out", tmp_path / "o",
                              *args))
    assert expected in line
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_parse_budget():
    from edgekit.train.recipe import parse_budget

    assert parse_budget("6m") == 360 and parse_budget("90s") == 90 and parse_budget("1h") == 3600
    assert parse_budget("2m30s") == 150 and parse_budget("300") == 300


def test_graph_compile_needs_cuda(tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    recipe = _device_recipe(tmp_path, compile="graph")
    line = one_error_line(cli("train", recipe, "--profile", "cpu", "--data", "synthetic:8", "--iterations", "2",
                              "--out", tmp_path / "o"))
    assert "train.compile graph (CUDA graphs) needs CUDA" in line


def test_prune_finetune_on_a_budget_with_distillation(tmp_path, cli, tiny_ckpt):
    """edgekit prune --finetune --budget --distill runs on the CPU and records the budget and the
    distillation weight. (Whether distillation helps at GPU budgets is not measured here.)"""
    def edit(d):
        cpu = d["profiles"]["cpu"]
        cpu["train"].update(device_data=True, val_every=10, checkpoint_every=1000)

    recipe = write_recipe(tmp_path / "ft.yaml", edit)
    out = tmp_path / "pruned.pt"
    r = cli("prune", tiny_ckpt, "--ratio", "0.25", "--finetune", recipe, "--profile", "cpu", "--data", "synthetic:8",
            "--limit-images", "6", "--bn-images", "4", "--taylor-images", "4", "--budget", "10s", "--distill", "0.5",
            "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    ft = d["finetune"]
    assert ft["distill"] == 0.5 and ft["budget"]["budget_s"] == 10
    assert 10 < ft["iterations"] <= ft["budget"]["planned_iterations"]  # fewer only where the time guard ended it
    assert ft["wall_s"] <= 10.0 and out.is_file()
    line = one_error_line(cli("prune", tiny_ckpt, "--ratio", "0.25", "--budget", "1m", "--out", tmp_path / "p2.pt"))
    assert "add --finetune RECIPE" in line
