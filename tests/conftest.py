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


def pytest_configure(config):
    # .ci/run runs every test, slow ones too: the marker only lets a quick local run deselect them
    config.addinivalue_line("markers", "slow: minutes, not seconds (journeys of many real commands in "
                                       "tests/journeys/, a fresh venv with pip installs in tests/test_runtime_only.py); "
                                       "deselect with -m 'not slow' for a quick run; .ci/run keeps them")


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
    from edgekit.kernels.cuda.build import emulator_available as available

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


def random_gmbinet(cfg, seed: int = 0):
    """A GMBINet in eval mode with random weights and non-trivial BN statistics (the fused-kernel tests'
    model: CUDA and CPU alike)."""
    import torch

    from edgekit.models.gmbinet import GMBINet

    g = torch.Generator().manual_seed(seed)
    m = GMBINet(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return m.eval()


_KERNEL_LIBRARIES: dict = {}


def kernel_library(isa: str, tmp_path_factory) -> Path:
    """cpu-fused's kernel library for ``isa``, built once per test session (a build takes seconds, and several
    test files need the same levels); skips with the reason where g++ is missing or this CPU cannot run it."""
    import shutil

    from edgekit.kernels.cpu import build as cpu_build
    from edgekit.kernels.cpu import runtime as cpu_fused

    if shutil.which("g++") is None:
        pytest.skip("cpu-fused builds its kernels with g++, which is not installed")
    if isa not in cpu_fused.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernel library")
    if isa not in _KERNEL_LIBRARIES:
        out = tmp_path_factory.mktemp(f"kernels_{isa}") / f"libgmbinet_{isa}.so"
        cpu_build.build_library(isa, out)
        _KERNEL_LIBRARIES[isa] = out
    return _KERNEL_LIBRARIES[isa]
