"""OTA adapter packages: keys, signed packages, verification, atomic install, rollback.

Every refusal must exit non-zero with one ``error:`` line and leave the install root exactly as it was.
"""
import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.ota import (active_adapter_dir, build_package, generate_keypair, install_package, installed,
                         load_adapter, load_installed_adapter, parse_version, rollback, save_adapter)
from edgekit.device import state as device_state  # where the install root is written
from edgekit.ota.keys import key_id, load_private_key
from edgekit.ota.package import manifest_to_bytes, seal_archive

BACKBONE_SHA = hashlib.sha256(b"the backbone artifact").hexdigest()
META = {"task": "steel-defects", "classes": ["inclusion", "patches", "scratches"], "backbone": "gmbinet-sd900",
        "backbone_sha256": BACKBONE_SHA, "input": {"shape": [3, 64, 64], "dtype": "float32"},
        "config": {"hidden": 8}}


# --- helpers ----------------------------------------------------------------------------------------

def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"fuse.weight": torch.randn(8, 4, generator=g), "fuse.bias": np.arange(8, dtype=np.float32)}


def snapshot(root: Path):
    """Every entry under root: links with their target, dirs and files with mode (files: sha256, mtime)."""
    if not root.exists():
        return None
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", st.st_mode)
            else:
                entries[rel] = ("file", st.st_mode, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def one_error_line(result, phrase):
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert phrase in lines[0], lines[0]
    return lines[0]


def rewrite_zip(src: Path, dst: Path, change=lambda name, data: data, extra=(), seal_with=None):
    """Copy a package, passing each member through ``change`` (None drops it), then append ``extra``.

    ``seal_with``: a private key that seals the result, as a trusted but careless or hostile signer would, so
    the checks behind the file seal are reached; without it the copy carries no valid seal.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
        for member, data in extra:
            zout.writestr(member, data)
    if seal_with is not None:
        dst.write_bytes(seal_archive(dst.read_bytes(), load_private_key(seal_with)))
    return dst


def signed_zip(path: Path, private_key_path: Path, payload: dict, manifest_changes=None):
    """A correctly signed package over an arbitrary payload, for checks that sit behind the signature."""
    key = load_private_key(private_key_path)
    manifest = {"format": "edgekit-ota-package", "format_version": 2, **{k: META[k] for k in
                ("task", "classes", "backbone", "backbone_sha256", "input")},
                "version": "2.0.0", "created_utc": "2024-01-01T00:00:00Z", "key_id": key_id(key.public_key()),
                "files": [{"name": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                          for n, d in payload.items()]}
    manifest.update(manifest_changes or {})
    data = manifest_to_bytes(manifest)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", data)
        zf.writestr("manifest.sig", key.sign(data))
        for name, content in payload.items():
            zf.writestr("payload/" + name, content)
    path.write_bytes(seal_archive(path.read_bytes(), key))
    return path


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture()
def keys(tmp_path):
    private, public, _ = generate_keypair(tmp_path / "keys")
    return private, public


@pytest.fixture()
def other_keys(tmp_path):
    private, public, _ = generate_keypair(tmp_path / "other-keys")
    return private, public


@pytest.fixture()
def adapter(tmp_path):
    return save_adapter(tmp_path / "adapter", tensors(), META)


@pytest.fixture()
def make_package(tmp_path, adapter, keys):
    def make(version, key=None, seed=0):
        folder = save_adapter(tmp_path / f"adapter-{version}-{seed}", tensors(seed), META) if seed else adapter
        out = tmp_path / "packages" / f"steel-{version}-{seed}.zip"
        build_package(folder, key or keys[0], version, out)
        return out
    return make


@pytest.fixture()
def root_with_v1(tmp_path, make_package, keys):
    root = tmp_path / "device"
    install_package(make_package("1.0.0"), root, [keys[1]])
    return root


# --- adapter format, versions, keys ---------------------------------------------------------------

def test_adapter_round_trip_is_safetensors(tmp_path):
    folder = save_adapter(tmp_path / "a", tensors(), {**META, "version": "1.0.0"})
    loaded, meta = load_adapter(folder)
    assert torch.equal(loaded["fuse.weight"], tensors()["fuse.weight"])
    assert torch.equal(loaded["fuse.bias"], torch.arange(8, dtype=torch.float32))
    assert meta["weights"] == ["adapter.safetensors"] and meta["config"] == {"hidden": 8}
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    with pytest.raises(EdgekitError, match="backbone_sha256"):
        save_adapter(tmp_path / "b", tensors(), {**META, "backbone_sha256": "not-a-hash"})
    with pytest.raises(EdgekitError, match="classes"):
        save_adapter(tmp_path / "c", tensors(), {**META, "classes": []})


def test_versions_compare_numerically_and_malformed_are_refused():
    assert parse_version("1.10.0") > parse_version("1.9.7") > parse_version("1.9.0") > parse_version("0.99.99")
    for bad in ("1.2", "1.2.3.4", "v1.2.3", "01.2.3", "1.2.3-rc1", "", None, " 1.2.3"):
        with pytest.raises(EdgekitError, match="invalid version"):
            parse_version(bad)


def test_keygen_writes_private_0600_and_refuses_overwrite(cli, tmp_path):
    out = tmp_path / "k"
    r = cli("keygen", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE((out / "private_key.pem").stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in (out / "public_key.pem").read_bytes()
    before = snapshot(out)
    one_error_line(cli("keygen", "--out", out), "already exists")
    assert snapshot(out) == before
    r = cli("keygen", "--out", out, "--force")
    assert r.exit_code == 0 and snapshot(out) != before
    assert stat.S_IMODE((out / "private_key.pem").stat().st_mode) == 0o600


# --- package and verify ---------------------------------------------------------------------------

def test_package_verify_round_trip(cli, tmp_path, adapter, keys, other_keys):
    out = tmp_path / "steel-1.2.3.zip"
    r = cli("package", adapter, "--key", keys[0], "--version", "1.2.3", "--out", out)
    assert r.exit_code == 0, r.stderr
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["manifest.json", "manifest.sig", "payload/adapter.json",
                                         "payload/adapter.safetensors"]
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["version"] == "1.2.3" and manifest["backbone_sha256"] == BACKBONE_SHA
    assert manifest["created_utc"].endswith("Z") and len(manifest["key_id"]) == 64
    assert {f["name"] for f in manifest["files"]} == {"adapter.json", "adapter.safetensors"}

    # a trusted key set: the signer may be any of them
    r = cli("verify", out, "--pubkey", other_keys[1], "--pubkey", keys[1], "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["verified"] and summary["version"] == "1.2.3" and summary["key_file"] == str(keys[1])
    assert summary["classes"] == META["classes"]
    r = cli("verify", out, "--pubkey", keys[1])
    assert r.exit_code == 0 and "1.2.3" in r.stdout and "steel-defects" in r.stdout


def test_package_refuses_malformed_version(cli, tmp_path, adapter, keys):
    out = tmp_path / "p.zip"
    one_error_line(cli("package", adapter, "--key", keys[0], "--version", "1.2", "--out", out), "invalid version")
    assert not out.exists()


def test_tampered_manifest_fails_signature(cli, tmp_path, make_package, keys, root_with_v1):
    tampered = rewrite_zip(make_package("2.0.0"), tmp_path / "tampered.zip",
                           lambda n, d: d.replace(b'"2.0.0"', b'"9.0.0"') if n == "manifest.json" else d)
    one_error_line(cli("verify", tampered, "--pubkey", keys[1]), "bad signature")
    before = snapshot(root_with_v1)
    one_error_line(cli("install", tampered, "--root", root_with_v1, "--pubkey", keys[1]), "bad signature")
    assert snapshot(root_with_v1) == before


@pytest.mark.parametrize("signature, phrase", [(b"", "bad signature"), (None, "no manifest.sig")],
                         ids=["empty", "absent"])
def test_missing_signature_refused(cli, tmp_path, make_package, keys, root_with_v1, signature, phrase):
    unsigned = rewrite_zip(make_package("2.0.0"), tmp_path / "unsigned.zip",
                           lambda n, d: d if n != "manifest.sig" else signature, seal_with=keys[0])
    before = snapshot(root_with_v1)
    one_error_line(cli("install", unsigned, "--root", root_with_v1, "--pubkey", keys[1]), phrase)
    assert snapshot(root_with_v1) == before


def test_tampered_payload_fails_hash(cli, tmp_path, make_package, keys, root_with_v1):
    def flip_a_weight_byte(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name == "payload/adapter.safetensors" else data

    tampered = rewrite_zip(make_package("2.0.0"), tmp_path / "tampered.zip", flip_a_weight_byte, seal_with=keys[0])
    one_error_line(cli("verify", tampered, "--pubkey", keys[1]), "does not match its sha256")
    before = snapshot(root_with_v1)
    one_error_line(cli("install", tampered, "--root", root_with_v1, "--pubkey", keys[1]), "does not match its sha256")
    assert snapshot(root_with_v1) == before


def test_unknown_key_refused(cli, make_package, keys, other_keys, root_with_v1):
    foreign = make_package("2.0.0", key=other_keys[0])
    one_error_line(cli("verify", foreign, "--pubkey", keys[1]), "unknown key")
    before = snapshot(root_with_v1)
    one_error_line(cli("install", foreign, "--root", root_with_v1, "--pubkey", keys[1]), "unknown key")
    assert snapshot(root_with_v1) == before


def test_signed_payload_must_be_the_declared_adapter(cli, tmp_path, adapter, keys):
    """Even a trusted signer cannot ship extra files (e.g. a pickle) beside adapter.json and its weights."""
    payload = {p.name: p.read_bytes() for p in adapter.iterdir()}
    payload["model.pt"] = b"\x80\x04pickle"
    pkg = signed_zip(tmp_path / "extra.zip", keys[0], payload)
    one_error_line(cli("verify", pkg, "--pubkey", keys[1]), "differ from those adapter.json names")


# --- malicious archives -----------------------------------------------------------------------------

def _link_member(name):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _device_member(name):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFCHR | 0o666) << 16
    return info


@pytest.mark.parametrize("member, phrase", [
    ("../x", "unsafe member path"),
    ("payload/../../x", "unsafe member path"),
    ("/etc/cron.d/x", "unsafe member path"),
    ("payload\\..\\x", "unsafe member path"),
    (_link_member("payload/adapter.link"), "symbolic link"),
    (_device_member("payload/null"), "device"),
], ids=["dotdot", "nested-dotdot", "absolute", "backslash", "symlink", "device"])
def test_unsafe_members_refused(cli, tmp_path, make_package, keys, root_with_v1, member, phrase):
    evil = rewrite_zip(make_package("2.0.0"), tmp_path / "evil.zip", extra=[(member, b"/etc/passwd")],
                       seal_with=keys[0])
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    assert name in zipfile.ZipFile(evil).namelist()  # the hostile name really is in the archive
    one_error_line(cli("verify", evil, "--pubkey", keys[1]), phrase)
    before = snapshot(root_with_v1)
    one_error_line(cli("install", evil, "--root", root_with_v1, "--pubkey", keys[1]), phrase)
    assert snapshot(root_with_v1) == before
    assert not (tmp_path / "x").exists()


def test_size_limits_packed_and_unpacked(cli, tmp_path, make_package, keys, root_with_v1):
    pkg = make_package("2.0.0")
    before = snapshot(root_with_v1)
    one_error_line(cli("install", pkg, "--root", root_with_v1, "--pubkey", keys[1], "--max-size", 256),
                   "size limit")
    # a decompression bomb: 4 MiB of zeros packs into a few KiB
    bomb = rewrite_zip(pkg, tmp_path / "bomb.zip", extra=[("payload/zeros.bin", bytes(4 << 20))], seal_with=keys[0])
    assert bomb.stat().st_size < 64 << 10
    one_error_line(cli("install", bomb, "--root", root_with_v1, "--pubkey", keys[1], "--max-size", 1 << 20),
                   "would unpack to")
    assert snapshot(root_with_v1) == before


def test_not_a_zip_refused(cli, tmp_path, keys):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"definitely not a zip")
    one_error_line(cli("verify", junk, "--pubkey", keys[1]), "not a zip archive")


# --- install: backbone, versions, atomicity --------------------------------------------------------

def test_backbone_mismatch_refused(cli, tmp_path, make_package, keys, root_with_v1):
    pkg = make_package("2.0.0")
    other = hashlib.sha256(b"another backbone").hexdigest()
    before = snapshot(root_with_v1)
    one_error_line(cli("install", pkg, "--root", root_with_v1, "--pubkey", keys[1], "--backbone-sha256", other),
                   "backbone mismatch")
    assert snapshot(root_with_v1) == before

    # the device's backbone recorded by whoever deployed it, in sha256sum's format
    (root_with_v1 / "backbone.sha256").write_text(f"{other}  backbone.pt\n")
    before = snapshot(root_with_v1)
    one_error_line(cli("install", pkg, "--root", root_with_v1, "--pubkey", keys[1]), "backbone mismatch")
    assert snapshot(root_with_v1) == before

    (root_with_v1 / "backbone.sha256").write_text(BACKBONE_SHA.upper() + "\n")
    r = cli("install", pkg, "--root", root_with_v1, "--pubkey", keys[1], "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["installed"] == "2.0.0" and result["backbone_checked"]


def test_downgrade_and_equal_version_refused_unless_allowed(cli, make_package, keys, root_with_v1):
    for version in ("1.0.0", "0.9.9"):
        pkg = make_package(version, seed=3)
        before = snapshot(root_with_v1)
        one_error_line(cli("install", pkg, "--root", root_with_v1, "--pubkey", keys[1]), "not newer than")
        assert snapshot(root_with_v1) == before

    # equal version, different content, allowed: the kept 1.0.0 folder is not overwritten in place
    r = cli("install", make_package("1.0.0", seed=3), "--root", root_with_v1, "--pubkey", keys[1],
            "--allow-downgrade")
    assert r.exit_code == 0, r.stderr
    assert installed(root_with_v1)["path"].endswith("1.0.0~2")
    assert torch.equal(load_installed_adapter(root_with_v1)[0]["fuse.weight"], tensors(3)["fuse.weight"])

    r = cli("install", make_package("0.9.9", seed=3), "--root", root_with_v1, "--pubkey", keys[1],
            "--allow-downgrade")
    assert r.exit_code == 0, r.stderr
    info = installed(root_with_v1)
    assert (info["version"], info["previous"]) == ("0.9.9", "1.0.0")
    # only the version in service and the one kept for rollback remain
    assert sorted(p.name for p in (root_with_v1 / "versions").iterdir()) == ["0.9.9", "1.0.0~2"]


def test_install_api_and_runtime_side(tmp_path, make_package, keys):
    root = tmp_path / "device"
    assert installed(root) is None and active_adapter_dir(root) is None
    result = install_package(make_package("1.0.0"), root, [keys[1]])
    assert result["installed"] == "1.0.0" and result["previous"] is None and not result["backbone_checked"]
    info = installed(root)
    assert info["version"] == "1.0.0" and info["task"] == "steel-defects" and info["previous"] is None
    assert info["backbone_sha256"] == BACKBONE_SHA and info["history"][-1]["action"] == "install"
    folder = active_adapter_dir(root)
    assert folder == (root / "versions" / "1.0.0").resolve() and os.readlink(root / "current") == "versions/1.0.0"
    loaded, meta = load_adapter(folder)
    assert torch.equal(loaded["fuse.weight"], tensors()["fuse.weight"]) and meta["task"] == "steel-defects"
    state = json.loads((root / "state.json").read_text())
    assert state["current"] == {"version": "1.0.0", "dir": "versions/1.0.0"} and state["previous"] is None
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("step", ["write", "rename", "switch"])
def test_interrupted_install_keeps_old_version(tmp_path, monkeypatch, make_package, keys, root_with_v1, step):
    pkg = make_package("2.0.0", seed=5)
    before = snapshot(root_with_v1)
    real_replace, real_rename, real_write = os.replace, os.rename, device_state._write_synced
    calls = []

    def crash(*_):
        raise OSError("simulated power loss")

    if step == "write":  # half-way through writing the staged files
        def write_then_crash(path, data):
            calls.append(path)
            if len(calls) == 2:
                crash()
            real_write(path, data)
        monkeypatch.setattr(device_state, "_write_synced", write_then_crash)
    elif step == "rename":
        monkeypatch.setattr(os, "rename", lambda src, dst: crash() if "versions" in str(dst) else real_rename(src, dst))
    else:  # the final switch of ROOT/current
        monkeypatch.setattr(os, "replace", lambda src, dst: crash() if Path(dst).name == "current"
                            else real_replace(src, dst))
    with pytest.raises(EdgekitError, match="simulated power loss.*1.0.0 is still in service"):
        install_package(pkg, root_with_v1, [keys[1]])
    monkeypatch.undo()

    assert installed(root_with_v1)["version"] == "1.0.0"
    assert torch.equal(load_installed_adapter(root_with_v1)[0]["fuse.weight"], tensors()["fuse.weight"])
    assert snapshot(root_with_v1) == before  # no staging folder, temp link or half version left behind
    assert install_package(pkg, root_with_v1, [keys[1]])["installed"] == "2.0.0"


def test_leftovers_of_a_hard_crash_are_not_installed_and_are_cleaned(tmp_path, make_package, keys, root_with_v1):
    """A power loss skips all cleanup: a staged folder and a complete but never-switched version remain."""
    (root_with_v1 / ".staging-dead").mkdir()
    (root_with_v1 / ".staging-dead" / "adapter.json").write_text("{}")
    orphan = root_with_v1 / "versions" / "2.0.0"
    orphan.mkdir()
    (orphan / "adapter.json").write_text("{}")
    assert installed(root_with_v1)["version"] == "1.0.0"

    install_package(make_package("2.0.0", seed=2), root_with_v1, [keys[1]])
    assert installed(root_with_v1)["path"] == str((root_with_v1 / "versions" / "2.0.0").resolve())
    assert torch.equal(load_installed_adapter(root_with_v1)[0]["fuse.weight"], tensors(2)["fuse.weight"])
    assert not (root_with_v1 / ".staging-dead").exists()


def test_crash_between_switch_and_state_record(monkeypatch, make_package, keys, root_with_v1):
    """The switch is the commit point: the new version serves, and the old one is still the rollback target."""
    def crash(*_):
        raise OSError("simulated power loss")

    monkeypatch.setattr(device_state, "_write_state", crash)
    with pytest.raises(EdgekitError, match="2.0.0 is in service"):
        install_package(make_package("2.0.0", seed=2), root_with_v1, [keys[1]])
    monkeypatch.undo()
    info = installed(root_with_v1)
    assert (info["version"], info["previous"]) == ("2.0.0", "1.0.0")
    assert rollback(root_with_v1)["version"] == "1.0.0"
    assert installed(root_with_v1)["previous"] == "2.0.0"


# --- rollback ---------------------------------------------------------------------------------------

def test_rollback_and_its_refusals(cli, tmp_path, make_package, keys, root_with_v1):
    one_error_line(cli("rollback", "--root", tmp_path / "nowhere"), "nothing to roll back")
    assert not (tmp_path / "nowhere").exists()

    before = snapshot(root_with_v1)
    one_error_line(cli("rollback", "--root", root_with_v1), "no previous version")
    assert snapshot(root_with_v1) == before

    assert cli("install", make_package("1.1.0", seed=7), "--root", root_with_v1, "--pubkey", keys[1]).exit_code == 0
    r = cli("rollback", "--root", root_with_v1)
    assert r.exit_code == 0, r.stderr
    assert "rolled back to 1.0.0" in r.stdout
    info = installed(root_with_v1)
    assert (info["version"], info["previous"]) == ("1.0.0", "1.1.0")
    assert torch.equal(load_installed_adapter(root_with_v1)[0]["fuse.weight"], tensors()["fuse.weight"])
    assert [h["action"] for h in info["history"]] == ["install", "install", "rollback"]

    # rolling back again returns to the version rolled back from
    r = cli("rollback", "--root", root_with_v1, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["version"] == "1.1.0"


def test_rollback_refuses_a_damaged_previous_version(cli, make_package, keys, root_with_v1):
    install_package(make_package("1.1.0", seed=7), root_with_v1, [keys[1]])
    weights = root_with_v1 / "versions" / "1.0.0" / "adapter.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"garbage")
    before = snapshot(root_with_v1)
    one_error_line(cli("rollback", "--root", root_with_v1), "damaged")
    assert snapshot(root_with_v1) == before
    assert installed(root_with_v1)["version"] == "1.1.0"
