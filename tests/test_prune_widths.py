"""``edgekit prune`` keeps channel counts every registered backend compiles (issue #19, item 2).

Before: ``prune --ratio 0.125`` of the published widths gave [14, 28, 56, 84, 112] and
``compile --target cpu-fused`` refused it ("divisible by 4"). Now prune asks the backend registry
for the least common multiple of every backend's ``channel_multiple`` and rounds each kept count up
to it (``--exact`` keeps the old widths). Since issue #20 item 2 cpu-fused takes any width (multiple 1;
cuda-fused still asks for 4), so the --exact widths compile to it too. The models here have the
published model's widths at depth 1, so every prune takes seconds.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import one_error_line, tiny_config

pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (pip install torch-pruning)")

from edgekit.backends import registry  # noqa: E402
from edgekit.backends.registry import BackendSpec, common_channel_multiple, get_backend, register_backend  # noqa: E402
from edgekit.compress.prune import prune_gmbinet  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.models.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from edgekit.models.gmbinet import GMBINet  # noqa: E402

from test_prune import _random_bn  # noqa: E402

PUBLISHED_WIDTHS = (16, 32, 64, 96, 128)
# What the ratio alone keeps of PUBLISHED_WIDTHS (Torch-Pruning: int(per-group size * (1 - ratio)) per group).
EXACT = {0.125: [14, 28, 56, 84, 112], 0.25: [12, 24, 48, 72, 96], 0.5: [8, 16, 32, 48, 64]}


def _model(widths=PUBLISHED_WIDTHS, seed: int = 0) -> GMBINet:
    """A random GMBINet with non-trivial BatchNorm statistics (so pruned channels matter)."""
    torch.manual_seed(seed)
    return _random_bn(GMBINet(tiny_config(widths=widths)), seed).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return Checkpoint.from_model(_model()).save(tmp_path_factory.mktemp("prune_widths") / "src.pt")


def _prune(cli, src, out, *args):
    r = cli("prune", src, "--out", out, "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def _counts(ck) -> list:
    """The five stage widths and the head width of a saved checkpoint (its config says them all)."""
    widths = list(ck.config["widths"])
    return widths + [ck.config.get("head_width") or widths[0]]


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5])
def test_prune_keeps_widths_every_registered_backend_compiles(source, tmp_path, cli, ratio):
    multiple, required_by = common_channel_multiple()
    assert "cpu-fused" not in required_by and required_by["cuda-fused"] == 4 and multiple % 4 == 0
    out = tmp_path / "p.pt"
    result, stderr = _prune(cli, source, out, "--ratio", ratio)
    ck = load_checkpoint(out)
    counts = _counts(ck)
    assert all(c % multiple == 0 for c in counts), counts
    rounding = result["rounding"]
    assert rounding["widths_exact"] == EXACT[ratio] and rounding["required_by"] == required_by
    # Rounded towards keeping more, by less than one step of the multiple and the GMBI groups together.
    for kept, exact in zip(counts, EXACT[ratio] + [EXACT[ratio][0]]):
        assert exact <= kept < exact + math.lcm(multiple, 4)
    assert ck.provenance["prune"]["rounding"] == rounding and ck.provenance["prune"]["widths_after"] == counts[:5]
    changed = counts != EXACT[ratio] + [EXACT[ratio][0]]
    assert ("rounded up to multiples of 4" in stderr) == changed, stderr  # said on stderr when it changed something
    assert changed == (ratio == 0.125)  # the case: stem and head 14 -> 16


def test_rounded_pruned_model_compiles_to_cpu_fused_and_matches_pytorch(source, tmp_path, cli):
    """The issue's journey: prune 0.125, compile for cpu-fused (parity against PyTorch passes), run it."""
    why = get_backend("cpu-fused").not_here()
    if why:
        pytest.skip(f"cpu-fused cannot be built here: {why}")
    from edgekit import runtime

    pruned = tmp_path / "p.pt"
    _prune(cli, source, pruned, "--ratio", "0.125")
    art = tmp_path / "art"
    r = cli("compile", pruned, "--target", "cpu-fused", "--parity-data", "synthetic:2", "--threads", "1",
            "--out", art, "--json")
    assert r.exit_code == 0, r.stderr
    man = json.loads((art / "manifest.json").read_text())
    assert man["target"] == "cpu-fused" and man["net"]["widths"] == [16, 28, 56, 84, 112]
    assert man["parity"]["images"] == 2 and man["parity"]["max_abs_diff"] <= 1e-4, man["parity"]
    runner = runtime.load(art, threads=1)
    x = torch.randn(2, *runner.input_shape)
    with torch.no_grad():
        ref = load_checkpoint(pruned).build().eval()(x).numpy()
    got = runner.infer(x.numpy())
    assert ref.std() > 0 and np.abs(got - ref).max() <= 1e-4


