"""Authorization on a fleet: no single online key can put an adapter on a device.

Real TUF metadata, a real HTTP server on 127.0.0.1 and real devices (the ``fleet``/``env`` fixtures of
tests/test_fleet.py). Each attacker here holds exactly what the test says (a role's private key, or a
package key the device trusts for another task) and uses python-tuf directly, the way an attacker who
does not care about ``edgekit repo``'s own checks would. The device must refuse in one line, leave its
install root byte for byte as it was and keep 1.1.0 in service.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("tuf", reason="tuf not installed (pip install 'edgekit[ota]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")

from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.fleet.repository import open_repository, target_path  # noqa: E402
from edgekit.ota import build_package, generate_keypair, installed, verify_package  # noqa: E402
from edgekit.ota.keys import load_private_key  # noqa: E402
from edgekit.ota.package import MANIFEST_NAME, PACKAGE_FORMAT, PACKAGE_FORMAT_VERSION, _write_sealed  # noqa: E402
from edgekit.ota.trust import load_bundle  # noqa: E402

from test_fleet import TASK, env, fleet, ok, one_error_line, refused, update  # noqa: E402,F401


# --- an attacker's tools: python-tuf directly, with whichever keys the attacker holds ----------------------------

def publish_raw(e, role: str, path: str, data: bytes, signer_key_id: str = "") -> None:
    """Put ``data`` at target ``path`` in ``role``'s metadata, signed with that role's key (which the attacker
    holds), then a new snapshot and timestamp (online keys). No scope or package check of edgekit repo."""
    from tuf.api.metadata import TargetFile

    repo = open_repository(e["repo"])
    tf = TargetFile.from_data(path, data, ["sha256"])
    version = json.loads(_manifest_of(data))["version"]
    # the metadata may name any key it likes: devices must not take it from here
    tf.unrecognized_fields["custom"] = {"edgekit": {"task": TASK, "version": version, "package_key_id": signer_key_id,
                                                    "backbone_sha256": "0" * 64}}
    dirname, _, base = path.rpartition("/")
    out = e["repo"] / "targets" / dirname / f"{tf.hashes['sha256']}.{base}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    with repo.edit_targets(role) as targets:
        targets.targets[path] = tf
    repo.do_snapshot()
    repo.do_timestamp(force=True)


def _manifest_of(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(MANIFEST_NAME)


def forge_adapter_package(e, tmp_path, key, version, **meta_changes) -> Path:
    """A correctly sealed package of the fleet's adapter with adapter.json fields changed (another task, another
    backbone): what a package key can produce, whatever it is trusted for."""
    src = e["adapters"][0]
    folder = tmp_path / f"adapter-{version}-{len(meta_changes)}"
    shutil.copytree(src, folder)
    meta = json.loads((folder / "adapter.json").read_text())
    meta.update(meta_changes)
    meta.pop("version", None)
    (folder / "adapter.json").write_text(json.dumps(meta))
    out = tmp_path / f"forged-{version}.zip"
    build_package(folder, key, version, out)
    return out


def device_path(e) -> str:
    return target_path(TASK, installed(e["device"])["backbone_sha256"])


# --- the two authorities -------------------------------------------------------------------------------------

def test_stolen_targets_key_alone_is_refused(env, tmp_path):
    """The targets key signs any target (even one under a delegation: top-level targets are searched first) and
    the metadata names the attacker's own package key; the device still verifies against its trust bundle."""
    attacker = generate_keypair(tmp_path / "attacker")[0]
    evil = forge_adapter_package(env, tmp_path, attacker, "9.9.9")
    publish_raw(env, "targets", device_path(env), evil.read_bytes(), "attacker")
    line = refused(env, "unknown key")
    assert "9.9.9" not in json.dumps(installed(env["device"]))
    assert line.startswith("error: update refused")


def test_stolen_delegated_key_alone_is_refused(env, tmp_path):
    """The crack role's key signs the crack line's targets; its package is sealed by a key no device trusts."""
    attacker = generate_keypair(tmp_path / "attacker")[0]
    evil = forge_adapter_package(env, tmp_path, attacker, "9.9.9")
    publish_raw(env, "crack", device_path(env), evil.read_bytes())
    refused(env, "unknown key")


