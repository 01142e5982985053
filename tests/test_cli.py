"""The core commands through click's runner: parity, outputs, and one clear line on bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgekit.data.images import write_png
from edgekit.data.synthetic import generate
from edgekit.models.checkpoint import Checkpoint
from edgekit.models.gmbinet import GMBINet

from conftest import one_error_line, tiny_config


@pytest.fixture()
def tiny_ckpt(tmp_path):
    model = GMBINet(tiny_config()).eval()
    ck = Checkpoint.from_model(model, classes=["inclusion", "patches", "scratches"])
    ck.preprocess.input_size = (64, 64)
    return ck.save(tmp_path / "tiny.pt")




def test_eval_published_parity(cli, published_ckpt, sd900):
    """The must-show figures: MAE 0.0131 +- 0.0005, IoU 0.878 +- 0.003 on the 225 test images."""
    r = cli("eval", published_ckpt, "--data", sd900, "--split", "test", "--json", "--batch", "8")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["overall"]["images"] == 225
    assert d["overall"]["mae"] == pytest.approx(0.0131, abs=0.0005)
    assert d["overall"]["iou"] == pytest.approx(0.878, abs=0.003)
    iou = {c: v["iou"] for c, v in d["per_class"].items()}
    assert iou == pytest.approx({"inclusion": 0.8617, "patches": 0.9213, "scratches": 0.8518}, abs=0.003)


def test_info_published(cli, published_ckpt):
    r = cli("info", published_ckpt, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["parameters"] == 202_547
    assert d["input"]["shape"] == [3, 512, 512]
    assert 0.30e9 < d["macs"] < 0.40e9  # the paper quotes 0.39 G
    text = cli("info", published_ckpt).stdout
    assert "202,547" in text


def test_mac_counter_agrees_with_torch_flop_counter(tiny_ckpt):
    from torch.utils.flop_counter import FlopCounterMode

    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.models.summary import count_macs

    model = load_checkpoint(tiny_ckpt).build()
    ours = count_macs(model, (1, 3, 64, 64))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    assert ours["flops"] == fc.get_total_flops()  # torch counts 2 FLOPs per MAC for convolutions


def test_eval_synthetic_table_and_json(cli, tiny_ckpt, tmp_path):
    r = cli("eval", tiny_ckpt, "--data", "synthetic:6", "--json", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["synthetic"] is True and set(d["per_class"]) == {"inclusion", "patches", "scratches"}
    assert json.loads((tmp_path / "r.json").read_text())["overall"] == d["overall"]
    table = cli("eval", tiny_ckpt, "--data", "synthetic:3")
    assert table.exit_code == 0 and "overall" in table.stdout and "IoU" in table.stdout


def test_predict_writes_masks_and_overlays(cli, tiny_ckpt, tmp_path):
    src = tmp_path / "in"
    for i in range(2):
        write_png(src / f"img{i}.png", generate(i)[0])
    r = cli("predict", tiny_ckpt, src / "img0.png", src / "img1.png", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    for i in range(2):
        mask = np.asarray(Image.open(tmp_path / "out" / f"img{i}_mask.png"))
        ov = np.asarray(Image.open(tmp_path / "out" / f"img{i}_overlay.png"))
        assert mask.shape == (200, 200) and set(np.unique(mask)) <= {0, 255}
        assert ov.shape == (200, 200, 3)


def test_predict_non_image_writes_nothing(cli, tiny_ckpt, tmp_path):
    good = tmp_path / "good.png"
    write_png(good, generate(0)[0])
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    r = cli("predict", tiny_ckpt, good, bad, "--out", tmp_path / "out")
    assert "not a readable image" in one_error_line(r)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_checkpoints(cli, tmp_path, tiny_ckpt):
    assert "not found" in one_error_line(cli("info", tmp_path / "missing.pt"))
    data = tiny_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:1000])
    assert "truncated" in one_error_line(cli("eval", tmp_path / "trunc.pt", "--data", "synthetic:2"))
    sd = GMBINet(tiny_config()).state_dict()
    sd.pop("DF2.conv.3.weight")
    torch.save(sd, tmp_path / "other.pt")
    assert "DF2.conv.3.weight" in one_error_line(cli("info", tmp_path / "other.pt"))


def test_bad_data(cli, tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no images" in one_error_line(cli("eval", tiny_ckpt, "--data", tmp_path / "empty"))
    assert "not found" in one_error_line(cli("eval", tiny_ckpt, "--data", tmp_path / "nowhere"))
    d = tmp_path / "pairs"
    write_png(d / "images" / "x_1.png", generate(0)[0])
    write_png(d / "masks" / "x_1.png", np.zeros((50, 50), np.uint8))
    assert "50x50" in one_error_line(cli("eval", tiny_ckpt, "--data", d))
    out = tmp_path / "r.json"
    cli("eval", tiny_ckpt, "--data", d, "--out", out)
    assert not out.exists()  # no partial output on failure


def test_import_writes_edgekit_checkpoint(cli, published_ckpt, tmp_path):
    r = cli("import", published_ckpt, "--out", tmp_path / "ek.pt")
    assert r.exit_code == 0, r.stderr
    raw = torch.load(tmp_path / "ek.pt", weights_only=True)
    assert raw["format"] == "edgekit-checkpoint" and raw["classes"] == ["inclusion", "patches", "scratches"]
