"""compile's request object, the refusal of load options a backend does not take, and ``--target auto``
(the fastest artifact across every target and precision this machine offers, within the budget)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import emulator_available, one_error_line
from edgekit import runtime
from edgekit.errors import EdgekitError

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")


def test_compile_request_is_one_frozen_object_with_the_defaults_resolved(tiny_ckpt, tmp_path):
    from edgekit.pipeline.compile import compile_model
    from edgekit.pipeline.request import DEFAULT_PARITY_DATA, CompileRequest

    r = CompileRequest(source=tiny_ckpt, target="onnx", out=tmp_path / "a")
    assert r.precision == "fp32" and r.source == str(tiny_ckpt) and r.parity_images == DEFAULT_PARITY_DATA
    assert CompileRequest(source="x", target="auto", out="o").precision == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.precision = "int8"
    # parity runs on the real images given: --val, then --calib (unless it is the synthetic generator)
    assert dataclasses.replace(r, calib="cal", val="v").parity_images == "v"
    assert dataclasses.replace(r, calib="cal").parity_images == "cal"
    assert dataclasses.replace(r, calib="synthetic").parity_images == DEFAULT_PARITY_DATA
    with pytest.raises(TypeError, match="no_such_option"):  # the library's short form takes the request's fields only
        compile_model(str(tiny_ckpt), "onnx", "fp32", str(tmp_path / "b"), no_such_option=1)
    assert not (tmp_path / "b").exists()


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
    from edgekit.kernels.cuda import build as kbuild
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


def _here(spec) -> bool:
    return spec.device == "cpu" and "gmbinet" in spec.kinds and spec.available() and not (spec.not_here and spec.not_here())


def test_target_auto_candidates_come_from_the_registry(tiny_ckpt, tmp_path):
    """Every CPU target buildable here times every precision it offers (never 'default'); INT8 only with --val
    and --calib; GPU targets are left out with the reason. Nothing is named in the code: this is the registry."""
    from edgekit.backends.registry import targets
    from edgekit.pipeline.auto import plan_candidates
    from edgekit.pipeline.request import CompileRequest

    base = CompileRequest(source=str(tiny_ckpt), target="auto", out=str(tmp_path / "o"))
    want = {(t.name, p) for t in targets() if _here(t) for p in t.precisions
            if p != "default" and not (t.precision_not_here and t.precision_not_here(p))}
    chosen, skipped = plan_candidates(base)
    assert {(c.spec.name, c.precision) for c in chosen} == {w for w in want if w[1] != "int8"}
    assert {(s["target"], s["precision"]) for s in skipped if "--val" in s["reason"]} == {w for w in want if w[1] == "int8"}
    gpu = {t.name for t in targets() if t.device != "cpu"}
    assert gpu and gpu <= {s["target"] for s in skipped if s["precision"] is None and "gpu target" in s["reason"]}
    chosen, _ = plan_candidates(dataclasses.replace(base, val="synthetic:4", calib="synthetic:8"))
    assert {(c.spec.name, c.precision) for c in chosen} == want
    chosen, _ = plan_candidates(dataclasses.replace(base, precision="fp32"))
    assert {c.precision for c in chosen} == {"fp32"} and len({c.spec.name for c in chosen}) >= 2
    chosen, _ = plan_candidates(dataclasses.replace(base, target="onnx", precision="auto"))  # --precision auto
    assert [(c.spec.name, c.precision) for c in chosen] == [("onnx", "fp32")]  # int8 needs --val


def test_target_auto_refusals_are_one_line_and_write_nothing(cli, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "auto", "--precision", "int8", "--calib", "synthetic:4",
                              "--out", out))
    assert "--val" in line and "no candidate" in line
    line = one_error_line(cli("compile", tiny_ckpt, "--target", "auto", "--precision", "int4", "--out", out))
    assert "no target offers precision int4" in line
    assert "--val" in one_error_line(cli("compile", tiny_ckpt, "--target", "auto", "--max-drop", "0.01", "--out", out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_target_auto_keeps_the_fastest_artifact_across_targets_and_says_why(cli, tiny_ckpt, tmp_path, monkeypatch):
    """`compile --target auto` (precision auto by default): each candidate is built, checked and timed; the
    fastest within the budget is written whole (it loads), and why is said on stderr and recorded in the
    manifest. The registry is narrowed to two quick real targets (onnx, ort) to keep this to seconds: the
    whole registry's candidates are checked above, and building all of them takes minutes here."""
    from edgekit.backends.registry import get_backend
    from edgekit.pipeline import auto as auto_module

    monkeypatch.setattr(auto_module, "targets", lambda: [get_backend("onnx"), get_backend("ort")])
    out = tmp_path / "auto"
    r = cli("compile", tiny_ckpt, "--target", "auto", "--parity-data", "synthetic:4", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    man = json.loads(r.stdout)  # stdout: the manifest only
    auto = man["auto"]
    cands = auto["candidates"]
    assert {(c["target"], c["precision"]) for c in cands} == {("onnx", "fp32"), ("ort", "fp32")}
    assert {(s["target"], s["precision"]) for s in auto["skipped"]} == {("onnx", "int8"), ("ort", "int8")}
    best = max((c for c in cands if c["within_budget"]), key=lambda c: c["fps_b1"])
    assert (auto["chosen_target"], auto["chosen"]) == (best["target"], best["precision"]) == (man["target"], "fp32")
    assert all(c["drop"] <= auto["budget"] == 0.005 for c in cands)  # float copies of the same model
    assert auto["timing"]["rounds"] == 5 and auto["timing"]["iters"] == 10 and auto["val_given"] is False
    assert auto["reason"].startswith(f"chose {best['target']} fp32") and "without --val" in auto["reason"]
    assert f"auto: {auto['reason']}" in r.stderr and "auto: building 2/2" in r.stderr
    assert "onnx int8 skipped (no --val" in r.stderr
    assert runtime.load(out, threads=1).infer(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 1, 64, 64)
