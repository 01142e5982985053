"""The Runner contract every CPU backend shares: ``infer`` checks the batch once, in the base class, before the
backend's ``_infer`` sees it; ``close()`` (and ``with``) frees what the runner holds, deterministically, and a
closed runner refuses to run.  Real artifacts of a tiny random GMBINet (64 x 64), one per backend."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit import runtime
from edgekit.backends.base import Runner
from edgekit.errors import EdgekitError

CPU_BACKENDS = ("torch", "onnx", "ort", "openvino", "executorch", "cpu-fused")
PACKAGE = {"onnx": "onnxruntime", "ort": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}


def _cpu_fused_isa() -> str:
    from edgekit.kernels.cpu.runtime import supported_isas

    isas = supported_isas()
    if not isas or not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("cpu-fused needs AVX2/AVX-512 and g++")
    return "avx2" if "avx2" in isas else isas[0]


@pytest.fixture(scope="module")
def model_for(tiny_ckpt, tmp_path_factory):
    """backend -> what runtime.load takes for it (the checkpoint for torch, else a compiled artifact folder)."""
    built = {}

    def get(backend: str) -> Path:
        if backend == "torch":
            return tiny_ckpt
        pkg = PACKAGE.get(backend)
        if pkg and importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
        if backend not in built:
            out = tmp_path_factory.mktemp(backend.replace("-", "_")) / "A"
            if backend == "cpu-fused":  # one library (one g++ run) instead of compile's one per ISA level
                from edgekit.artifact import write_manifest
                from edgekit.backends.cpu_fused.build import build_cpu_fused
                from edgekit.pipeline.sources import open_source

                src = open_source(str(tiny_ckpt))
                out.mkdir()
                fields = build_cpu_fused(src.checkpoint, out, isas=[_cpu_fused_isa()], log=lambda *_: None)
                files = [fields["model_file"], *fields.pop("extra_files")]
                write_manifest(out, {"target": "cpu-fused", "precision": "fp32", **fields, **src.base}, files)
            else:
                from edgekit.pipeline.compile import compile_model

                compile_model(str(tiny_ckpt), backend, "fp32", str(out), parity_data="synthetic:2", log=lambda *_: None)
            built[backend] = out
        return built[backend]

    return get


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_is_refused_by_the_base_class(model_for, backend):
    runner = runtime.load(model_for(backend), threads=1)
    try:
        assert type(runner).infer is Runner.infer and type(runner)._check_batch is Runner._check_batch, \
            f"{type(runner).__name__} must run its batches through Runner.infer's checks"
        c, h, w = runner.input_shape
        good = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
        nan, inf = good.copy(), good.copy()
        nan[1, 0, 3, 5] = np.nan
        inf[0, c - 1, h - 1, w - 1] = -np.inf
        for bad, why in ((good[:, :, :, :-1], f"expected a batch N x {c} x {h} x {w}, got 2 x {c} x {h} x {w - 1}"),
                         (good[0], f"got {c} x {h} x {w}"),
                         (nan, "1 non-finite values"), (inf, "1 non-finite values"),
                         (np.full((1, c, h, w), 3e38, np.float32), None)):  # finite, though its sum overflows fp32
            if why is None:
                assert runner.infer(bad).shape == (1, 1, h, w)
                continue
            with pytest.raises(EdgekitError, match=why):
                runner.infer(bad)
        out = runner.infer(good.astype(np.float64))  # another float dtype is converted, as always
        assert out.shape == (2, 1, h, w) and out.dtype == np.float32 and np.isfinite(out).all()
    finally:
        runner.close()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_close_and_with_free_the_runner(model_for, backend):
    model = model_for(backend)
    x = np.zeros((1, *runtime.load(model, threads=1).input_shape), np.float32)
    before = _threads()
    with runtime.load(model, threads=2) as runner:
        assert not runner.closed
        y = runner.infer(x)
        if backend == "cpu-fused":  # the kernels' persistent pool: one worker thread beside the caller
            assert runner.kernels._pool is not None and _threads() == before + 1
    assert runner.closed and y.shape == (1, 1, *x.shape[2:])
    with pytest.raises(EdgekitError, match="this runner was closed"):
        runner.infer(x)
    runner.close()  # idempotent
    if backend == "cpu-fused":  # freed at close, not whenever the garbage collector runs __del__
        assert runner.kernels._pool is None and runner.fused is None and _threads() == before
