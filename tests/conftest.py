"""Shared fixtures: where ../shared is, and skips with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("EDGEKIT_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEKIT_SHARED", ROOT.parent / "shared"))
PUBLISHED = SHARED / "checkpoints" / "gmbinet_sd900_official.pt"
SD900 = SHARED / "datasets" / "sd-saliency-900"
NEU = SHARED / "datasets" / "neu-cls"
REFERENCE_ONNX = SHARED / "reference" / "gmbinet_official_opset17.onnx"


def _need(path: Path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (reference data from ../shared is absent)")
    return path


@pytest.fixture(scope="session")
def published_ckpt() -> Path:
    return _need(PUBLISHED, "the published GMBINet checkpoint")


@pytest.fixture(scope="session")
def sd900() -> Path:
    return _need(SD900, "SD-Saliency-900")


@pytest.fixture(scope="session")
def neu() -> Path:
    return _need(NEU, "NEU-CLS")


@pytest.fixture(scope="session")
def reference_onnx() -> Path:
    return _need(REFERENCE_ONNX, "the reference ONNX export of the published model")


@pytest.fixture()
def cli():
    """Invoke the edgekit CLI in-process; returns click's Result (stdout and stderr apart)."""
    from click.testing import CliRunner

    from edgekit.cli import main

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def tiny_config(**kw):
    from edgekit.models.gmbinet import GMBINetConfig

    d = dict(widths=(8, 16, 16, 24, 32), depths=(1, 1, 1, 1), scales=4)
    d.update(kw)
    return GMBINetConfig(**d)


def one_error_line(result) -> str:
    """A refused CLI call: non-zero exit and exactly one 'error: ...' line on stderr."""
    assert result.exit_code != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def emulator_available() -> bool:
    from edgekit.kernels.build import emulator_available as available

    return available()


needs_emulator = pytest.mark.skipif(not emulator_available(),
                                    reason="host emulation needs g++/clang++ and the CUDA headers (cuda_fp16.h)")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random GMBINet checkpoint at 64x64, with the SD-900 class names."""
    import torch

    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet

    torch.manual_seed(0)
    ck = Checkpoint.from_model(GMBINet(tiny_config()).eval(), classes=["inclusion", "patches", "scratches"])
    ck.preprocess.input_size = (64, 64)
    return ck.save(tmp_path_factory.mktemp("ck") / "tiny.pt")
