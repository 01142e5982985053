"""``edgekit train``: recipe schema, losses, augmentation, the loop end to end, resume and refusals.

Fast by construction: the real recipe's CPU profile, patched to a 64x64 input and batch 4, a few
iterations on a handful of images (``--iterations``, ``--limit-images``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SD900 = SHARED / "datasets" / "sd-saliency-900"
RECIPE = ROOT / "recipes" / "gmbinet_sd900.yaml"
CLASSES = ["inclusion", "patches", "scratches"]


def write_recipe(path: Path, edit=None) -> Path:
    """The project's recipe with its cpu profile shrunk for a smoke test (64x64, batch 4, one thread:
    tiny batches gain nothing from a second thread, and one thread keeps the test steady on a busy
    shared machine)."""
    d = yaml.safe_load(RECIPE.read_text())
    cpu = d["profiles"]["cpu"]
    cpu["preprocess"]["input_size"] = [64, 64]
    cpu["train"].update(batch=4, val_every=2, checkpoint_every=2, val_batch=8, threads=1)
    if edit:
        edit(d)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


SYN_ARGS = ["--profile", "cpu", "--data", "synthetic:8", "--iterations", "4", "--limit-images", "6"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """One CLI run on synthetic data: (recipe path, output folder, click result)."""
    from click.testing import CliRunner

    from edgekit.cli import main

    tmp = tmp_path_factory.mktemp("train")
    recipe = write_recipe(tmp / "tiny.yaml")
    out = tmp / "run"
    r = CliRunner().invoke(main, ["train", str(recipe), *SYN_ARGS, "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return recipe, out, r


# ---------------------------------------------------------------------------------------------
# the loop, end to end


def _check_run(out: Path, iterations: int, data: str):
    from edgekit.models.checkpoint import load_checkpoint

    raw = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == "edgekit-checkpoint"
    ck = load_checkpoint(out / "best.pt")
    assert ck.preprocess.input_size == (64, 64)
    assert ck.preprocess.mean == pytest.approx(0.4669) and ck.preprocess.std == pytest.approx(0.2437)
    assert ck.classes == CLASSES
    assert ck.config["upstream_extras"] is False
    assert ck.config["widths"] == [16, 32, 64, 96, 128]
    p = ck.provenance
    assert p["recipe"] == "gmbinet_sd900" and len(p["recipe_sha256"]) == 64 and p["profile"] == "cpu"
    assert p["iterations"] == iterations and p["seed"] == 900 and p["edgekit_version"]
    assert p["data_split"]["train_split"] == "train" and p["data_split"]["data"] == data
    for k in ("val_iou", "test_mae", "test_iou", "test_max_f"):
        assert 0.0 <= ck.metrics[k] <= 1.0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == iterations and state["recipe"]["name"] == "gmbinet_sd900"
    assert {"optimizer", "scheduler", "rng", "state_dict", "best"} <= set(state)
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and set(report["per_class"]) == set(CLASSES)
    assert report["overall"]["iou"] == pytest.approx(ck.metrics["test_iou"], abs=1e-6)
    return ck


def test_train_synthetic_end_to_end(synthetic_run, cli):
    _, out, r = synthetic_run
    assert "best.pt" in r.stdout and "test MAE" in r.stdout
    _check_run(out, 4, "synthetic:8")
    e = cli("eval", out / "best.pt", "--data", "synthetic:6", "--json")
    assert e.exit_code == 0, e.stderr
    d = json.loads(e.stdout)
    assert d["overall"]["images"] == 6 and 0 <= d["overall"]["iou"] <= 1


def test_train_sd900_smoke(tmp_path, cli):
    if not SD900.is_dir():
        pytest.skip(f"SD-Saliency-900 not found at {SD900} (reference data from ../shared is absent)")
    recipe = write_recipe(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    r = cli("train", recipe, "--profile", "cpu", "--data", SD900, "--out", out, "--iterations", "2",
            "--limit-images", "6")
    assert r.exit_code == 0, r.stderr
    ck = _check_run(out, 2, str(SD900))
    assert ck.provenance["data_split"]["split_file_sha256"]
    assert ck.provenance["data_split"]["train_images"] == 6
    e = cli("eval", out / "best.pt", "--data", SD900, "--split", "test", "--limit", "3", "--json")
    assert e.exit_code == 0, e.stderr
    assert json.loads(e.stdout)["overall"]["images"] == 3


def test_resume_is_bit_for_bit(synthetic_run, tmp_path, cli):
    """Stop after 2 of 4 iterations, resume through the CLI: same weights as the uninterrupted run."""
    from edgekit.train.loop import train
    from edgekit.train.recipe import load_recipe

    recipe, full, _ = synthetic_run
    out = tmp_path / "run"
    res = train(load_recipe(recipe, "cpu"), data="synthetic:8", out_dir=str(out), iterations=4, limit_images=6,
                stop_after=2)
    assert res.stopped_early and res.iteration == 2
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 2
    r = cli("train", recipe, *SYN_ARGS, "--resume", out / "last.pt")  # --out defaults to the run's folder
    assert r.exit_code == 0, r.stderr
    assert "resumed from" in r.stderr and "at iteration 2" in r.stderr
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert b["iteration"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert [h["val_iou"] for h in a["history"]] == [h["val_iou"] for h in b["history"]]
    assert torch.load(out / "best.pt", weights_only=True)["provenance"]["resumed_from"]["iteration"] == 2


def test_resume_refuses_another_architecture(synthetic_run, tmp_path, cli):
    _, full, _ = synthetic_run

    def small(d):
        d["model"].update(widths=[8, 16, 16, 24, 32], depths=[1, 1, 1, 1])

    other = write_recipe(tmp_path / "other.yaml", small)
    r = cli("train", other, *SYN_ARGS, "--out", tmp_path / "o", "--resume", full / "last.pt")
    line = one_error_line(r)
    assert "architecture" in line and "widths" in line and "refusing" in line
    assert not (tmp_path / "o").exists()


def test_resume_refuses_a_weights_only_checkpoint(synthetic_run, tmp_path, cli):
    recipe, full, _ = synthetic_run
    line = one_error_line(cli("train", recipe, *SYN_ARGS, "--out", tmp_path / "o", "--resume", full / "best.pt"))
    assert "not a training state" in line


def test_refuses_to_overwrite_a_run(synthetic_run, cli):
    recipe, full, _ = synthetic_run
    line = one_error_line(cli("train", recipe, *SYN_ARGS, "--out", full))
    assert "--resume" in line


# ---------------------------------------------------------------------------------------------
# the recipe schema


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["optimizer"].update(lr_max=0.1), "recipe: unknown key 'optimizer.lr_max'"),
    (lambda d: d.update(optimiser={"lr": 0.1}), "recipe: unknown key 'optimiser'"),
    (lambda d: d["profiles"]["gpu"]["train"].update(batchsize=8), "recipe: unknown key 'profiles.gpu.train.batchsize'"),
    (lambda d: d["train"].update(batch="32"), "recipe: 'train.batch' must be an int, got str"),
    (lambda d: d["train"].update(batch=32.0), "recipe: 'train.batch' must be an int, got float"),
    (lambda d: d["loss"].update(dice="yes"), "recipe: 'loss.dice' must be a bool (true/false), got str"),
    (lambda d: d["profiles"]["cpu"]["preprocess"].update(input_size=[64, "64"]),
     "recipe: 'profiles.cpu.preprocess.input_size[1]' must be an int, got str"),
    (lambda d: d["optimizer"].update(lr="1e-3"), "recipe: 'optimizer.lr' must be a number, got str"),
    (lambda d: d["augment"].update(crop=[100, 96]), "'augment.crop' must be [height, width], each a multiple of 32"),
    (lambda d: d["augment"].update(crop=[1024, 1024]), "'augment.crop' [1024, 1024] is larger than"),
])
def test_recipe_schema_errors_name_the_key(tmp_path, cli, edit, expected):
    bad = write_recipe(tmp_path / "bad.yaml", edit)
    line = one_error_line(cli("train", bad, "--data", "synthetic:4", "--out", tmp_path / "o"))
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_recipe_profiles():
    from edgekit.train.recipe import load_recipe

    cpu = load_recipe(RECIPE, "cpu")
    gpu = load_recipe(RECIPE, "gpu")
    assert load_recipe(RECIPE).profile == "cpu"  # the default profile
    assert cpu.profiles == ["cpu", "gpu", "cpu-budget", "cpu-refine", "cpu-long", "finetune", "finetune-crop"]
    ft = load_recipe(RECIPE, "finetune")  # after pruning: the deployed input size, a gentle lr
    assert ft.preprocess.input_size == [512, 512] and ft.optimizer.lr < cpu.optimizer.lr
    crop = load_recipe(RECIPE, "finetune-crop")  # the same object scale, windows of it
    assert crop.preprocess.input_size == [512, 512] and crop.augment.crop == [256, 256]
    assert cpu.augment.crop is None and gpu.augment.crop is None
    assert cpu.optimizer.name == "adam" and cpu.schedule.name == "cosine" and cpu.train.batch <= 32
    assert cpu.loss.bce == 1.0 and cpu.loss.ssim == 1.0 and cpu.loss.ssim_window == 11 and len(cpu.loss.head_weights) == 5
    assert (cpu.preprocess.mean, cpu.preprocess.std, cpu.preprocess.scale) == (0.4669, 0.2437, "max")
    assert cpu.train.device == "cpu" and max(cpu.preprocess.input_size) <= 256
    assert gpu.train.iterations == 50000 and gpu.preprocess.input_size == [512, 512]
    assert gpu.train.amp == "auto" and gpu.train.batch == 32 and gpu.train.device == "cuda"
    assert gpu.train.device_data and not cpu.train.device_data  # GPU-resident data: default on for the gpu profile
    assert cpu.model.config() == gpu.model.config()
    assert Path(cpu.data_path()) == SD900.resolve()


def test_unknown_profile(tmp_path, cli):
    line = one_error_line(cli("train", RECIPE, "--profile", "tpu", "--data", "synthetic:4", "--out", tmp_path / "o"))
    assert "no profile 'tpu'" in line


# ---------------------------------------------------------------------------------------------
# losses and batched augmentation / preprocessing


def test_ssim_separable_matches_2d_window_and_identity():
    from edgekit.train.losses import ssim, ssim_loss, ssim_reference

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 40, 48, generator=g)
    y = (torch.rand(2, 1, 40, 48, generator=g) > 0.7).float()
    assert float(ssim(x, y)) == pytest.approx(float(ssim_reference(x, y)), abs=1e-6)
    assert float(ssim_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(ssim(x, y)) < 0.5


def test_deep_supervision_loss_is_the_sum_of_head_losses():
    from edgekit.train.losses import DeepSupervisionLoss

    g = torch.Generator().manual_seed(1)
    heads = [torch.rand(3, 1, 32, 32, generator=g).clamp(0.01, 0.99) for _ in range(5)]
    y = (torch.rand(3, 1, 32, 32, generator=g) > 0.8).float()
    for dice in (False, True):
        crit = DeepSupervisionLoss(dice=dice)
        assert float(crit(heads, y)) == pytest.approx(float(sum(crit.head_loss(h, y) for h in heads)), rel=1e-5)
    w = DeepSupervisionLoss(head_weights=[1, 0, 0, 0, 0])
    assert float(w(heads, y)) == pytest.approx(float(w.head_loss(heads[0], y)), rel=1e-5)


def test_batched_preprocess_matches_inference_preprocess():
    from edgekit.data.preprocess import PreprocessSpec, preprocess
    from edgekit.data.synthetic import generate
    from edgekit.train.data import normalize

    imgs = [generate(i)[0] for i in range(3)]
    spec = PreprocessSpec(input_size=(96, 96))
    ours = normalize(torch.from_numpy(np.stack(imgs)).float(), spec).numpy()
    np.testing.assert_allclose(ours, preprocess(imgs, spec), atol=1e-5)


def test_augment_keeps_image_and_mask_aligned():
    from edgekit.train.data import augment
    from edgekit.train.recipe import AugmentSection

    img = torch.zeros(8, 20, 30, dtype=torch.uint8)
    img[:, 2:5, 3:9] = 200
    img[:, 10:, :] = 50  # some texture so the mean-centred scaling is visible
    mask = (img == 200).to(torch.uint8) * 255
    x, y = augment(img, mask, AugmentSection(hflip=0.5, vflip=0.5, shift=0.0, scale=0.0),
                   torch.Generator().manual_seed(3))
    assert torch.equal(x == 200, y > 0.5)  # the defect moved with its mask
    assert not torch.equal(x, img.float())  # at least one sample was flipped
    x2, _ = augment(img, mask, AugmentSection(hflip=0, vflip=0, shift=0.1, scale=0.2), torch.Generator().manual_seed(4))
    assert x2.min() >= 0 and x2.max() <= 255
    xm = x2 / x2.amax(dim=(1, 2), keepdim=True)  # the divide-by-max does not undo the augmentation
    im = img.float() / 200
    assert (xm - im).abs().amax() > 0.01


def test_crop_takes_the_same_window_of_image_and_mask_after_whole_image_preprocessing():
    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.train.data import TrainSet, make_batch, normalize
    from edgekit.train.recipe import AugmentSection

    g = torch.Generator().manual_seed(5)
    img = (torch.rand(6, 64, 64, generator=g) * 100).to(torch.uint8)
    mask = torch.zeros_like(img)
    for i in range(6):  # one bright defect per image, at a different place
        r, c = 8 * i, 50 - 7 * i
        img[i, r:r + 6, c:c + 5] = 250
        mask[i, r:r + 6, c:c + 5] = 255
    ts = TrainSet(img, mask, [str(i) for i in range(6)], ["a"] * 6)
    spec = PreprocessSpec(input_size=(64, 64))
    aug = AugmentSection(hflip=0, vflip=0, shift=0, scale=0, crop=[32, 32])
    x, y = make_batch(ts, torch.arange(6), aug, spec, torch.Generator().manual_seed(7))
    assert x.shape == (6, 3, 32, 32) and y.shape == (6, 1, 32, 32)
    full = normalize(img.float(), spec)  # the divide-by-max saw the whole image, not the window
    bright = float(full.max())
    assert torch.equal(x[:, 0] > bright - 1e-4, y[:, 0] > 0.5)  # the defect stayed with its mask
    windows = {tuple(map(int, (y[i, 0] > 0.5).nonzero().min(0).values)) for i in range(6) if y[i].any()}
    assert len(windows) > 1  # windows differ per sample
    for i in range(6):  # each window is a crop of the whole preprocessed image
        hits = [(t, l) for t in range(33) for l in range(33) if torch.equal(full[i, :, t:t + 32, l:l + 32], x[i])]
        assert hits


def test_sampler_is_a_function_of_seed_and_iteration():
    from edgekit.train.data import EpochSampler

    a = EpochSampler(10, 4, seed=7)
    seq = [a.indices(i) for i in range(5)]
    b = EpochSampler(10, 4, seed=7)
    assert torch.equal(b.indices(3), seq[3]) and torch.equal(b.indices(0), seq[0])
    first_epoch = torch.cat(seq)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))  # without replacement within an epoch


def test_init_fine_tunes_a_checkpoint_of_its_own_architecture(synthetic_run, tmp_path, cli):
    """--init takes the checkpoint's architecture (here: other widths than the recipe's) and weights,
    and records where it started in the provenance."""
    import torch

    from edgekit.models.checkpoint import Checkpoint, load_checkpoint
    from edgekit.models.gmbinet import GMBINet

    from conftest import tiny_config

    recipe, _, _ = synthetic_run
    torch.manual_seed(0)
    start = Checkpoint.from_model(GMBINet(tiny_config())).save(tmp_path / "start.pt")
    r = cli("train", recipe, *SYN_ARGS, "--out", tmp_path / "ft", "--init", start)
    assert r.exit_code == 0, r.stderr
    ck = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert ck.config["widths"] == list(tiny_config().widths)
    assert ck.provenance["init"]["sha256"] == load_checkpoint(start).sha256
    assert not torch.equal(ck.state_dict["encoder1.0.weight"], load_checkpoint(start).state_dict["encoder1.0.weight"])


def test_a_fine_tuning_run_resumes_with_its_own_architecture_and_keeps_its_origin(synthetic_run, tmp_path, cli):
    """A run started with --init (e.g. a pruned model: other widths than the recipe's) resumes from
    its last.pt with the same recipe, and the resumed run's best.pt still names its start."""
    from edgekit.models.checkpoint import Checkpoint, load_checkpoint
    from edgekit.models.gmbinet import GMBINet
    from edgekit.train.loop import train
    from edgekit.train.recipe import load_recipe

    from conftest import tiny_config

    recipe, _, _ = synthetic_run
    torch.manual_seed(0)
    start = Checkpoint.from_model(GMBINet(tiny_config())).save(tmp_path / "start.pt")
    out = tmp_path / "ft"
    res = train(load_recipe(recipe, "cpu"), data="synthetic:8", out_dir=str(out), iterations=4, limit_images=6,
                stop_after=2, init=load_checkpoint(start))
    assert res.stopped_early
    (out / "best.pt").unlink()  # only the resumed half may write it now
    r = cli("train", recipe, *SYN_ARGS, "--resume", out / "last.pt")
    assert r.exit_code == 0, r.stderr
    ck = load_checkpoint(out / "best.pt")
    assert ck.config["widths"] == list(tiny_config().widths)
    assert ck.provenance["init"]["sha256"] == load_checkpoint(start).sha256
    assert ck.provenance["resumed_from"]["iteration"] == 2


def test_init_and_resume_exclude_each_other(synthetic_run, tmp_path, cli):
    recipe, full, _ = synthetic_run
    r = cli("train", recipe, *SYN_ARGS, "--out", tmp_path / "o", "--init", full / "best.pt", "--resume", full / "last.pt")
    assert "--init and --resume" in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_distillation_pulls_the_student_towards_the_teacher(tmp_path):
    """With only the distillation term (bce = ssim = 0), training moves the student's main head
    towards the teacher's."""
    import torch

    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.models.checkpoint import Checkpoint, load_checkpoint
    from edgekit.models.gmbinet import GMBINet
    from edgekit.train.loop import train
    from edgekit.train.recipe import load_recipe

    from conftest import tiny_config

    torch.manual_seed(0)
    teacher, student = GMBINet(tiny_config()).eval(), GMBINet(tiny_config()).eval()
    r = load_recipe(RECIPE, "cpu")
    r.preprocess.input_size = [64, 64]
    r.loss.bce, r.loss.ssim, r.loss.distill = 0.0, 0.0, 1.0
    r.train.batch, r.train.val_every, r.train.checkpoint_every, r.train.threads = 4, 10, 10, 1
    x = torch.randn(4, 3, 64, 64)

    def gap(m):
        with torch.no_grad():
            return float((m.eval()(x) - teacher(x)).abs().mean())

    before = gap(student)
    init = Checkpoint.from_model(student, preprocess=PreprocessSpec(input_size=(64, 64)))
    res = train(r, data="synthetic:8", out_dir=str(tmp_path / "kd"), iterations=10, limit_images=6, init=init,
                teacher=teacher)
    assert gap(load_checkpoint(res.best).build()) < before
