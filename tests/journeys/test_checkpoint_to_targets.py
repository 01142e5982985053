"""Journey (issue 19): a user's checkpoint -> every CPU target -> eval -> predict -> bench, one command
after another through the installed CLI in a fresh folder, each output handed to the next command
as a user would. Each hand-off is checked: what one command writes is what the next one reads.

Small on purpose (a tiny 64x64 checkpoint, 6 synthetic images, --limit, 1 round) so it stays near a
minute on 2 idle cores; the g++ build of cpu-fused's kernel libraries is the longest step."""
from __future__ import annotations

import json
import shutil

import pytest

from journey_cli import cpu_targets, edgekit

pytestmark = pytest.mark.slow


def test_checkpoint_to_every_target_then_eval_predict_bench(tmp_path, tiny_ckpt):
    work = tmp_path / "journey"
    work.mkdir()
    shutil.copy(tiny_ckpt, work / "model.pt")  # "my checkpoint"

    # the data a user has: images and masks (here written by edgekit synth)
    edgekit(work, "synth", "--out", "data", "-n", "6")
    images = sorted((work / "data" / "images").iterdir())
    assert len(images) == 6 and len(list((work / "data" / "masks").iterdir())) == 6

    # the checkpoint's own figures: what every artifact must keep
    ref = json.loads(edgekit(work, "eval", "model.pt", "--data", "data", "--limit", "4", "--json").stdout)
    assert ref["overall"]["images"] == 4

    targets = cpu_targets()
    for target in targets:
        r = edgekit(work, "compile", "model.pt", "--target", target, "--out", f"art/{target}", "--json")
        manifest = json.loads(r.stdout)
        # hand-off 1: the folder on disk is the artifact the command described
        on_disk = json.loads((work / "art" / target / "manifest.json").read_text())
        assert manifest["target"] == on_disk["target"] == target and on_disk["precision"] == "fp32"
        assert on_disk["parity"]["images"] > 0 and on_disk["parity"]["mask_iou_agreement"] > 0.99
        folder = work / "art" / target
        assert set(on_disk["files"]) <= {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

        # hand-off 2: eval reads the artifact and agrees with the checkpoint on the same images
        ev = json.loads(edgekit(work, "eval", f"art/{target}", "--data", "data", "--limit", "4", "--json").stdout)
        assert ev["overall"]["images"] == 4
        assert ev["overall"]["iou"] == pytest.approx(ref["overall"]["iou"], abs=0.01)
        assert ev["overall"]["mae"] == pytest.approx(ref["overall"]["mae"], abs=0.005)

        # hand-off 3: predict takes the artifact folder and the user's images, writes a mask per image
        edgekit(work, "predict", f"art/{target}", *images[:2], "--out", f"pred/{target}")
        written = {p.name for p in (work / "pred" / target).iterdir()}
        assert written == {f"{p.stem}_{kind}.png" for p in images[:2] for kind in ("mask", "overlay")}

    # hand-off 4: bench takes the artifacts (no checkpoint) and times each of them
    r = edgekit(work, "bench", *[f"art/{t}" for t in targets], "--data", "data", "--limit", "2", "--rounds", "1",
                "--iters", "3", "--batch", "1", "--json", timeout=300)
    bench = json.loads(r.stdout)
    names = [row["name"] for row in bench["rows"]]
    for target in targets:
        assert [n for n in names if n.startswith(target)], f"no bench row for {target}: {names}"
    for row in bench["rows"]:
        assert row["fps_b1"] > 0 and row["iou"] is not None, row

    # a hand-off that must be refused in one line: a cpu-fused artifact is no source for openvino
    if "cpu-fused" in targets:
        r = edgekit(work, "compile", "art/cpu-fused", "--target", "openvino", "--out", "art/ov2", expect=2)
        assert "cpu-fused artifact" in r.stderr and "onnx" in r.stderr and not (work / "art" / "ov2").exists()

    assert not [p.name for p in (work / "art").iterdir() if p.name.startswith(".")]  # no half-written folder
