"""``edgekit train --nproc N``: real processes (torch.distributed.run, gloo), rank 0 writes, resume with another N."""
from __future__ import annotations

import json

import pytest
import torch

from test_train import SYN_ARGS, _check_run, one_error_line, write_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny recipe (global batch 4) trained by one process and by two."""
    from click.testing import CliRunner

    from edgekit.cli import main

    tmp = tmp_path_factory.mktemp("dist")
    recipe = write_recipe(tmp / "tiny.yaml")
    out = {}
    for n in (1, 2):
        out[n] = tmp / f"n{n}"
        r = CliRunner().invoke(main, ["train", str(recipe), *SYN_ARGS, "--out", str(out[n]), "--nproc", str(n)],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
        assert "best.pt" in r.stdout and "test MAE" in r.stdout
    return recipe, out


def test_two_processes_train_like_one(runs):
    recipe, out = runs
    ck = _check_run(out[2], 4, "synthetic:8")  # rank 0 wrote the same files a single process writes
    assert sorted(p.name for p in out[2].iterdir()) == ["best.pt", "last.pt", "report.json"]
    h1 = json.loads((out[1] / "report.json").read_text())["history"]
    h2 = json.loads((out[2] / "report.json").read_text())["history"]
    assert [h["iteration"] for h in h1] == [h["iteration"] for h in h2]
    for a, b in zip(h1, h2):
        # same samples and augmentations; BatchNorm sees 2-image shards instead of the 4-image batch
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
        assert b["val_mae"] == pytest.approx(a["val_mae"], abs=0.01)
    s1 = torch.load(out[1] / "last.pt", map_location="cpu", weights_only=True)
    s2 = torch.load(out[2] / "last.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in s2["state_dict"])  # the plain model, not the DDP wrapper
    assert s1["state_dict"].keys() == s2["state_dict"].keys()
    assert ck.provenance["batch"] == 4


def test_resume_with_another_process_count(runs, tmp_path, cli):
    recipe, out = runs
    for src, n in ((out[1], 2), (out[2], 1)):
        dst = tmp_path / f"from_{src.name}_n{n}"
        r = cli("train", recipe, "--profile", "cpu", "--data", "synthetic:8", "--limit-images", 6, "--iterations", 6,
                "--resume", src / "last.pt", "--out", dst, "--nproc", n)
        assert r.exit_code == 0, r.stderr
        state = torch.load(dst / "last.pt", map_location="cpu", weights_only=True)
        assert state["iteration"] == 6 and [h["iteration"] for h in state["history"]] == [2, 4, 6]


def test_global_batch_must_split(runs, tmp_path, cli):
    recipe, _ = runs
    line = one_error_line(cli("train", recipe, *SYN_ARGS, "--out", tmp_path / "o", "--nproc", 3))
    assert "does not split over 3 processes" in line
    assert not (tmp_path / "o").exists()
