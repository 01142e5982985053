"""``edgekit prune``: the GMBI module as one pruning unit, pruned checkpoints, export, refusals.

The central check: a pruned network computes exactly what the unpruned one computes when the
removed channels are made dead (every producer's BN zeroed, every consumer's weights zeroed). That
holds only if every layer, every GMBI group, the gating chain and the residuals lost the same
channels, so it tests the index bookkeeping end to end without looking at how it is done.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import one_error_line, tiny_config

tp = pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (pip install torch-pruning)")

from edgekit.train.losses import DeepSupervisionLoss  # noqa: E402
from edgekit.compress.prune import (GMBIAwareImportance, GMBIPruner, _prunable_copy, opaque_gmbi,  # noqa: E402
                                    prune_gmbinet, recalibrate_batchnorm, widths_of)
from edgekit.models.gmbinet import GMBI, GMBINet  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gmbinet_sd900.yaml"


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so that dead and live channels differ."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _kill(model: nn.Module, name: str, handler, idxs) -> None:
    """Make channels ``idxs`` of module ``name`` dead, for the dimension ``handler`` prunes."""
    m = model.get_submodule(name)
    i = torch.as_tensor(list(idxs), dtype=torch.long)
    out_dim = "out" in getattr(handler, "__name__", "")
    with torch.no_grad():
        if isinstance(m, GMBI):
            start = 0
            for conv in m.group_convs:
                g = conv[0].out_channels
                loc = i[(i >= start) & (i < start + g)] - start
                for p in (conv[0].weight, conv[0].bias, conv[1].weight, conv[1].bias):
                    p[loc] = 0
                start += g
            f = m.fusion[0]
            f.weight[i] = 0
            f.weight[:, i] = 0
            f.bias[i] = 0
            m.fusion[1].weight[i] = 0
            m.fusion[1].bias[i] = 0
        elif isinstance(m, nn.BatchNorm2d):
            m.weight[i] = 0
            m.bias[i] = 0
        elif isinstance(m, nn.Conv2d):
            if out_dim or (m.groups > 1 and m.groups == m.out_channels):
                m.weight[i] = 0
                m.bias[i] = 0
            else:
                m.weight[:, i] = 0


def _prune_and_kill(work: GMBINet, dead: GMBINet, importance, ratio: float, apply: bool) -> int:
    """Let Torch-Pruning choose channels of ``work`` (pruning them there when ``apply``) and make the
    same channels dead in ``dead``; returns the number of groups."""
    names = {m: n for n, m in work.named_modules()}
    work.all_heads = True
    heads = [getattr(work, f"conv_out{i}")[1] for i in range(1, 6)]
    n_groups = 0
    with opaque_gmbi(work):
        pruner = tp.pruner.MetaPruner(work, torch.randn(1, 3, 64, 64), importance=importance, pruning_ratio=ratio,
                                      ignored_layers=heads, customized_pruners={GMBI: GMBIPruner()})
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                if dep.target.module in names:
                    _kill(dead, names[dep.target.module], dep.handler, idxs)
            if apply:
                group.prune()
            n_groups += 1
    work.all_heads = None
    return n_groups


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pruned_network_equals_the_original_with_those_channels_dead(ratio):
    torch.manual_seed(0)
    src = _random_bn(GMBINet(tiny_config(widths=(8, 16, 32, 32, 48))))
    work, dead = copy.deepcopy(src), copy.deepcopy(src)
    assert _prune_and_kill(work, dead, GMBIAwareImportance(p=2), ratio, apply=True) >= 5
    work.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, b = work(x), dead(x)
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert widths_of(work) != widths_of(src)


@pytest.mark.parametrize("importance", ["taylor", "magnitude", "magnitude-gmbi"])
def test_every_importance_removes_channels_that_carry_nothing(importance):
    """Kill as many channels per group as the ratio removes; each ranking must pick exactly those
    (Taylor sees them through the loss gradients), so pruning changes no output."""
    torch.manual_seed(4)
    src = _random_bn(GMBINet(tiny_config(widths=(8, 16, 32, 32, 48))))
    dead = copy.deepcopy(src)
    _prune_and_kill(copy.deepcopy(src), dead, tp.importance.RandomImportance(), 0.25, apply=False)  # what to kill
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 64, 64, generator=g), (torch.rand(2, 1, 64, 64, generator=g) > 0.8).float())]
    pruned, report = prune_gmbinet(dead, 0.25, macs_size=64, importance=importance, grad_batches=batches,
                                   criterion=DeepSupervisionLoss())
    assert report.importance == importance and report.widths_after == [6, 12, 24, 24, 36]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), dead.eval()(x), atol=1e-5)
    assert all(p.grad is None for p in dead.parameters())  # the source model is left as it was


def test_taylor_without_data_refuses(tmp_path, cli):
    out = tmp_path / "p.pt"
    r = cli("prune", "--ratio", "0.25", "--importance", "taylor", "--out", out)
    assert "--data" in one_error_line(r)
    assert not out.exists()


def test_gmbi_groups_stay_equal_and_config_describes_the_pruned_model(tmp_path):
    from edgekit.models.checkpoint import Checkpoint, load_checkpoint

    torch.manual_seed(1)
    src = _random_bn(GMBINet(tiny_config(widths=(8, 16, 32, 32, 48))))
    pruned, report = prune_gmbinet(src, 0.25, macs_size=64)
    assert report.widths_after == [6, 12, 24, 24, 36]
    for m in pruned.gmbi_modules():
        sizes = m.split_sizes()
        assert len(set(sizes)) == 1 and sizes[0] > 0
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    # A plain edgekit checkpoint: loads with weights_only=True and rebuilds from its config alone.
    path = Checkpoint.from_model(pruned).save(tmp_path / "p.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["widths"] == [6, 12, 24, 24, 36]
    rebuilt = load_checkpoint(path).build()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))


def test_ratio_zero_is_the_identity():
    torch.manual_seed(2)
    src = _random_bn(GMBINet(tiny_config()))
    same, report = prune_gmbinet(src, 0.0, macs_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(same(x), src(x))
    assert report.widths_after == report.widths_before


def test_published_model_prunes_and_drops_unused_extras(published_ckpt):
    from edgekit.models.checkpoint import load_checkpoint

    model = load_checkpoint(published_ckpt).build()
    assert model.config.upstream_extras  # the authors' file carries never-called modules
    pruned, report = prune_gmbinet(model, 0.25)
    assert report.widths_after == [12, 24, 48, 72, 96]
    assert not pruned.config.upstream_extras
    assert _prunable_copy(model).inference_parameter_count() == report.params_before


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory):
    """A pruned copy of a tiny random GMBINet, written by the CLI."""
    from click.testing import CliRunner

    from edgekit.cli import main
    from edgekit.models.checkpoint import Checkpoint

    tmp = tmp_path_factory.mktemp("prune")
    torch.manual_seed(3)
    src = Checkpoint.from_model(_random_bn(GMBINet(tiny_config(widths=(8, 16, 32, 32, 48))))).save(tmp / "src.pt")
    out = tmp / "pruned.pt"
    r = CliRunner().invoke(main, ["prune", str(src), "--ratio", "0.5", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def test_cli_prune_reports_and_writes_a_checkpoint(pruned_ckpt):
    out, result = pruned_ckpt
    assert out.is_file()
    assert result["widths_after"] == [4, 8, 16, 16, 24]
    assert result["params_after"] < result["params_before"]
    assert result["macs_after"] < result["macs_before"]


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_pruned_model_exports_and_matches_its_torch_outputs(pruned_ckpt, tmp_path, target):
    pytest.importorskip("onnxruntime" if target == "onnx" else "openvino")
    from edgekit.pipeline.compile import compile_model
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.runtime import load

    ckpt, _ = pruned_ckpt
    manifest = compile_model(str(ckpt), target, "fp32", str(tmp_path / target), parity_data="synthetic:4",
                             log=lambda *a: None)
    assert manifest["model"]["config"]["widths"] == [4, 8, 16, 16, 24]
    runner = load(tmp_path / target)
    x = torch.randn(1, *runner.input_shape)
    with torch.no_grad():
        ref = load_checkpoint(ckpt).build()(x).numpy()
    assert abs(runner.infer(x.numpy()) - ref).max() < 1e-4


def test_bad_ratio_refuses_without_output(tmp_path, cli):
    out = tmp_path / "p.pt"
    r = cli("prune", "--ratio", "1.5", "--out", out)
    assert "ratio" in one_error_line(r)
    assert not out.exists()


def test_existing_output_is_not_overwritten(pruned_ckpt, cli):
    out, _ = pruned_ckpt
    before = out.read_bytes()
    r = cli("prune", out, "--ratio", "0.25", "--out", out)
    assert "exists" in one_error_line(r)
    assert out.read_bytes() == before


def test_bad_finetune_recipe_names_the_key_before_any_work(tmp_path, cli):
    import yaml

    d = yaml.safe_load(RECIPE.read_text())
    d["optimizer"]["lr_typo"] = 2
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(d, sort_keys=False))
    out = tmp_path / "p.pt"
    r = cli("prune", "--ratio", "0.25", "--finetune", recipe, "--out", out)
    assert "lr_typo" in one_error_line(r)
    assert not out.exists()


def test_finetune_runs_from_the_pruned_weights(pruned_ckpt, tmp_path, cli):
    """Prune + fine-tune end to end on synthetic data (a shrunk finetune profile)."""
    import yaml

    from edgekit.models.checkpoint import load_checkpoint

    src, _ = pruned_ckpt
    d = yaml.safe_load(RECIPE.read_text())
    d["profiles"]["finetune"]["preprocess"]["input_size"] = [64, 64]
    d["profiles"]["finetune"]["train"].update(batch=2, val_every=2, checkpoint_every=2, val_batch=4, threads=1)
    d["profiles"]["finetune"]["loss"] = {"distill": 1.0}  # the unpruned model as teacher
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(yaml.safe_dump(d, sort_keys=False))
    out = tmp_path / "ft.pt"
    r = cli("prune", src, "--ratio", "0.25", "--finetune", recipe, "--data", "synthetic:8", "--iterations", "2",
            "--limit-images", "4", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["finetune"]["iterations"] == 2 and 0.0 <= result["finetune"]["test"]["iou"] <= 1.0
    assert result["finetune"]["distill"] == 1.0
    ck = load_checkpoint(out)
    assert ck.provenance["prune"]["widths_after"] == ck.config["widths"] == result["widths_after"]
    assert ck.provenance["finetune"]["iterations"] == 2


# ---------------------------------------------------------------------------------------------
# BatchNorm recalibration after pruning


class _BodyAndUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.BatchNorm2d(4)  # like GMBINet's side heads: not reached by the forward pass

    def forward(self, x):
        return self.body(x)


def test_bn_recalibration_stores_the_statistics_of_the_images_seen():
    torch.manual_seed(0)
    model = _BodyAndUnusedHead()
    net, unused = model.body, model.head
    before_unused = unused.running_mean.clone(), unused.running_var.clone()
    batches = [torch.randn(5, 3, 12, 12) * 3 + 1 for _ in range(4)]
    model.train()  # the caller's mode comes back afterwards
    assert recalibrate_batchnorm(model, iter(batches)) == 20
    with torch.no_grad():
        acts = torch.cat([net[0](b) for b in batches])
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, acts.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    per_batch_var = torch.stack([net[0](b).detach().var(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch_var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and model.training and bn.training
    assert torch.equal(unused.running_mean, before_unused[0]) and torch.equal(unused.running_var, before_unused[1])


def test_bn_recalibration_with_no_images_changes_nothing():
    from edgekit.errors import EdgekitError

    net = _random_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(EdgekitError, match="no images"):
        recalibrate_batchnorm(net, iter([]))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training


def test_bn_recalibration_restores_accuracy_of_the_pruned_published_model(published_ckpt, sd900):
    """On real images: one-shot pruning breaks the BN statistics; recalibrating them on train
    images (forward passes only) recovers most of the accuracy before any fine-tuning."""
    from edgekit.compress.prune import prune_checkpoint
    from edgekit.train.prune import bn_batches
    from edgekit.data.datasets import limit_samples, open_segmentation
    from edgekit.eval.evaluate import evaluate
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.backends.torch_eager import TorchRunner

    ck = load_checkpoint(published_ckpt)
    val = open_segmentation(str(sd900), "val")
    val.samples = limit_samples(val.samples, 8)
    train = open_segmentation(str(sd900), "train")
    plain, _ = prune_checkpoint(ck, 0.125)
    recal, _ = prune_checkpoint(ck, 0.125, bn_batches=bn_batches(train, ck.preprocess, 32))
    assert plain.provenance["bn_recalibration"] is None
    assert recal.provenance["bn_recalibration"]["images"] == 32
    iou = {name: evaluate(TorchRunner(c, threads=2), val, show_progress=False)["overall"]["iou"]
           for name, c in (("plain", plain), ("recal", recal))}
    assert iou["recal"] > iou["plain"] + 0.3, iou  # whole val split (magnitude ranking): 0.17 -> 0.71


def test_cli_prune_with_data_recalibrates_and_checks_on_val(pruned_ckpt, tmp_path, cli):
    from edgekit.models.checkpoint import load_checkpoint

    src, _ = pruned_ckpt
    out = tmp_path / "p.pt"
    r = cli("prune", src, "--ratio", "0.25", "--data", "synthetic:12", "--bn-images", "6", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["bn_recalibration"]["images"] == 6
    assert result["importance"] == "taylor"  # auto: data given
    check = result["check"]
    assert check["images"] > 0 and 0 <= check["source_iou"] <= 1 and 0 <= check["pruned_iou"] <= 1
    ck = load_checkpoint(out)
    assert ck.provenance["bn_recalibration"] == result["bn_recalibration"] and ck.provenance["check"] == check
