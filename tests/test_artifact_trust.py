"""Artifacts with authenticity (issue #23, item 3) and the serving check (item 6), on real compiled artifacts.

The embedded checkpoint compiles to ONNX (through the CLI, signed with ``--sign``) and to cpu-fused (one ISA
level, g++); a tiny shared library whose ELF constructor writes a marker file stands in for an attacker's
kernel library: wherever it is refused, the marker must not exist afterwards, which proves the refusal came
before any native code was loaded.  Geometry attacks run in a subprocess, so a crash shows as a crash.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import one_error_line
from edgekit.errors import EdgekitError

EMBEDDED = Path(__file__).resolve().parents[1] / "edgekit" / "assets" / "gmbinet_edgekit.pt"
PY = sys.executable
MARKER_SOURCE = r"""
#include <cstdio>
__attribute__((constructor)) static void edgekit_test_marker() {
    FILE* f = std::fopen(MARKER_PATH, "w");
    if (f) { std::fputs("native code ran\n", f); std::fclose(f); }
}
extern "C" int ek_abi_version() { return -1; }
"""


# ----------------------------------------------------------------------------------------------
# fixtures: two key pairs, a signed ONNX artifact (CLI), a signed cpu-fused artifact, the marker library


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from edgekit.ota.keys import generate_keypair

    root = tmp_path_factory.mktemp("keys")
    a, b = generate_keypair(root / "a"), generate_keypair(root / "b")
    return {"private": a[0], "public": a[1], "other_public": b[1], "other_private": b[0]}


@pytest.fixture(scope="module")
def onnx_art(tmp_path_factory, keys):
    from click.testing import CliRunner

    from edgekit.cli import main

    out = tmp_path_factory.mktemp("onnx") / "A"
    res = CliRunner().invoke(main, ["compile", str(EMBEDDED), "--target", "onnx", "--out", str(out), "--sign",
                                    str(keys["private"]), "--parity-data", "synthetic:2"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return out


def _isa():
    from edgekit.kernels.cpu.runtime import supported_isas

    isas = supported_isas()
    if not isas or not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("cpu-fused needs AVX2/AVX-512 and g++")
    return "avx2" if "avx2" in isas else isas[0]


@pytest.fixture(scope="module")
def cf_art(tmp_path_factory, keys):
    """A signed cpu-fused artifact with one library (one g++ run instead of compile's two)."""
    from edgekit.artifact import sign_artifact, write_manifest
    from edgekit.backends.cpu_fused.build import build_cpu_fused
    from edgekit.keys import load_private_key
    from edgekit.pipeline.sources import open_source

    isa = _isa()
    folder = tmp_path_factory.mktemp("cf") / "A"
    folder.mkdir()
    src = open_source(str(EMBEDDED))
    fields = build_cpu_fused(src.checkpoint, folder, isas=[isa], log=lambda *_: None)
    files = [fields["model_file"], *fields.pop("extra_files")]
    write_manifest(folder, {"target": "cpu-fused", "precision": "fp32", **fields, **src.base}, files)
    sign_artifact(folder, load_private_key(keys["private"]))
    return folder


@pytest.fixture(scope="module")
def marker_lib(tmp_path_factory):
    """(library, marker path): a shared library whose constructor writes the marker when it is loaded."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if not cxx:
        pytest.skip("no C++ compiler to build the marker library")
    root = tmp_path_factory.mktemp("marker")
    src, lib, marker = root / "marker.cpp", root / "libmarker.so", root / "NATIVE_CODE_RAN"
    src.write_text(MARKER_SOURCE)
    subprocess.run([cxx, "-shared", "-fPIC", f'-DMARKER_PATH="{marker}"', "-o", str(lib), str(src)], check=True)
    return lib, marker


@pytest.fixture()
def no_env_keys(monkeypatch):
    monkeypatch.delenv("EDGEKIT_TRUSTED_KEYS", raising=False)


def _copy(art: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(art, dst, symlinks=True)
    return dst


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _rehash(art: Path, manifest: dict) -> None:
    """What an attacker without the key can do: rewrite the manifest with the new files' hashes (the old
    signature no longer matches; write_manifest drops it)."""
    from edgekit.artifact import write_manifest

    files = list(manifest["files"])
    keep = {k: v for k, v in manifest.items() if k not in ("files", "size_bytes", "format", "format_version", "created")}
    write_manifest(art, keep, files)


def _lib_name(art: Path) -> str:
    return next(iter(_manifest(art)["kernels"]["libraries"].values()))["file"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# signing and verification


def test_marker_library_runs_its_constructor_when_loaded(marker_lib):
    """The probe works: loading the library (in a child process) writes the marker."""
    lib, marker = marker_lib
    marker.unlink(missing_ok=True)
    subprocess.run([PY, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("which", ["onnx", "cpu-fused"])
def test_signed_artifact_loads_with_its_key_and_runs(which, onnx_art, cf_art, keys, no_env_keys):
    from edgekit import runtime
    from edgekit.keys import load_public_key

    art = onnx_art if which == "onnx" else cf_art
    sig = json.loads((art / "manifest.sig").read_text())
    assert sig["format"] == "edgekit-artifact-signature" and sig["algorithm"] == "ed25519"
    for trusted in ([keys["public"]], [load_public_key(keys["public"])], [keys["other_public"], keys["public"]]):
        r = runtime.load(art, trusted_keys=trusted)
        out = r.infer(np.zeros((1, *r.input_shape), np.float32))
        assert out.shape == (1, 1, *r.input_shape[1:]) and np.isfinite(out).all()
    assert r.artifact.signed_by == sig["key_id"]


@pytest.mark.parametrize("which", ["onnx", "cpu-fused"])
def test_another_key_or_no_signature_refused(which, onnx_art, cf_art, keys, tmp_path, no_env_keys):
    from edgekit import runtime

    art = _copy(onnx_art if which == "onnx" else cf_art, tmp_path)
    with pytest.raises(EdgekitError, match="not a trusted key") as e:
        runtime.load(art, trusted_keys=[keys["other_public"]])
    _one_line(e)
    (art / "manifest.sig").unlink()
    with pytest.raises(EdgekitError, match="unsigned artifact") as e:
        runtime.load(art, trusted_keys=[keys["public"]])
    _one_line(e)
    runtime.load(art)  # hash-only mode (no keys anywhere) still runs an intact unsigned artifact


@pytest.mark.parametrize("victim", ["manifest.json", "manifest.sig", "weights.bin", "LIBRARY", "model.onnx"])
def test_one_byte_changed_in_any_file_refused(victim, onnx_art, cf_art, keys, tmp_path, no_env_keys):
    """One byte flipped anywhere in a signed artifact (the model files, the manifest, the signature itself):
    refused with one line by runtime.load with the signer's key."""
    from edgekit import runtime

    art = _copy(onnx_art if victim == "model.onnx" else cf_art, tmp_path)
    name = _lib_name(art) if victim == "LIBRARY" else victim
    path = art / name
    data = bytearray(path.read_bytes())
    if name == "manifest.sig":  # a byte of the signature value itself (a byte of its JSON frame: see below)
        doc = json.loads(data)
        import base64

        raw = bytearray(base64.b64decode(doc["signature"]))
        raw[len(raw) // 2] ^= 0x01
        doc["signature"] = base64.b64encode(bytes(raw)).decode()
        path.write_text(json.dumps(doc))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    with pytest.raises(EdgekitError) as e:
        runtime.load(art, trusted_keys=[keys["public"]])
    msg = _one_line(e)
    assert "refused" in msg or "does not match" in msg, msg


def test_signature_frame_byte_changed_refused(cf_art, keys, tmp_path, no_env_keys):
    from edgekit import runtime

    art = _copy(cf_art, tmp_path)
    data = bytearray((art / "manifest.sig").read_bytes())
    data[1] ^= 0x01  # the JSON frame: no longer parses as a signature
    (art / "manifest.sig").write_bytes(bytes(data))
    with pytest.raises(EdgekitError, match="not an edgekit artifact signature"):
        runtime.load(art, trusted_keys=[keys["public"]])


# ----------------------------------------------------------------------------------------------
# a swapped library: refused before any native code loads


@pytest.mark.parametrize("keep_old_signature", [False, True])
def test_swapped_library_with_rehashed_manifest_refused_before_it_loads(keep_old_signature, cf_art, marker_lib, keys,
                                                                       tmp_path, no_env_keys):
    from edgekit import runtime

    lib, marker = marker_lib
    marker.unlink(missing_ok=True)
    art = _copy(cf_art, tmp_path)
    sig = (art / "manifest.sig").read_bytes()
    shutil.copyfile(lib, art / _lib_name(art))
    _rehash(art, _manifest(art))
    if keep_old_signature:
        (art / "manifest.sig").write_bytes(sig)
    with pytest.raises(EdgekitError, match="signature does not match" if keep_old_signature else "unsigned") as e:
        runtime.load(art, trusted_keys=[keys["public"]])
    _one_line(e)
    assert not marker.exists(), "the swapped library's constructor ran before the refusal"


def test_swapped_library_refused_via_cli_with_env_keys(cf_art, marker_lib, keys, tmp_path, cli, monkeypatch):
    """The device policy without code changes: EDGEKIT_TRUSTED_KEYS makes eval (any runtime.load) refuse."""
    lib, marker = marker_lib
    marker.unlink(missing_ok=True)
    art = _copy(cf_art, tmp_path)
    shutil.copyfile(lib, art / _lib_name(art))
    _rehash(art, _manifest(art))
    monkeypatch.setenv("EDGEKIT_TRUSTED_KEYS", str(keys["public"]))
    line = one_error_line(cli("eval", art, "--limit", "1"))
    assert "unsigned artifact" in line
    assert not marker.exists()
    # and a checkpoint, which carries no signature, is refused under the same policy
    assert "only a signed artifact folder runs" in one_error_line(cli("eval", EMBEDDED, "--limit", "1"))


def test_hash_only_mode_is_integrity_not_authenticity(cf_art, marker_lib, tmp_path, no_env_keys):
    """Without keys a re-hashed manifest is accepted and the swapped library loads: the control that shows
    the marker would catch a load through the runner, and why a device must be given trusted keys."""
    lib, marker = marker_lib
    marker.unlink(missing_ok=True)
    art = _copy(cf_art, tmp_path)
    shutil.copyfile(lib, art / _lib_name(art))
    _rehash(art, _manifest(art))
    code = "import sys; from edgekit import runtime; runtime.load(sys.argv[1])"
    proc = subprocess.run([PY, "-c", code, str(art)], capture_output=True, text=True)
    assert proc.returncode != 0 and "not an edgekit kernel library" in proc.stderr
    assert marker.exists()
    marker.unlink()


# ----------------------------------------------------------------------------------------------
# paths: every named path one of the manifest's hashed files, inside the folder (hash-only mode too)


def _point_library_at(art: Path, name: str, lib: Path) -> None:
    from edgekit.utils import sha256_file

    m = _manifest(art)
    old = _lib_name(art)
    isa = next(iter(m["kernels"]["libraries"]))
    m["kernels"]["libraries"][isa]["file"] = name
    m["extra_files"] = [name if f == old else f for f in m.get("extra_files", [])]
    del m["files"][old]
    (art / old).unlink()
    m["files"][name] = sha256_file(lib)
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    (art / "manifest.sig").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink-out", "symlink-dir", "unlisted", "unhashed-extra"])
def test_out_of_folder_or_unlisted_path_refused_before_load(how, cf_art, marker_lib, tmp_path, no_env_keys):
    from edgekit import runtime
    from edgekit.utils import sha256_file

    lib, marker = marker_lib
    marker.unlink(missing_ok=True)
    art = _copy(cf_art, tmp_path)
    outside = tmp_path / "libevil.so"
    shutil.copyfile(lib, outside)
    if how == "absolute":
        _point_library_at(art, str(outside), outside)
        expect = "not a plain relative path"
    elif how == "dotdot":
        _point_library_at(art, "../libevil.so", outside)
        expect = "not a plain relative path"
    elif how == "symlink-out":  # the listed name, a symlink to a file outside with the right hash
        name = _lib_name(art)
        (art / name).unlink()
        (art / name).symlink_to(outside)
        m = _manifest(art)
        m["files"][name] = sha256_file(outside)
        (art / "manifest.json").write_text(json.dumps(m, indent=2))
        expect = "outside the artifact folder or through a symlink"
    elif how == "symlink-dir":  # kernels/ itself a symlink to a folder outside
        name = _lib_name(art)
        evil_dir = tmp_path / "evil_kernels"
        evil_dir.mkdir()
        shutil.copyfile(lib, evil_dir / Path(name).name)
        shutil.rmtree(art / "kernels")
        (art / "kernels").symlink_to(evil_dir, target_is_directory=True)
        m = _manifest(art)
        m["files"][name] = sha256_file(lib)
        (art / "manifest.json").write_text(json.dumps(m, indent=2))
        expect = "outside the artifact folder or through a symlink"
    elif how == "unlisted":  # the library entry names a file in the folder that the files map does not hash
        shutil.copyfile(lib, art / "kernels" / "libevil.so")
        m = _manifest(art)
        next(iter(m["kernels"]["libraries"].values()))["file"] = "kernels/libevil.so"
        (art / "manifest.json").write_text(json.dumps(m, indent=2))
        expect = "not among the manifest's hashed files"
    else:  # a library named by the manifest outside its files map and absent from the folder
        m = _manifest(art)
        next(iter(m["kernels"]["libraries"].values()))["file"] = "kernels/libnothere.so"
        (art / "manifest.json").write_text(json.dumps(m, indent=2))
        expect = "not one of its hashed files"
    (art / "manifest.sig").unlink(missing_ok=True)
    with pytest.raises(EdgekitError, match=expect) as e:
        runtime.load(art)  # hash-only: no keys anywhere
    _one_line(e)
    assert not marker.exists()


def test_files_map_is_mandatory(cf_art, tmp_path, no_env_keys):
    from edgekit import runtime

    art = _copy(cf_art, tmp_path)
    m = _manifest(art)
    del m["files"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgekitError, match="no 'files' map"):
        runtime.load(art)


# ----------------------------------------------------------------------------------------------
# geometry: checked against the net and the hashed weights before native code (subprocess: a crash shows)


def _attack(m: dict, how: str) -> None:
    if how == "offset-2^40":
        m["param_layout"]["gmbi3_1.pw_wt"][0] = 2 ** 40
    elif how == "widths-x8":
        m["net"]["widths"] = [w * 8 for w in m["net"]["widths"]]
    elif how == "widths-x8-relaid":  # widths x8 and the layout they give: the weights are then too short
        from edgekit.backends.cpu_fused.build import expected_param_layout

        m["net"]["widths"] = [w * 8 for w in m["net"]["widths"]]
        m["net"]["head_width"] *= 8
        layout, total = expected_param_layout(m["net"], False)
        m["param_layout"] = {k: list(v) for k, v in layout.items()}
        m["weights_bytes"] = total
    elif how == "negative-size":
        m["param_layout"]["head.b"][1] = -4
    elif how == "huge-size":
        m["param_layout"]["stem.w"][1] = 2 ** 40
    elif how == "huge-depth":
        m["net"]["depths"] = [10 ** 6] * 4
    elif how == "huge-input":
        m["preprocess"]["input_size"] = [60000, 60000]
    elif how == "channels":
        m["net"]["in_channels"] = 10 ** 9


GEOMETRY_REFUSALS = {
    "offset-2^40": "parameter layout does not match its net (gmbi3_1.pw_wt: [1099511627776",
    "widths-x8": "parameter layout does not match its net",
    "widths-x8-relaid": "its net needs",
    "negative-size": "'head.b' has layout",
    "huge-size": "parameter layout does not match its net (stem.w: [0, 1099511627776]",
    "huge-depth": "implausible cpu-fused net",
    "huge-input": "outside 1..4096 per side",  # the preprocessing spec's bound (models/checkpoint gates) comes first
    "channels": "implausible cpu-fused net",
}


@pytest.mark.parametrize("how", list(GEOMETRY_REFUSALS))
def test_geometry_refused_with_one_line_not_a_crash(how, cf_art, tmp_path):
    art = _copy(cf_art, tmp_path)
    m = _manifest(art)
    _attack(m, how)
    _rehash(art, m)  # hash-only: the manifest is consistent with the files, only its geometry lies
    env = {k: v for k, v in os.environ.items() if k != "EDGEKIT_TRUSTED_KEYS"}
    proc = subprocess.run([PY, "-c", "from edgekit.cli import main; main()", "eval", str(art), "--limit", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode < 0:
        pytest.fail(f"crashed with signal {-proc.returncode}: {proc.stderr[-500:]}")
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "internal error" not in lines[0] and GEOMETRY_REFUSALS[how] in lines[0], lines[0]


def test_expected_layout_is_what_compile_writes(cf_art):
    from edgekit.backends.cpu_fused.build import expected_param_layout

    m = _manifest(cf_art)
    layout, total = expected_param_layout(m["net"], False)
    assert {k: list(v) for k, v in layout.items()} == m["param_layout"] and total == m["weights_bytes"]


# ----------------------------------------------------------------------------------------------
# serving


@pytest.fixture()
def triton_repo(onnx_art, tmp_path):
    pytest.importorskip("tritonclient")
    from edgekit.serve.repository import ServeOptions, export_repo

    out = tmp_path / "repo"
    export_repo([str(onnx_art)], "triton", str(out), name="m", opts=ServeOptions(triton_backend="python"))
    return out


def test_serve_check_accepts_the_exported_repository(triton_repo, keys, no_env_keys):
    from edgekit.serve.triton import check_repository

    assert check_repository(triton_repo) == ["m"]
    assert check_repository(triton_repo, [str(keys["public"])]) == ["m"]


@pytest.mark.parametrize("attack", ["model.py modified", "module beside model.py", "pycache", "artifact file",
                                    "other key"])
def test_serve_check_refuses_a_modified_python_model(attack, triton_repo, keys, cli, no_env_keys):
    from edgekit.serve.triton import check_repository

    vdir = triton_repo / "m" / "1"
    trusted = None
    if attack == "model.py modified":
        with open(vdir / "model.py", "a") as f:
            f.write("\nimport os  # one more line\n")
        expect = "model.py is not edgekit's triton_model.py"
    elif attack == "module beside model.py":
        (vdir / "numpy.py").write_text("raise SystemExit('shadowed')\n")
        expect = "numpy.py is not part of the exported model"
    elif attack == "pycache":  # a folder is deleted before the check (test below); a link to one is refused
        (triton_repo / "elsewhere").mkdir()
        (vdir / "__pycache__").symlink_to(triton_repo / "elsewhere")
        expect = "__pycache__ is not part of the exported model"
    elif attack == "artifact file":
        p = vdir / "artifact" / "model.onnx"
        data = bytearray(p.read_bytes())
        data[100] ^= 1
        p.write_bytes(bytes(data))
        expect = "does not match its sha256"
    else:
        trusted = [str(keys["other_public"])]
        expect = "not a trusted key"
    with pytest.raises(EdgekitError, match=expect) as e:
        check_repository(triton_repo, trusted)
    _one_line(e)
    # edgekit serve refuses it the same way, before looking for a tritonserver
    args = ["serve", triton_repo] + (["--trusted-key", trusted[0]] if trusted else [])
    assert expect in one_error_line(cli(*args))


def test_serve_deletes_planted_bytecode_before_the_check(triton_repo, no_env_keys):
    """Triton's stub caches model.py's bytecode in __pycache__ (it ignores PYTHONDONTWRITEBYTECODE), so the check
    deletes that folder first: bytecode planted there (to run in place of model.py) is gone, never run."""
    from edgekit.serve.triton import check_repository

    cache = triton_repo / "m" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"planted")
    assert check_repository(triton_repo) == ["m"]
    assert not cache.exists()


def test_serve_binds_loopback_by_default():
    from edgekit.commands.serve import serve_cmd
    from edgekit.serve.triton import TritonServer

    opts = {p.name: p.default for p in serve_cmd.params}
    assert opts["http"].startswith("127.0.0.1:") and opts["grpc"].startswith("127.0.0.1:")
    sig = inspect.signature(TritonServer.__init__).parameters
    assert sig["http"].default.startswith("127.0.0.1:") and sig["grpc"].default.startswith("127.0.0.1:")


def test_library_swapped_after_verification_is_not_the_one_loaded(cf_art, marker_lib, keys, tmp_path, no_env_keys):
    """The time-of-check/time-of-use window: the runner loads the bytes it hashed (a sealed memfd), so a
    library replaced between verify_artifact and the load is refused, never loaded."""
    from edgekit import runtime
    from edgekit.artifact import verify_artifact

    lib, marker = marker_lib
    marker.unlink(missing_ok=True)
    art = _copy(cf_art, tmp_path)
    verified = verify_artifact(art, [keys["public"]])
    shutil.copyfile(lib, art / _lib_name(art))  # swapped after the check, before the runner reads it
    with pytest.raises(EdgekitError, match="changed after it was verified"):
        runtime.load(verified)
    assert not marker.exists()


def test_compile_sign_with_a_wrong_key_is_one_line_before_any_work(keys, tmp_path, cli):
    out = tmp_path / "A"
    line = one_error_line(cli("compile", EMBEDDED, "--target", "onnx", "--out", out, "--sign", keys["public"]))
    assert "not a PEM private key" in line and not out.exists()
    line = one_error_line(cli("compile", EMBEDDED, "--target", "onnx", "--out", out, "--sign", tmp_path / "none.pem"))
    assert "not found" in line and not out.exists()