def test_stolen_package_key_alone_reaches_no_device(env, tmp_path):
    """A 9.9.9 sealed with the real package key, written over the file TUF's metadata names for 1.1.0 (the thief
    has no role key to name a new file): a fresh device's download fails TUF's length/sha256 check."""
    evil = forge_adapter_package(env, tmp_path, env["w"] / "package-key" / "private_key.pem", "9.9.9")
    (target,) = [p for p in (env["repo"] / "targets" / "adapters").iterdir()
                 if verify_package(p, {env["pkg_pub"]}).version == "1.1.0"]
    target.write_bytes(evil.read_bytes())
    dev = tmp_path / "fresh"
    one_error_line(env["cli"]("update", "--repo", env["url"], "--root", dev, "--trust", env["trust"], "--backbone",
                              env["art"], "--task", TASK), "did not verify")
    assert installed(dev) is None


def test_cross_task_package_refused(env, tmp_path):
    """A paint-line key, trusted by the device for paint-* only, seals a paint-bubbles adapter; the crack role's
    key (stolen) publishes it at the crack station's path. Refused by the key scope; and a key trusted for every
    task is still refused by the package's task."""
    paint_key = generate_keypair(tmp_path / "paint-pkg")[0]
    ok(env["cli"]("repo", "package-key", env["repo"], paint_key.parent / "public_key.pem", "--tasks", "paint-*"))
    bundle = tmp_path / "bundle"
    ok(env["cli"]("repo", "provision", env["repo"], "--out", bundle))
    e = dict(env, trust=bundle)
    paint = forge_adapter_package(env, tmp_path, paint_key, "9.9.9", task="paint-bubbles")
    ok(env["cli"]("repo", "add", env["repo"], paint))  # legitimately, at its own path adapters/paint-bubbles...
    publish_raw(env, "crack", device_path(env), paint.read_bytes())
    refused(e, "unknown key")  # the paint key is not trusted for crack-line1
    # the same paint package sealed by a key the device trusts for every task: the task itself is checked
    wide_key = generate_keypair(tmp_path / "wide")[0]
    ok(env["cli"]("repo", "package-key", env["repo"], wide_key.parent / "public_key.pem", "--tasks", "*"))
    ok(env["cli"]("repo", "provision", env["repo"], "--out", bundle, "--force"))
    paint2 = forge_adapter_package(env, tmp_path, wide_key, "9.9.10", task="paint-bubbles")
    publish_raw(env, "crack", device_path(env), paint2.read_bytes())
    refused(e, "the package is for task paint-bubbles")


def test_cross_backbone_package_refused(env, tmp_path):
    """A crack-line1 adapter trained on another backbone, sealed by the trusted key, published at this device's
    path by the stolen crack key: the package's backbone_sha256 is checked against the device's."""
    other = forge_adapter_package(env, tmp_path, env["w"] / "package-key" / "private_key.pem", "9.9.9",
                                  backbone_sha256="ab" * 32)
    publish_raw(env, "crack", device_path(env), other.read_bytes())
    refused(env, "the package is for backbone abababab")


def test_repository_refuses_a_package_outside_its_signers_scope(env, tmp_path):
    paint_key = generate_keypair(tmp_path / "paint-pkg")[0]
    ok(env["cli"]("repo", "package-key", env["repo"], paint_key.parent / "public_key.pem", "--tasks", "paint-*"))
    crack_by_paint = forge_adapter_package(env, tmp_path, paint_key, "9.9.9")
    before = sorted(p.name for p in (env["repo"] / "metadata").iterdir())
    one_error_line(env["cli"]("repo", "add", env["repo"], crack_by_paint), "may not sign task crack-line1")
    assert sorted(p.name for p in (env["repo"] / "metadata").iterdir()) == before


# --- names that would be paths ---------------------------------------------------------------------------------

