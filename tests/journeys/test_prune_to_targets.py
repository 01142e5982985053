"""Journey (issue 19): prune a checkpoint at 0.125 / 0.25 / 0.5 -> compile each for every CPU target -> eval.

One command after another through the CLI in a fresh folder, as a user would (the README: a pruned model
"compiles like any other"). Each hand-off is checked: the pruned checkpoint is what `info` reads (smaller
widths, every one a width each target accepts: item 2 of the issue, where 0.125 gave widths cpu-fused
refused), each artifact names the pruned file it was compiled from (sha256) and agrees with it in `eval`.

Small on purpose: the tiny 64x64 checkpoint, synthetic data, a few BN-recalibration and Taylor images,
--limit 4 in eval. The cpu-fused kernel libraries are built once (the journey's own cache).
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from journey_cli import cpu_targets, edgekit

pytestmark = pytest.mark.slow

RATIOS = (0.125, 0.25, 0.5)


def test_prune_at_three_ratios_then_every_target_then_eval(tmp_path, tiny_ckpt):
    work = tmp_path / "journey"
    work.mkdir()
    shutil.copy(tiny_ckpt, work / "model.pt")
    edgekit(work, "synth", "--out", "data", "-n", "4")
    before = json.loads(edgekit(work, "info", "model.pt", "--json").stdout)["config"]["widths"]

    targets = cpu_targets()
    last = None
    for ratio in RATIOS:
        pruned = f"pruned-{ratio}.pt"
        r = edgekit(work, "prune", "model.pt", "--ratio", ratio, "--data", "synthetic:8", "--bn-images", 8,
                    "--taylor-images", 4, "--out", pruned, "--json")
        report = json.loads(r.stdout)

        # hand-off 1: the file prune wrote is the model it reported, and info reads it as such
        info = json.loads(edgekit(work, "info", pruned, "--json").stdout)
        widths = info["config"]["widths"]
        assert widths == report["widths_after"] and info["sha256"] == hashlib.sha256(
            (work / pruned).read_bytes()).hexdigest()
        assert all(w <= b for w, b in zip(widths, before)) and sum(widths) < sum(before)
        assert all(w % 4 == 0 for w in widths), f"ratio {ratio}: widths {widths} are not what every target compiles"
        assert info["provenance"]["pruned_from_sha256"] == hashlib.sha256((work / "model.pt").read_bytes()).hexdigest()
        if last is not None:
            assert sum(widths) <= sum(last), "a larger ratio kept more channels"
        last = widths

        ref = json.loads(edgekit(work, "eval", pruned, "--data", "data", "--limit", 4, "--json").stdout)["overall"]
        for target in targets:
            out = f"art/{ratio}/{target}"
            # hand-off 2: every target compiles the pruned checkpoint, and the artifact names it
            edgekit(work, "compile", pruned, "--target", target, "--out", out)
            manifest = json.loads((work / out / "manifest.json").read_text())
            assert manifest["target"] == target and manifest["model"]["config"]["widths"] == widths
            assert manifest["source"]["sha256"] == info["sha256"]
            assert manifest["parity"]["mask_iou_agreement"] > 0.99

            # hand-off 3: eval reads the artifact and agrees with the pruned checkpoint on the same images
            ev = json.loads(edgekit(work, "eval", out, "--data", "data", "--limit", 4, "--json").stdout)["overall"]
            assert ev["images"] == ref["images"] == 4
            assert ev["iou"] == pytest.approx(ref["iou"], abs=0.01)
            assert ev["mae"] == pytest.approx(ref["mae"], abs=0.005)