def test_exact_keeps_the_ratio_widths_which_cpu_fused_compiles(source, tmp_path, cli):
    out = tmp_path / "exact.pt"
    result, stderr = _prune(cli, source, out, "--ratio", "0.125", "--exact")
    assert result["widths_after"] == EXACT[0.125] and result["rounding"] is None
    assert "rounded" not in stderr
    ck = load_checkpoint(out)
    assert ck.provenance["prune"]["rounding"] is None and _counts(ck) == EXACT[0.125] + [14]
    # The same widths as before this change (the library's default is exact).
    assert prune_gmbinet(load_checkpoint(source).build(), 0.125, macs_size=64)[1].widths_after == EXACT[0.125]
    why = get_backend("cpu-fused").not_here()
    if why:
        pytest.skip(f"cpu-fused cannot be built here: {why}")
    art = tmp_path / "art"
    r = cli("compile", out, "--target", "cpu-fused", "--parity-data", "synthetic:2", "--threads", "1", "--out", art)
    assert r.exit_code == 0, r.stderr  # any width (issue 20 item 2): stem and head 14
    man = json.loads((art / "manifest.json").read_text())
    assert man["net"]["widths"] == EXACT[0.125] and man["net"]["head_width"] == 14
    assert man["parity"]["images"] == 2 and man["parity"]["max_abs_diff"] <= 1e-4, man["parity"]
    # cuda-fused still needs multiples of 4 (its float4 loads over output channels): one line, nothing written
    r = cli("compile", out, "--target", "cuda-fused", "--out", tmp_path / "cuda")
    assert "divisible by 4" in one_error_line(r)
    assert not (tmp_path / "cuda").exists()


def _register(monkeypatch, name: str, multiple: int) -> None:
    """Register a real extra backend spec for this test only (the registry is restored afterwards)."""
    registry.backends()  # import the real ones first
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    register_backend(BackendSpec(name=name, description=f"a backend whose kernels need multiples of {multiple}",
                                 precisions=("fp32",), channel_multiple=multiple))


def test_a_backend_with_another_multiple_changes_the_rounding(source, tmp_path, cli, monkeypatch):
    _register(monkeypatch, "wide8", 8)
    assert common_channel_multiple() == (8, {"cuda-fused": 4, "wide8": 8})
    result, stderr = _prune(cli, source, tmp_path / "p.pt", "--ratio", "0.25")
    counts = _counts(load_checkpoint(tmp_path / "p.pt"))
    assert counts == [16, 24, 48, 72, 96, 16]  # exact [12, 24, 48, 72, 96], head 12: stem and head round up
    assert result["rounding"]["channel_multiple"] == 8 and result["rounding"]["required_by"]["wide8"] == 8
    assert "wide8 8" in stderr


def test_the_multiple_is_the_least_common_multiple_not_the_largest(source, tmp_path, cli, monkeypatch):
    _register(monkeypatch, "six", 6)
    assert common_channel_multiple()[0] == 12
    _prune(cli, source, tmp_path / "p.pt", "--ratio", "0.5")
    # exact [8, 16, 32, 48, 64]: a GMBI stage keeps 4 equal groups, so 4 * k must be a multiple of 12 (k of 3)
    assert _counts(load_checkpoint(tmp_path / "p.pt")) == [12, 24, 36, 48, 72, 12]


def test_a_width_with_no_multiple_above_the_ratio_keeps_fewer_and_says_so():
    """A source width that is not itself a multiple (6) cannot round up; it keeps the largest multiple
    below (noted), and one with no multiple at all is one error line naming the layer."""
    model = _model(widths=(6, 16, 32, 32, 48), seed=1)
    pruned, report = prune_gmbinet(model, 0.125, macs_size=64, channel_multiple=4)
    assert report.widths_after == [4, 12, 28, 28, 40] and report.rounding["head_width"] == 4
    assert report.rounding["widths_exact"] == [5, 12, 28, 28, 40]
    assert any(n.startswith("stage 1: 6 channels are not a multiple of 4: kept 4") for n in report.rounding["notes"])
    with pytest.raises(EdgekitError, match="6 channels cannot keep a multiple of 8"):
        prune_gmbinet(model, 0.125, macs_size=64, channel_multiple=8)


def test_rounded_pruning_removes_exactly_the_channels_it_ranks_lowest():
    """Rounding changes how many channels each group loses, not the bookkeeping: make dead as many
    channels per group as the rounded plan removes (chosen at random by Torch-Pruning with the same
    per-group ratios); the magnitude ranking must remove exactly those, so no output changes."""
    import copy

    import torch_pruning as tp

    from edgekit.compress.prune import GMBIPruner, _round_groups, opaque_gmbi
    from edgekit.models.gmbinet import GMBI
    from test_prune import _kill

    src = _model(seed=5)
    dead, chooser = copy.deepcopy(src), copy.deepcopy(src)
    names = {m: n for n, m in chooser.named_modules()}
    chooser.all_heads = True
    heads = [getattr(chooser, f"conv_out{i}")[1] for i in range(1, 6)]

    def make(ratio_dict=None):
        return tp.pruner.MetaPruner(chooser, torch.randn(1, 3, 64, 64), importance=tp.importance.RandomImportance(),
                                    pruning_ratio=0.25, ignored_layers=heads, customized_pruners={GMBI: GMBIPruner()},
                                    pruning_ratio_dict=ratio_dict, global_pruning=False)

    with opaque_gmbi(chooser):
        _, ratio_dict = _round_groups(make(), chooser, 0.25, 8)
        for group in make(ratio_dict).step(interactive=True):
            for dep, idxs in group:
                if dep.target.module in names:
                    _kill(dead, names[dep.target.module], dep.handler, idxs)
    pruned, report = prune_gmbinet(dead, 0.25, macs_size=64, channel_multiple=8)
    assert report.widths_after == [16, 24, 48, 72, 96] and report.rounding["head_width"] == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), dead.eval()(x), atol=1e-5)
