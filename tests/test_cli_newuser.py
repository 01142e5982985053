"""The CLI as a new user meets it (issue 11): bad checkpoints, start-up cost, missing extras,
file permissions, the default model, artifacts and plain model files, one JSON document."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, one_error_line

HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "rich", "matplotlib")


def run_cli(*args, cwd=None, env=None, prelude=""):
    """``edgekit ARGS`` in a fresh interpreter; ``prelude`` runs first (e.g. to hide a package)."""
    code = (f"import sys\n{prelude}\nfrom edgekit.cli import main\n"
            "try:\n    main(sys.argv[1:], prog_name='edgekit')\nfinally:\n"
            "    import json, os\n"
            "    with open(os.environ['EDGEKIT_TEST_MODULES'], 'w') as f: json.dump(sorted(sys.modules), f)\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture()
def subprocess_env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), EDGEKIT_TEST_MODULES=str(tmp_path / "modules.json"))
    return env


def loaded_modules(env) -> set:
    return set(json.loads(Path(env["EDGEKIT_TEST_MODULES"]).read_text()))


# -- bad checkpoints: one line that says what the file is, exit code 2 -------------------------

def _foreign_files(folder: Path) -> dict:
    (folder / "notes.pt").write_text("these are my notes, not weights\n")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "config.pt").write_text(json.dumps({"widths": [8, 16]}))
    (folder / "plain.pkl.pt").write_bytes(pickle.dumps(argparse.Namespace(lr=0.1)))
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.zeros(2)}, folder / "foreign.pt")
    with zipfile.ZipFile(folder / "archive.pt", "w") as zf:
        zf.writestr("readme.txt", "hi")
    return {"notes.pt": "a text file, not a PyTorch checkpoint",
            "empty.pt": "empty file (0 bytes), not a PyTorch checkpoint",
            "config.pt": "a JSON file, not a PyTorch checkpoint",
            "plain.pkl.pt": "refused: contains objects other than tensors and plain values (argparse.Namespace)",
            "foreign.pt": "refused: contains objects other than tensors and plain values (argparse.Namespace)",
            "archive.pt": "a zip archive, not a PyTorch checkpoint"}


@pytest.mark.parametrize("command", [("info",), ("eval", "--data", "synthetic:2"), ("import", "--out", "x.pt")])
def test_foreign_checkpoints_say_what_they_are(cli, tmp_path, command):
    for name, said in _foreign_files(tmp_path).items():
        args = [command[0], tmp_path / name, *command[1:]]
        if command[0] == "import":
            args[-1] = tmp_path / "imported.pt"
        r = cli(*args)
        line = one_error_line(r)
        assert said in line and "internal error" not in line and r.exit_code == 2, (name, line)
    assert not (tmp_path / "imported.pt").exists()


# -- start-up: --help loads nothing heavy; argument errors come before any loading ------------

@pytest.mark.parametrize("args", [("--help",), ("info", "--help"), ("eval", "--help"), ("predict", "--help"),
                                  ("compile", "--help"), ("quantize", "--help"), ("bench", "--help"),
                                  ("prune", "--help"), ("train", "--help"), ("adapt", "--help"),
                                  ("keygen", "--help"), ("repo", "--help"), ("update", "--help")])
def test_help_imports_no_heavy_package(subprocess_env, args):
    r = run_cli(*args, env=subprocess_env)
    assert r.returncode == 0, r.stderr
    assert "Usage: edgekit" in r.stdout
    heavy = [m for m in HEAVY if m in loaded_modules(subprocess_env)]
    assert heavy == [], f"edgekit {' '.join(args)} imported {heavy}"


def test_existing_out_refused_before_loading(subprocess_env, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    r = run_cli("compile", tmp_path / "whatever.pt", "--target", "onnx", "--out", out, env=subprocess_env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {out} already exists (use --force to replace it)"], r.stderr
    assert "torch" not in loaded_modules(subprocess_env)


# -- commands of a missing extra: listed, and one line with the pip install -------------------

def test_missing_extra_lists_commands_and_names_the_install(subprocess_env, tmp_path):
    hide = "sys.modules['safetensors'] = None  # as if edgekit[ota] were not installed"
    r = run_cli("--help", env=subprocess_env, prelude=hide)
    assert r.returncode == 0
    listed = {l.split()[0]: l for l in r.stdout.splitlines() if l.startswith("  ") and l.split()}
    for name in ("keygen", "package", "verify", "install", "rollback"):
        assert "needs edgekit[ota]" in listed[name]
    assert "needs" not in listed["compile"]
    for args in (("keygen", "--out", tmp_path / "keys"), ("verify", "x.zip", "--pubkey", "k.pem"), ("keygen",)):
        r = run_cli(*args, env=subprocess_env, prelude=hide)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            f"error: edgekit {args[0]} needs the optional package safetensors: pip install 'edgekit[ota]'"]
    assert not (tmp_path / "keys").exists()


# -- outputs honour the user's umask ---------------------------------------------------------

@pytest.fixture()
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_umask(cli, tiny_ckpt, tmp_path, umask, mask):
    from edgekit.data.images import write_png
    from edgekit.data.synthetic import generate

    umask(mask)
    write_png(tmp_path / "in.png", generate(0)[0])
    assert cli("predict", tiny_ckpt, tmp_path / "in.png", "--out", tmp_path / "pred").exit_code == 0
    assert cli("eval", tiny_ckpt, "--data", "synthetic:2", "--out", tmp_path / "r.json").exit_code == 0
    assert cli("compile", tiny_ckpt, "--target", "onnx", "--out", tmp_path / "art").exit_code == 0
    for f in (tmp_path / "pred" / "in_mask.png", tmp_path / "pred" / "in_overlay.png", tmp_path / "r.json",
              tmp_path / "art" / "manifest.json", tmp_path / "art" / "model.onnx"):
        assert _mode(f) == 0o666 & ~mask, f
    assert _mode(tmp_path / "art") == 0o777 & ~mask


def test_private_key_stays_private(cli, tmp_path, umask):
    pytest.importorskip("cryptography")
    umask(0o002)
    assert cli("keygen", "--out", tmp_path / "keys").exit_code == 0
    modes = {p.name: _mode(p) for p in (tmp_path / "keys").iterdir()}
    assert modes == {"private_key.pem": 0o600, "public_key.pem": 0o644}  # whatever the umask allows


# -- the model argument: the default is said, a model-looking path is a model ------------------

def test_predict_missing_model_is_named_as_model(cli, tmp_path):
    from edgekit.data.images import write_png
    from edgekit.data.synthetic import generate

    write_png(tmp_path / "img.bmp", generate(0)[0])
    for missing in ("missing.pt", "missing.onnx", "missing.xml"):
        line = one_error_line(cli("predict", tmp_path / missing, tmp_path / "img.bmp", "--out", tmp_path / "o"))
        assert line == f"error: model not found: {tmp_path / missing}"
    assert not (tmp_path / "o").exists()


def test_omitted_model_is_said_on_stderr(cli, tmp_path):
    from edgekit.data.images import write_png
    from edgekit.data.synthetic import generate
    from edgekit.models.default import DEFAULT_CHECKPOINT

    write_png(tmp_path / "img.png", generate(0)[0])
    r = cli("predict", tmp_path / "img.png", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)[0]["mask"] == str(tmp_path / "o" / "img_mask.png")
    notes = [l for l in r.stderr.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and str(DEFAULT_CHECKPOINT) in notes[0] and "default" in notes[0]
    r = cli("predict", tmp_path / "img.png", "--out", tmp_path / "o")  # the outputs exist now
    assert "already exists (use --force" in one_error_line(r)
    assert cli("predict", tmp_path / "img.png", "--out", tmp_path / "o", "--force").exit_code == 0


def test_folder_without_manifest_one_message_everywhere(cli, tmp_path):
    from edgekit.data.images import write_png
    from edgekit.data.synthetic import generate

    folder = tmp_path / "not_an_artifact"
    folder.mkdir()
    (folder / "weights.txt").write_text("x")
    write_png(tmp_path / "img.png", generate(0)[0])
    expected = f"error: {folder} is a folder without manifest.json, so not an edgekit artifact"
    for args in (("eval", folder, "--data", "synthetic:2"), ("predict", folder, tmp_path / "img.png", "--out",
                 tmp_path / "o"), ("bench", folder, "--backends", "torch"), ("info", folder),
                 ("compile", folder, "--target", "onnx", "--out", tmp_path / "a")):
        r = cli(*args)
        assert one_error_line(r).startswith(expected) and r.exit_code == 2, args
    from edgekit import runtime
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="folder without manifest.json"):
        runtime.load(folder)


# -- INT8 calibrates on data the user named; parity on the real data given --------------------

def test_int8_needs_calib(cli, tiny_ckpt, tmp_path):
    for args in (("compile", tiny_ckpt, "--target", "openvino", "--precision", "int8"),
                 ("quantize", tiny_ckpt, "--target", "onnx")):
        line = one_error_line(cli(*args, "--out", tmp_path / "q"))
        assert "needs --calib" in line and "synthetic" in line
    assert not (tmp_path / "q").exists()
    r = cli("compile", tiny_ckpt, "--target", "openvino", "--precision", "int8", "--calib", "synthetic",
            "--subset", "8", "--out", tmp_path / "q", "--json")
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)  # the whole of stdout is one JSON document (NNCF's progress went to stderr)
    assert m["quantization"]["calibration"].startswith("synthetic") and m["parity"]["data"].startswith("synthetic")


def test_int8_parity_on_the_real_calibration_data(cli, tiny_ckpt, sd900, tmp_path):
    r = cli("compile", tiny_ckpt, "--target", "onnx", "--precision", "int8", "--calib", sd900, "--subset", "6",
            "--out", tmp_path / "q", "--json")
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)
    assert "SD-Saliency-900" in m["parity"]["data"] and "test" in m["parity"]["data"], m["parity"]["data"]
    assert "train" in m["quantization"]["calibration"], m["quantization"]["calibration"]


# -- artifacts and plain model files are described and run ---------------------------------

@pytest.fixture(scope="module")
def compiled(tiny_ckpt, tmp_path_factory):
    """An ONNX and an OpenVINO artifact of the tiny checkpoint (64x64)."""
    from click.testing import CliRunner

    from edgekit.cli import main

    root = tmp_path_factory.mktemp("compiled")
    for target in ("onnx", "openvino"):
        r = CliRunner().invoke(main, ["compile", str(tiny_ckpt), "--target", target, "--out", str(root / target)])
        assert r.exit_code == 0, r.stderr
    return {"onnx": root / "onnx", "openvino": root / "openvino", "onnx_file": root / "onnx" / "model.onnx",
            "xml_file": root / "openvino" / "model.xml"}


def test_info_describes_artifacts(cli, compiled, tiny_ckpt):
    from edgekit.utils import sha256_file

    r = cli("info", compiled["openvino"], "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["kind"] == "artifact" and d["target"] == "openvino" and d["precision"] == "fp32"
    assert set(d["files"]) == {"model.xml", "model.bin"} and d["parity"]["images"] > 0
    assert d["source"]["sha256"] == sha256_file(tiny_ckpt)
    text = cli("info", compiled["onnx"]).stdout
    for field in ("target / precision", "onnx / fp32", "parity", "model.onnx", "source"):
        assert field in text


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_predict_takes_a_compiled_artifact_folder(cli, compiled, tmp_path, target):
    """The documented `edgekit predict ARTIFACT IMAGES --out DIR`: the folder is the model (it was refused as a
    'folder without manifest.json' because a folder holding no images was taken for a wrong model)."""
    from PIL import Image

    img = tmp_path / "part.png"
    Image.new("L", (40, 30), 128).save(img)
    r = cli("predict", compiled[target], img, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"part_mask.png", "part_overlay.png"}


@pytest.mark.parametrize("kind", ["onnx_file", "xml_file"])
def test_plain_model_files_run_with_stated_preprocessing(cli, compiled, tiny_ckpt, tmp_path, kind):
    import numpy as np

    from edgekit import runtime
    from edgekit.data.images import write_png
    from edgekit.data.synthetic import generate

    path = compiled[kind]
    runner = runtime.load(path)
    assert runner.input_shape == (3, 64, 64)  # read from the model, not assumed
    assert "0.4669" in runner.meta["preprocess_assumed"]
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert np.abs(runner.infer(x) - runtime.load(tiny_ckpt).infer(x)).max() < 1e-4

    info = cli("info", path, "--json")
    assert info.exit_code == 0, info.stderr
    d = json.loads(info.stdout)
    assert d["kind"] == "model file" and d["input"] == [3, 64, 64] and "published GMBINet" in d["preprocess_assumed"]

    ev = cli("eval", path, "--data", "synthetic:3", "--json")
    assert ev.exit_code == 0, ev.stderr
    assert json.loads(ev.stdout)["preprocess_assumed"] == runner.meta["preprocess_assumed"]
    notes = [l for l in ev.stderr.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "plain model file" in notes[0]

    write_png(tmp_path / "img.png", generate(0)[0])
    pr = cli("predict", path, tmp_path / "img.png", "--out", tmp_path / "o", "--json")
    assert pr.exit_code == 0, pr.stderr
    assert (tmp_path / "o" / "img_mask.png").is_file() and json.loads(pr.stdout)[0]["preprocess_assumed"]

    b = cli("bench", path, "--rounds", "1", "--iters", "1", "--batch", "1", "--data", "synthetic:2", "--json")
    assert b.exit_code == 0, b.stderr
    assert [row["name"] for row in json.loads(b.stdout)["rows"]] == [path.name]


# -- shared options: defined once, the same everywhere; --json = one document on stdout ----------

def test_shared_options_mean_the_same_everywhere():
    from edgekit.cli import main

    seen = {}
    for name, cmd in main.commands.items():
        for p in cmd.params:
            for opt in ("--threads", "--json", "--force", "--limit"):
                if opt in getattr(p, "opts", []) and not (name == "bench" and opt == "--json"):
                    seen.setdefault(opt, set()).add(p.help)
    for opt, helps in seen.items():
        assert len(helps) == 1, (opt, helps)
    assert {"--threads", "--json", "--force", "--limit"} <= set(seen)


def test_json_output_is_one_document(cli, tiny_ckpt, tmp_path):
    for args in (("info", tiny_ckpt), ("eval", tiny_ckpt, "--data", "synthetic:2", "--limit", "1"),
                 ("compile", tiny_ckpt, "--target", "onnx", "--out", tmp_path / "a"),
                 ("bench", tiny_ckpt, "--backends", "torch", "--rounds", "1", "--iters", "1", "--batch", "1",
                  "--data", "synthetic:2")):
        r = cli(*args, "--json")
        assert r.exit_code == 0, r.stderr
        json.loads(r.stdout)  # raises on anything but exactly one JSON document
    assert (tmp_path / "a" / "manifest.json").is_file()


def test_without_json_stdout_is_the_result_line_alone(cli, tiny_ckpt, tmp_path, monkeypatch):
    """Issue 19's residual: compile printed its notes (cpu-fused's "kernels built with ...") on stdout, before the
    result, and prune its BatchNorm note. Now stdout is the result alone (compile and quantize: the one
    "wrote OUT: ..." line; prune: what came out and where), and the build's messages are progress on stderr:
    shown on a terminal or with EDGEKIT_PROGRESS=1, and absent from a script's stderr (where a late refusal
    stays one error line: test_cpu_fused's over-budget INT8)."""
    import shutil

    monkeypatch.delenv("EDGEKIT_NO_PROGRESS", raising=False)  # the suite's default (conftest) would win over it
    monkeypatch.setenv("EDGEKIT_PROGRESS", "1")

    runs = [(("quantize", tiny_ckpt, "--target", "onnx", "--calib", "synthetic", "--subset", "4", "--val",
              "synthetic:4", "--max-drop", "1", "--out", tmp_path / "q"), "INT8 iou on synthetic steel defects")]
    if shutil.which("g++") is not None:
        runs.append((("compile", tiny_ckpt, "--target", "cpu-fused", "--out", tmp_path / "cf"), "kernels built with"))
    for args, note in runs:
        r = cli(*args)
        assert r.exit_code == 0, r.stderr
        assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith(f"wrote {args[-1]}: "), r.stdout
        assert note is None or note in r.stderr, r.stderr
    monkeypatch.setenv("EDGEKIT_PROGRESS", "0")
    for args, note in runs:
        r = cli(*args[:-1], tmp_path / "quiet")
        assert r.exit_code == 0 and r.stdout.startswith(f"wrote {tmp_path / 'quiet'}: "), r.stderr
        assert note not in r.stderr, r.stderr
        shutil.rmtree(tmp_path / "quiet")
    out = tmp_path / "p.pt"
    r = cli("prune", tiny_ckpt, "--ratio", "0.5", "--data", "synthetic:4", "--bn-images", "4", "--out", out)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"pruned {tiny_ckpt}: widths ") and lines[-1] == f"wrote {out}", r.stdout
    assert "BatchNorm" not in r.stdout and "BatchNorm statistics recalibrated on 4 images" in r.stderr
