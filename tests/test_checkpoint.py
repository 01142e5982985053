"""Loading the published checkpoint, edgekit's own format, and bad checkpoints."""
import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.models.checkpoint import Checkpoint, load_checkpoint, parameter_count
from edgekit.models.gmbinet import GMBINet

from conftest import tiny_config


def test_published_loads_with_every_key(published_ckpt):
    raw = torch.load(published_ckpt, map_location="cpu", weights_only=True)
    ck = load_checkpoint(published_ckpt)
    model = ck.build()
    assert set(model.state_dict()) == set(raw)  # nothing dropped, nothing invented
    assert parameter_count(ck.state_dict) == 202_547
    assert ck.config["widths"] == [16, 32, 64, 96, 128] and ck.config["depths"] == [3, 4, 6, 3]
    assert ck.provenance["source_sha256"] == ck.sha256 and len(ck.sha256) == 64


def test_published_matches_reference_onnx(published_ckpt, reference_onnx):
    """Same outputs as the upstream network, as exported by its authors' code to ONNX."""
    import onnxruntime as ort

    model = load_checkpoint(published_ckpt).build()
    sess = ort.InferenceSession(str(reference_onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 512, 512)).astype(np.float32)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_edgekit_format_roundtrip(tmp_path, published_ckpt):
    ck = load_checkpoint(published_ckpt)
    ck.classes = ["inclusion", "patches", "scratches"]
    out = ck.save(tmp_path / "ek.pt")
    raw = torch.load(out, weights_only=True)  # plain types only: safe loading works
    assert raw["format"] == "edgekit-checkpoint" and raw["config"]["widths"] == [16, 32, 64, 96, 128]
    assert raw["preprocess"]["mean"] == pytest.approx(0.4669) and raw["preprocess"]["input_size"] == [512, 512]
    assert raw["provenance"]["source_sha256"] == ck.sha256
    back = load_checkpoint(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.build()(x), ck.build()(x))


def test_own_model_roundtrip(tmp_path):
    model = GMBINet(tiny_config()).eval()
    Checkpoint.from_model(model, classes=["a"]).save(tmp_path / "t.pt")
    back = load_checkpoint(tmp_path / "t.pt")
    assert back.config["widths"] == [8, 16, 16, 24, 32] and not back.config["upstream_extras"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.build()(x), model(x))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(EdgekitError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint(tmp_path, published_ckpt):
    data = published_ckpt.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError, match="truncated or damaged PyTorch checkpoint"):
        load_checkpoint(bad)


def test_other_architecture_names_keys(tmp_path):
    sd = GMBINet(tiny_config()).state_dict()
    sd["encoder2.1.conv0.0.weight"] = torch.zeros(5, 1, 3, 3)  # wrong shape
    del sd["DF1.conv.0.weight"]  # missing
    sd["extra.weight"] = torch.zeros(1)  # unexpected
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(EdgekitError) as e:
        load_checkpoint(tmp_path / "other.pt")
    msg = str(e.value)
    assert "DF1.conv.0.weight" in msg and "extra.weight" in msg and "encoder2.1.conv0.0.weight" in msg


def test_not_a_gmbinet_state_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "fc.pt")
    with pytest.raises(EdgekitError, match="not a GMBINet state_dict"):
        load_checkpoint(tmp_path / "fc.pt")