def _sealed_with_task(e, tmp_path, task: str) -> Path:
    """A package whose signed manifest and adapter.json carry ``task`` verbatim (built by hand: edgekit package
    refuses such a name)."""
    key = load_private_key(e["w"] / "package-key" / "private_key.pem")
    src = e["adapters"][0]
    meta = json.loads((src / "adapter.json").read_text())
    meta["task"] = task
    payload = {"adapter.json": json.dumps(meta).encode(),
               "adapter.safetensors": (src / "adapter.safetensors").read_bytes()}
    from edgekit.ota.keys import key_id

    manifest = {"format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
                **{k: meta[k] for k in ("task", "classes", "backbone", "backbone_sha256", "input")},
                "version": "9.9.9", "created_utc": "2026-12-06T00:00:00Z", "key_id": key_id(key.public_key()),
                "files": [{"name": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                          for n, d in payload.items()]}
    out = tmp_path / "named.zip"
    _write_sealed(manifest, payload, key, out)  # the package writer, without build_package's checks
    return out


@pytest.mark.parametrize("task", ["../../x", "a/b", "..", ".hidden", "", "x" * 65, "crack line", "crack\n1"])
def test_unsafe_task_names_refused_everywhere(env, tmp_path, task):
    cli = env["cli"]
    pkg = _sealed_with_task(env, tmp_path, task)
    with pytest.raises(EdgekitError, match="must be one path component"):
        verify_package(pkg, {env["pkg_pub"]})
    one_error_line(cli("verify", pkg, "--pubkey", env["pkg_pub"]), "must be one path component")
    outside = sorted(p.name for p in env["repo"].parent.iterdir())
    one_error_line(cli("repo", "add", env["repo"], pkg), "must be one path component")
    assert sorted(p.name for p in env["repo"].parent.iterdir()) == outside
    one_error_line(cli("install", pkg, "--root", tmp_path / "dev", "--pubkey", env["pkg_pub"]),
                   "must be one path component")
    assert not (tmp_path / "dev").exists()
    if task:
        r = cli("update", "--repo", env["url"], "--root", tmp_path / "dev2", "--trust", env["trust"], "--backbone",
                env["art"], "--task", task)
        one_error_line(r, "must be one path component")
        assert not (tmp_path / "dev2").exists()
    # edgekit package refuses to build one
    folder = tmp_path / "adapter"
    shutil.copytree(env["adapters"][0], folder)
    meta = json.loads((folder / "adapter.json").read_text())
    meta["task"] = task
    (folder / "adapter.json").write_text(json.dumps(meta))
    one_error_line(cli("package", folder, "--key", env["w"] / "package-key" / "private_key.pem", "--version",
                       "9.9.9", "--out", tmp_path / "p.zip"), "task")
    assert not (tmp_path / "p.zip").exists()


# --- the trust bundle ------------------------------------------------------------------------------------------

def test_trust_bundle_is_required_and_checked(env, tmp_path):
    cli = env["cli"]
    root_only = tmp_path / "root-only"
    root_only.mkdir()
    shutil.copy(env["repo"] / "metadata" / "1.root.json", root_only / "1.root.json")
    for trust, phrase in ((root_only / "1.root.json", "no trust.json"), (root_only, "no trust.json"),
                          (tmp_path / "nope", "not found")):
        one_error_line(cli("update", "--repo", env["url"], "--root", tmp_path / "d", "--trust", trust, "--backbone",
                           env["art"], "--task", TASK), phrase)
    assert not (tmp_path / "d").exists()
    bundle = tmp_path / "b"
    shutil.copytree(env["trust"], bundle)
    doc = json.loads((bundle / "trust.json").read_text())
    doc["package_keys"][0]["key_id"] = "0" * 64
    (bundle / "trust.json").write_text(json.dumps(doc))
    one_error_line(cli("update", "--repo", env["url"], "--root", tmp_path / "d", "--trust", bundle, "--backbone",
                       env["art"], "--task", TASK), "does not match its public key")
    b = load_bundle(env["trust"])
    assert set(b.keys_for("adapter", TASK)) and not b.keys_for("adapter", "paint-bubbles")
    assert not b.keys_for("backbone", "efficientnet-lite0")


def test_fresh_device_refuses_an_old_snapshot_served_with_a_stolen_timestamp_key(env, tmp_path):
    """Provisioned while 1.1.0 is published; the attacker (timestamp key) serves a fresh timestamp pointing at the
    older snapshot that named 1.0.0. A bundle with only the root would accept it; the seeded bundle refuses."""
    from tuf.api.metadata import MetaFile

    cli = env["cli"]
    bundle = tmp_path / "bundle-now"
    ok(cli("repo", "provision", env["repo"], "--out", bundle))
    repo = open_repository(env["repo"])
    old_snapshot = min(int(p.name.split(".")[0]) for p in (env["repo"] / "metadata").glob("*.snapshot.json")
                       if json.loads(p.read_text())["signed"]["meta"].get("crack.json", {}).get("version"))
    with repo.edit_timestamp() as ts:
        ts.snapshot_meta = MetaFile(version=old_snapshot)
    # the seeded device refuses: TUF's rollback check against the provisioned timestamp
    r = cli("update", "--repo", env["url"], "--root", tmp_path / "fresh", "--trust", bundle, "--backbone", env["art"],
            "--task", TASK)
    one_error_line(r, "snapshot version must be >=")
    assert installed(tmp_path / "fresh") is None
    # a bundle without the seeds (root only) is fooled into the old 1.0.0: why the bundle carries them
    naked = tmp_path / "bundle-root-only"
    naked.mkdir()
    for n in ("root.json", "trust.json"):
        shutil.copy(bundle / n, naked / n)
    r = ok(cli("update", "--repo", env["url"], "--root", tmp_path / "fooled", "--trust", naked, "--backbone",
               env["art"], "--task", TASK, "--json"))
    assert json.loads(r.stdout)["version"] == "1.0.0"


# --- the backbone through the same repository --------------------------------------------------------------------

def test_backbone_shipped_through_tuf(env, tmp_path):
    cli = env["cli"]
    name = json.loads((env["art"] / "manifest.json").read_text())["model"]["backbone"]
    bb_key = generate_keypair(tmp_path / "bb-key")[0]
    bb_pkg = tmp_path / "backbone-1.0.0.zip"
    ok(cli("package", env["art"], "--key", bb_key, "--version", "1.0.0", "--out", bb_pkg))
    # not yet trusted for backbones: the repository refuses it
    one_error_line(cli("repo", "add", env["repo"], bb_pkg, "--pubkey", bb_key.parent / "public_key.pem"),
                   f"may not sign backbone {name}")
    ok(cli("repo", "package-key", env["repo"], bb_key.parent / "public_key.pem", "--backbones", "gmbinet-*"))
    added = json.loads(ok(cli("repo", "add", env["repo"], bb_pkg, "--json")).stdout)
    assert added[0]["target"] == f"backbones/{name}.zip"
    ok(cli("repo", "publish", env["repo"]))
    bundle = tmp_path / "bundle"
    ok(cli("repo", "provision", env["repo"], "--out", bundle))
    v = json.loads(ok(cli("verify", bb_pkg, "--pubkey", bb_key.parent / "public_key.pem", "--json")).stdout)
    assert v["kind"] == "backbone" and v["backbone"] == name
    # a fresh device receives its backbone and then its adapter, health-checked on that backbone
    dev = tmp_path / "fresh"
    r = json.loads(ok(cli("update", "--repo", env["url"], "--root", dev, "--trust", bundle, "--backbone",
                          f"repo:{name}", "--task", TASK, "--json")).stdout)
    assert r["action"] == "installed" and r["version"] == "1.1.0" and r["health"]["ok"]
    recorded = json.loads((dev / "backbone.json").read_text())
    assert recorded["kind"] == "artifact" and Path(recorded["ref"]).parent == (dev / "backbones").resolve()
    assert recorded["backbone_sha256"] == installed(dev)["backbone_sha256"]
    # the old bundle, whose keys may sign no backbone, refuses the same package
    one_error_line(cli("update", "--repo", env["url"], "--root", tmp_path / "d2", "--trust", env["trust"],
                       "--backbone", f"repo:{name}", "--task", TASK), f"no package key for backbone {name}")
    assert not (tmp_path / "d2" / "backbones").exists()
    # an adapter package is not a backbone, and a backbone package is not an adapter
    one_error_line(cli("install", bb_pkg, "--root", tmp_path / "d3", "--pubkey", bb_key.parent / "public_key.pem"),
                   "is a backbone package, not an adapter package")


def test_package_without_health_samples_needs_the_operators_word(env, tmp_path):
    """Nothing could show that an adapter without samples behaves on this device: refused, unless the operator
    runs with --no-health-check."""
    bare = tmp_path / "bare-1.2.0.zip"
    build_package(env["adapters"][1], env["w"] / "package-key" / "private_key.pem", "1.2.0", bare)
    ok(env["cli"]("repo", "add", env["repo"], bare))
    ok(env["cli"]("repo", "publish", env["repo"]))
    refused(env, "carries no health-check samples")
    r = json.loads(ok(update(env, "--no-health-check", "--json")).stdout)
    assert (r["action"], r["version"], r["health"]) == ("installed", "1.2.0", None)


def test_stolen_online_snapshot_and_timestamp_keys_can_only_replay_older_metadata(env):
    """The snapshot and timestamp keys (online) together sign a snapshot that points the crack role back at an
    older, validly signed version (the one without 1.1.0): TUF's rollback check against the device's trusted
    snapshot refuses it. They cannot name a package at all: only targets and delegated roles list packages."""
    from tuf.api.metadata import MetaFile

    repo = open_repository(env["repo"])
    crack_versions = sorted(int(p.name.split(".")[0]) for p in (env["repo"] / "metadata").glob("*.crack.json"))
    with repo.edit_snapshot() as snap:
        snap.meta["crack.json"] = MetaFile(version=crack_versions[-2])
    repo.do_timestamp(force=True)
    refused(env, "BadVersionNumberError")
