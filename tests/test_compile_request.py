"""The refusal of load options a backend does not take."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import emulator_available, one_error_line
from edgekit import runtime
from edgekit.errors import EdgekitError

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")


def test_unknown_load_option_is_refused_naming_it_and_what_the_backend_accepts(tiny_ckpt):
    """It used to be dropped silently: runtime.load(ckpt, isa="avx2") ran plain PyTorch as if nothing was asked."""
    with pytest.raises(EdgekitError) as e:
        runtime.load(tiny_ckpt, isa="avx2", threads=1)
    msg = str(e.value)
    assert "isa" in msg and "torch" in msg and "threads, device, mode, precision, max_autotune" in msg
    assert "threads" not in msg.split("(")[0]  # only the option it does not take is named as refused
    with pytest.raises(EdgekitError, match="load options isa, hint"):
        runtime.load(tiny_ckpt, isa="avx2", hint="LATENCY")
    runner = runtime.load(tiny_ckpt, threads=1, device="cpu", isa=None)  # None: not given
    assert runner.infer(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 1, 64, 64)


@pytest.fixture(scope="module")
def cuda_fused_artifact(tiny_ckpt, tmp_path_factory):
    """A cuda-fused artifact, built and verified under host emulation (nvcc hidden to keep it fast): a backend
    whose load options are precision and use_graph, not threads."""
    if not emulator_available():
        pytest.skip("host emulation needs g++/clang++ and the CUDA headers (cuda_fp16.h)")
    from edgekit.kernels import build as kbuild
    from edgekit.pipeline.compile import compile_model

    out = tmp_path_factory.mktemp("cf") / "art"
    mp = pytest.MonkeyPatch()
    mp.setattr(kbuild, "find_nvcc", lambda: None)
    try:
        compile_model(str(tiny_ckpt), "cuda-fused", "fp32", str(out), parity_data="synthetic:2", log=lambda *a: None)
    finally:
        mp.undo()
    return out


def test_cli_refuses_a_load_option_the_artifacts_backend_does_not_take(cuda_fused_artifact, cli):
    """`eval --threads 2` on a cuda-fused artifact: one error line naming the option and what it accepts (the
    thread count was dropped silently before), refused before the backend's package is even needed."""
    line = one_error_line(cli("eval", cuda_fused_artifact, "--threads", "2", "--data", "synthetic:2"))
    assert "cuda-fused" in line and "threads" in line and "precision, use_graph" in line
