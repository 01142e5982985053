"""Attacks on the gaps between edgekit's checks (issue #23 review): each test is one attack or power cut that
got through, kept as a regression test next to its fix.

Real parts only: the fleet of tests/test_fleet.py (a real TUF repository served over HTTP on 127.0.0.1, a device
with 1.1.0 committed and 1.0.0 kept), real ``edgekit`` processes, and crashes injected as a real process exit
(``os._exit``, no cleanup runs, the same as kill -9 or a power cut at that instant).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("tuf", reason="tuf not installed (pip install 'edgekit[ota]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")

from edgekit.device.state import InstallRoot  # noqa: E402
from edgekit.ota import generate_keypair, installed  # noqa: E402

from test_fleet import TASK, env, fleet, ok, one_error_line, tree, update  # noqa: E402,F401  (fixtures)
from test_fleet_transactions import EDGEKIT, make_package, publish  # noqa: E402
from test_fleet_trust import publish_raw  # noqa: E402
from test_artifact_trust import cf_art, keys, marker_lib  # noqa: E402,F401  (fixtures)

SUBPROCESS_ENV = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def crash_during(device: Path, code: str, crash_at: str) -> int:
    """Run ``code`` in a fresh Python process in which the call ``crash_at`` (``module:attr`` or
    ``module:Class.attr``) ends the process at once (``os._exit``: no finally, no flush, like a power cut)."""
    module, _, attr = crash_at.partition(":")
    owner, _, name = attr.rpartition(".")
    script = (f"import os, importlib\n"
              f"m = importlib.import_module({module!r})\n"
              f"o = getattr(m, {owner!r}) if {owner!r} else m\n"
              f"setattr(o, {name!r}, lambda *a, **k: os._exit(137))\n"
              f"ROOT = {str(device)!r}\n" + code)
    return subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True,
                          timeout=120).returncode


# --- a power cut inside a rollback --------------------------------------------------------------------------------

@pytest.mark.parametrize("crash_at", ["edgekit.device.state:InstallRoot._switch_current",  # before the switch
                                      "edgekit.device.state:_fsync_dir",  # after os.replace, before its fsync
                                      "edgekit.device.state:_write_state"])  # switched, state not yet written
def test_power_cut_at_each_write_of_a_rollback_never_reinstalls_the_rolled_back_version(env, crash_at):
    """Attack: power cut during ``edgekit rollback`` after ROOT/current was switched back and before state.json
    recorded the rollback. The reconcile on read took the unrecorded switch for a direct install, so the version
    the operator rolled back was not blocked and the next cron ``update`` installed it again. Before the switch,
    the rollback simply did not happen (1.2.0 serves, and the next update leaves it)."""
    publish(env, env["pkgs"]["1.2.0"])
    ok(update(env))
    device = env["device"]
    assert installed(device)["version"] == "1.2.0"
    rc = crash_during(device, "from edgekit.ota.install import rollback; rollback(ROOT)", crash_at)
    assert rc == 137
    assert os.readlink(device / "current") == InstallRoot(device).read().current["dir"]
    if installed(device)["version"] == "1.2.0":  # cut before the switch: no rollback happened
        assert crash_at.endswith("_switch_current")
        assert ok(update(env)).stdout.startswith("up to date")
        assert installed(device)["version"] == "1.2.0"
        return
    r = update(env)
    assert r.exit_code == 3, (r.stdout, r.stderr)
    one_error_line(r, "1.2.0, the newest the repository offers, is blocked on this device")
    assert installed(device)["version"] == "1.1.0"


# --- an operator's act while an update is downloading ---------------------------------------------------------

class _GateHandler(BaseHTTPRequestHandler):
    """Serves the repository; a GET of ``server.gated`` waits for ``server.gate`` (set ``server.hit`` first)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.server.root) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        if self.path == self.server.gated:
            self.server.hit.set()
            self.server.gate.wait(30)
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def gated_server(root: Path, gated: str):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GateHandler)
    server.root, server.gated, server.daemon_threads = root, gated, True
    server.gate, server.hit = threading.Event(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_install_while_update_downloads_is_not_overwritten_by_an_older_version(env):
    """Attack (a race, no key needed): ``update`` decides that 1.2.0 is newer than what serves, then downloads it
    (seconds to minutes). Meanwhile the operator installs 1.3.0 by hand (``edgekit install`` takes the install
    root's lock, which the downloading update does not hold). The update then committed 1.2.0 over 1.3.0: a
    downgrade nobody asked for. The update must re-check under the lock what it decided without it."""
    import hashlib

    device = env["device"]
    publish(env, env["pkgs"]["1.2.0"])
    digest = hashlib.sha256(env["pkgs"]["1.2.0"].read_bytes()).hexdigest()
    (target,) = (env["repo"] / "targets" / "adapters").glob(f"{digest}.*")
    newer = make_package(env, "hand", version="1.3.0", adapter_seed=1)
    with gated_server(env["repo"], "/" + str(target.relative_to(env["repo"]))) as (server, url):
        proc = subprocess.Popen(EDGEKIT + ["update", "--repo", url, "--root", str(device), "--trust", str(env["trust"]),
                                           "--timeout", "30"], env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert server.hit.wait(60), "the update never asked for the package"
            ok(env["cli"]("install", newer, "--root", device, "--pubkey", env["pkg_pub"]))
            assert installed(device)["version"] == "1.3.0"
            server.gate.set()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert installed(device)["version"] == "1.3.0", (out, err)
    assert proc.returncode == 0, err
    assert "1.3.0" in out and "up to date" in out, out
    assert InstallRoot(device).read().trial is None


# --- the backbone through TUF: an older, validly signed backbone ------------------------------------------------

def test_older_backbone_package_replayed_by_a_stolen_targets_key_is_refused(env, tmp_path):
    """Attack (one online key): the holder of the ``targets`` key points ``backbones/NAME.zip`` back at the older,
    validly sealed backbone 1.0.0 after the device installed 1.1.0. Adapters are refused when not newer than the
    version in service, backbones were not: ``update --backbone repo:NAME`` installed 1.0.0 and recorded it as the
    device's backbone (Uptane keeps a rollback counter per image; TUF's own rollback check covers metadata, not
    which file a freshly signed targets role names)."""
    cli = env["cli"]
    name = json.loads((env["art"] / "manifest.json").read_text())["model"]["backbone"]
    bb_key = generate_keypair(tmp_path / "bb-key")[0]
    ok(cli("repo", "package-key", env["repo"], bb_key.parent / "public_key.pem", "--backbones", "gmbinet-*"))
    bb = {}
    for version in ("1.0.0", "1.1.0"):
        bb[version] = tmp_path / f"backbone-{version}.zip"
        ok(cli("package", env["art"], "--key", bb_key, "--version", version, "--out", bb[version]))
    ok(cli("repo", "add", env["repo"], bb["1.0.0"]))
    ok(cli("repo", "publish", env["repo"]))
    bundle = tmp_path / "bundle"
    ok(cli("repo", "provision", env["repo"], "--out", bundle))
    dev = tmp_path / "dev"

    def run(*extra):
        return cli("update", "--repo", env["url"], "--root", dev, "--trust", bundle, "--backbone", f"repo:{name}",
                   "--task", TASK, *extra)

    ok(run())
    ok(cli("repo", "add", env["repo"], bb["1.1.0"]))
    ok(cli("repo", "publish", env["repo"]))
    ok(run())
    recorded = (dev / "backbone.json").read_bytes()
    assert Path(json.loads(recorded)["ref"]).name == f"{name}-1.1.0"
    publish_raw(env, "targets", f"backbones/{name}.zip", bb["1.0.0"].read_bytes())
    one_error_line(run(), "older than")
    assert (dev / "backbone.json").read_bytes() == recorded


# --- a crafted state.json --------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["previous", "trial"])
def test_state_entries_naming_folders_outside_versions_are_refused(env, tmp_path, entry):
    """Attack (write access to state.json, e.g. a restored backup or a careless edit): ``previous`` or ``trial``
    names ``../outside``, a copy of a real version folder outside ROOT/versions. Only ROOT/current's target was
    checked against the version-folder rule; ``rollback`` switched ROOT/current to the outside folder (after which
    every read of the install root failed), and a stale trial outside was taken as one. Every entry's folder
    must obey the same rule as ROOT/current's target."""
    device = env["device"]
    outside = tmp_path / "outside"
    state = json.loads((device / "state.json").read_text())
    shutil.copytree(device / state["previous"]["dir"], outside)
    rel = os.path.relpath(outside, device)
    state[entry] = {"version": "1.0.0", "dir": rel, **({"started": "2026-01-01T00:00:00Z"} if entry == "trial" else {})}
    os.chmod(device / "state.json", 0o644)
    (device / "state.json").write_text(json.dumps(state))
    one_error_line(env["cli"]("rollback", "--root", device), "state.json")
    assert os.readlink(device / "current") == "versions/1.1.0"
    assert installed_or_error(device) is None
    assert outside.is_dir() and (outside / "manifest.json").is_file()


def installed_or_error(device):
    """None when reading the install root is refused with one EdgekitError line."""
    from edgekit.errors import EdgekitError

    try:
        return installed(device)
    except EdgekitError:
        return None


# --- a backbone change the adapter in service does not fit -----------------------------------------------------

def test_a_new_backbone_is_not_recorded_while_the_adapter_in_service_does_not_fit_it(env, tmp_path):
    """Failure class (a wrong pairing that stays unnoticed): ``update --backbone NEW`` (a new backbone: other
    weights, so another backbone_sha256) recorded NEW as the device's backbone at once, before looking for an
    adapter trained on it. With none published yet the run said "up to date" (exit 0), and the device was left
    recording a backbone that the adapter in service was never trained on. A station that pairs ROOT/current with
    the recorded backbone then runs a wrong model, and no later run noticed. The record must only move together
    with an adapter that fits it (or when the adapter in service already fits)."""
    import torch

    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet, GMBINetConfig

    device = env["device"]
    torch.manual_seed(7)  # the fleet's backbone architecture, other weights
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    other = Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(tmp_path / "other.pt")
    recorded = (device / "backbone.json").read_bytes()
    before = tree(device)
    line = one_error_line(update(env, "--backbone", other), "no adapter")
    assert "1.1.0 is still in service" in line
    assert (device / "backbone.json").read_bytes() == recorded and tree(device) == before
    assert installed(device)["version"] == "1.1.0"
    assert ok(update(env)).stdout.startswith("up to date")  # the cron run, on the recorded backbone, is unaffected


# --- the device's key policy, set but empty -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", " ", os.pathsep])
def test_trusted_keys_variable_set_but_naming_no_key_fails_closed(value, tmp_path, cli, monkeypatch, request):
    """Attack on configuration: a station's unit file says ``EDGEKIT_TRUSTED_KEYS=${KEY_FILE}`` and KEY_FILE is
    unset, so the variable is present but empty (or holds only separators). That silently meant "no keys:
    hash-only", and a swapped cpu-fused library with a re-hashed manifest ran its constructor. A variable that
    is set is a policy: when it names no key file, nothing loads."""
    from test_artifact_trust import _copy, _lib_name, _manifest, _rehash

    cf_art = request.getfixturevalue("cf_art")
    lib, marker = request.getfixturevalue("marker_lib")
    marker.unlink(missing_ok=True)
    art = _copy(cf_art, tmp_path)
    shutil.copyfile(lib, art / _lib_name(art))
    _rehash(art, _manifest(art))
    monkeypatch.setenv("EDGEKIT_TRUSTED_KEYS", value)
    line = one_error_line(cli("eval", art, "--limit", "1"), "EDGEKIT_TRUSTED_KEYS")
    assert "names no key file" in line
    assert not marker.exists()


# --- names and versions with a trailing newline ------------------------------------------------------------------

def test_names_versions_and_hashes_with_a_trailing_newline_are_refused(env, tmp_path):
    """Class of problem: every validator used ``re.match(r"^...$")``, and ``$`` also matches before a final
    newline. So ``1.2.0\\n`` was a valid version (another spelling of 1.2.0, which the block list, keyed by the
    string, did not recognise), ``crack-line1\\n`` a valid task name (a path component with a newline, and inside
    the trust bundle's ``crack-*`` scope), and ``<sha256>\\n`` a valid hash. All now end at ``\\Z``."""
    from edgekit.errors import EdgekitError
    from edgekit.mlff.adapter import is_plain_file_name, is_sha256
    from edgekit.mlff.names import is_safe_name
    from edgekit.mlff.version import parse_version
    from edgekit.ota.trust import check_pattern

    cli = env["cli"]
    key = env["w"] / "package-key" / "private_key.pem"
    one_error_line(cli("package", env["adapters"][0], "--key", key, "--version", "1.2.0\n", "--out",
                       tmp_path / "p.zip"), "invalid version")
    assert not (tmp_path / "p.zip").exists()
    one_error_line(update(env, "--task", TASK + "\n"), "--task")
    with pytest.raises(EdgekitError):
        parse_version("1.2.0\n")
    with pytest.raises(EdgekitError):
        check_pattern("crack-*\n", "pattern")
    assert not is_safe_name(TASK + "\n") and not is_sha256("0" * 64 + "\n")
    assert not is_plain_file_name("adapter.json\n")
    assert parse_version("1.2.0") == (1, 2, 0) and is_safe_name(TASK)  # the one spelling still passes


# --- a health entry that lies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("lie", [{"rtol": 1e9, "min_top1_agreement": 1e-9}, {"rtol": 1e9}, {"min_top1_agreement": 1e-9}])
def test_a_health_entry_that_makes_the_check_vacuous_fails_it(env, lie):
    """Attack (a careless or compromised packaging step, signed with the real key): the package's health entry
    sets tolerances under which (nearly) any output passes (rtol 1e9, top-1 agreement 1e-9). The samples were
    recorded on another adapter than the one shipped (the fleet's ``bad-health`` case), so an honest check
    fails; with the lie, the wrong adapter passed and was committed. The tolerances are signed, but the device
    must not let the package decide that its own check is vacuous: an entry looser than the device's limits
    (``MAX_RTOL``, ``MIN_TOP1_AGREEMENT_FLOOR``) is a failed check."""
    from edgekit.fleet.health import record_health
    from edgekit.models.backbones import load_backbone
    from edgekit.ota import build_package

    health, info = record_health(env["adapters"][1], load_backbone(str(env["ckpt"])),
                                 sorted(env["data"].rglob("*.png"))[::5])
    info.update(lie)
    pkg = env["w"] / f"lying-{time.monotonic_ns()}.zip"
    build_package(env["adapters"][0], env["w"] / "package-key" / "private_key.pem", "1.2.0", pkg, health=health,
                  health_info=info)
    publish(env, pkg)
    r = update(env)
    assert installed(env["device"])["version"] == "1.1.0", r.stdout
    assert "looser than this device accepts" in one_error_line(r, "health check of 1.2.0 failed")
    assert "1.2.0" in InstallRoot(env["device"]).read().blocked


def test_a_recorded_backbone_the_adapter_in_service_does_not_fit_is_never_up_to_date(env, tmp_path):
    """Power cut between the backbone record and its adapter's commit (the one window left by the fix above):
    ``backbone.json`` names the new backbone, the trial of its adapter is discarded, the old adapter serves. The
    next cron run must not call that "up to date": one error line (exit 2) on every run until an adapter for
    the recorded backbone is installed, so monitoring sees the mismatch. The state is written as that crash
    leaves it (backbone.json with another weights file's identity)."""
    import torch

    from edgekit.data.preprocess import PreprocessSpec
    from edgekit.fleet.backbone import record_device_backbone, resolve_backbone
    from edgekit.models.checkpoint import Checkpoint
    from edgekit.models.gmbinet import GMBINet, GMBINetConfig

    device = env["device"]
    torch.manual_seed(7)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    other = Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(tmp_path / "other.pt")
    record_device_backbone(device, resolve_backbone(other))
    for _ in range(2):
        line = one_error_line(update(env), "does not fit the adapter in service")
        assert "1.1.0 is still in service" in line
    assert installed(device)["version"] == "1.1.0"


# --- the update lock in odd states --------------------------------------------------------------------------------

@pytest.mark.parametrize("odd", ["lock is a folder", "lock is a symlink", "tuf is a file"])
def test_the_update_lock_in_odd_states_gives_one_line(env, tmp_path, odd):
    """ROOT/tuf/update.lock a folder, a symlink planted to a file elsewhere, or ROOT/tuf a plain file (a careless
    restore, another tool, a local attacker): ``update`` ended in "internal error (IsADirectoryError)" /
    "(FileExistsError)", or opened (and would have created) the lock through the symlink. Now one error line,
    nothing followed or written, 1.1.0 still serving."""
    device = env["device"]
    tuf, lock, target = device / "tuf", device / "tuf" / "update.lock", tmp_path / "elsewhere"
    if odd == "tuf is a file":
        shutil.rmtree(tuf)
        tuf.write_text("")
    else:
        lock.unlink(missing_ok=True)
        lock.mkdir() if odd == "lock is a folder" else os.symlink(target, lock)
    before = tree(device)
    one_error_line(update(env), "move away what is there")
    assert tree(device) == before and not target.exists()
    assert installed(device)["version"] == "1.1.0"


# --- the version in service, changed on disk ------------------------------------------------------------------

def test_a_changed_byte_in_the_adapter_in_service_is_refused_at_load(env):
    """Failure class (bit rot, a restore from a bad backup, a local edit): one byte of the committed adapter's
    weights changes after its install. ``load_installed_adapter``, the station's way to load the adapter in
    service, read the files without checking them against the package manifest kept beside them, so the changed
    weights were used and nobody noticed. It now checks every payload file's size and sha256 first."""
    from edgekit.errors import EdgekitError
    from edgekit.ota import load_installed_adapter

    device = env["device"]
    folder = Path(installed(device)["path"])
    weights = folder / "adapter.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the tensor data: still a loadable file, other weights
    weights.write_bytes(bytes(data))
    with pytest.raises(EdgekitError, match="adapter.safetensors does not match its sha256"):
        load_installed_adapter(device)
