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
                                  ("keygen", "--help")])
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
    hide = "sys.modules['cryptography'] = None  # as if edgekit[ota] were not installed"
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
            f"error: edgekit {args[0]} needs the optional package cryptography: pip install 'edgekit[ota]'"]
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
