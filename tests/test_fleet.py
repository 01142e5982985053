"""Fleet updates on TUF: a real repository served by a real HTTP server on 127.0.0.1, real devices.

A module fixture builds the fleet once: a tiny GMBINet backbone compiled to an ONNX backbone artifact (what
a device deploys), three MLFF adapter packages (1.0.0, 1.1.0, 1.2.0) with health samples, a TUF repository
with a delegated role per product line, and a device that installs 1.0.0 and then 1.1.0. Each attack runs on
copies of that repository and device and must leave the install root byte for byte unchanged (ROOT/tuf,
TUF's own trusted state, aside) with 1.1.0 still serving.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tuf", reason="tuf not installed (pip install 'edgekit[ota]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")

from edgekit.data.preprocess import PreprocessSpec  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.pipeline.compile import compile_model  # noqa: E402
from edgekit.fleet.backbone import resolve_backbone  # noqa: E402
from edgekit.fleet.health import check_health, record_health  # noqa: E402
from edgekit.fleet.repository import parse_duration, target_path  # noqa: E402
from edgekit.models.backbones import load_backbone  # noqa: E402
from edgekit.models.checkpoint import Checkpoint  # noqa: E402
from edgekit.models.gmbinet import GMBINet, GMBINetConfig  # noqa: E402
from edgekit.ota import build_package, generate_keypair, installed, verify_package  # noqa: E402
from edgekit.ota.keys import load_private_key  # noqa: E402
from edgekit.mlff.registry import Registry  # noqa: E402
from edgekit.train.continual import add_task, task_data_from_folder  # noqa: E402

from test_mlff import make_folders  # noqa: E402

TASK = "crack-line1"


# --- a real static HTTP server, and one that never answers ----------------------------------------------------

class _RepoHandler(SimpleHTTPRequestHandler):
    """Static files from ``server.root``; ``server.truncate``: package downloads stop half-way."""

    def __init__(self, request, client_address, server):
        super().__init__(request, client_address, server, directory=str(server.root))

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.server.truncate and self.path.startswith("/targets/"):
            data = (Path(self.server.root) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@contextlib.contextmanager
def serve(root: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RepoHandler)
    server.root, server.truncate, server.daemon_threads = root, False, True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def silent_server():
    """Accepts connections and never sends a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)
    stop, conns = threading.Event(), []

    def accept():
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for c in conns:
            c.close()
        sock.close()


# --- helpers --------------------------------------------------------------------------------------------------

def tree(root: Path, skip=("tuf",)):
    """Every entry under root (links with target, files with mode, mtime and sha256), ROOT/tuf aside."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] in skip:
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel.split("/")[0] in skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def one_error_line(result, phrase):
    assert result.exit_code != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert phrase in lines[0], lines[0]
    return lines[0]


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result


# --- the fleet --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from click.testing import CliRunner

    from edgekit.cli import main

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    w = tmp_path_factory.mktemp("fleet")
    mp = pytest.MonkeyPatch()
    mp.setenv("NO_PROXY", "127.0.0.1")
    mp.setenv("no_proxy", "127.0.0.1")
    torch.manual_seed(0)
    net = GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4))
    ckpt = Checkpoint.from_model(net, preprocess=PreprocessSpec(input_size=(32, 32))).save(w / "backbone.pt")
    data = make_folders(w / "data", ["a", "b", "c"], n=6)
    regs = {}
    for seed in (0, 1):
        regs[seed] = w / f"reg{seed}"
        add_task(regs[seed], load_backbone(str(ckpt)), TASK, task_data_from_folder(data), epochs=2, rehearsal=0,
                 seed=seed, fc_dim=16, cache_dir=None)
    adapters = {s: Registry.open(r).adapter_folder() for s, r in regs.items()}
    art = w / "backbone_onnx"
    compile_model(str(regs[0]), "onnx", "fp32", str(art), parity_data=str(data), log=lambda *_: None)

    pkg_key, pkg_pub, _ = generate_keypair(w / "package-key")
    pkgs = {}
    for version, seed in (("1.0.0", 0), ("1.1.0", 1), ("1.2.0", 0)):
        pkgs[version] = w / f"{TASK}-{version}.zip"
        ok(cli("package", adapters[seed], "--key", pkg_key, "--version", version, "--out", pkgs[version],
               "--samples", data))
    # a package whose adapter does not behave as recorded: samples recorded on the other adapter
    health, info = record_health(adapters[1], load_backbone(str(ckpt)), sorted(data.rglob("*.png"))[::5])
    pkgs["bad-health"] = w / f"{TASK}-1.2.0-bad.zip"
    build_package(adapters[0], pkg_key, "1.2.0", pkgs["bad-health"], health=health, health_info=info)

    repo, keys, device = w / "repo", w / "keys", w / "device"
    init = ok(cli("repo", "init", repo, "--keys", keys, "--package-key", pkg_pub, "--tasks", "crack-*", "--json"))
    ok(cli("repo", "delegate", repo, "crack", "--paths", "adapters/crack-*", "--key",
           generate_keypair(w / "crack-key")[0]))
    ok(cli("repo", "delegate", repo, "paint", "--paths", "adapters/paint-*", "--key",
           generate_keypair(w / "paint-key")[0]))
    trust = w / "trust-bundle"  # what ships with a device: root metadata + the package keys per task
    ok(cli("repo", "provision", repo, "--out", trust))
    ts_initial = (repo / "metadata" / "timestamp.json").read_bytes()
    server_cm = serve(repo)
    server, url = server_cm.__enter__()
    steps = {}
    add1 = ok(cli("repo", "add", repo, pkgs["1.0.0"], "--json"))
    ok(cli("repo", "publish", repo))
    steps["first"] = ok(cli("update", "--repo", url, "--root", device, "--trust", trust, "--backbone", art,
                            "--task", TASK, "--json"))
    ts_v1 = (repo / "metadata" / "timestamp.json").read_bytes()
    snapshot_files_v1 = {p.name: p.read_bytes() for p in (repo / "metadata").glob("*.snapshot.json")}
    ok(cli("repo", "add", repo, pkgs["1.1.0"]))
    ok(cli("repo", "publish", repo))
    steps["second"] = ok(cli("update", "--repo", url, "--root", device, "--trust", trust, "--json"))
    steps["again"] = ok(cli("update", "--repo", url, "--root", device, "--trust", trust))
    yield {"w": w, "cli": cli, "server": server, "url": url, "repo": repo, "keys": keys, "device": device,
           "trust": trust, "art": art, "ckpt": ckpt, "data": data, "pkgs": pkgs, "pkg_pub": pkg_pub,
           "adapters": adapters, "init": json.loads(init.stdout), "add1": json.loads(add1.stdout), "steps": steps,
           "ts_initial": ts_initial, "ts_v1": ts_v1, "snapshot_files_v1": snapshot_files_v1}
    server_cm.__exit__(None, None, None)
    mp.undo()


@pytest.fixture()
def env(fleet, tmp_path):
    """Copies of the repository (now served) and of the device with 1.1.0 in service."""
    repo, device = tmp_path / "repo", tmp_path / "device"
    shutil.copytree(fleet["repo"], repo, symlinks=True)
    shutil.copytree(fleet["device"], device, symlinks=True)
    fleet["server"].root, fleet["server"].truncate = repo, False
    e = dict(fleet, repo=repo, device=device)
    yield e
    fleet["server"].root, fleet["server"].truncate = fleet["repo"], False


def update(e, *extra, url=None, timeout=2):
    return e["cli"]("update", "--repo", url or e["url"], "--root", e["device"], "--trust", e["trust"], "--timeout",
                    timeout, *extra)


def refused(e, phrase, *, url=None, timeout=2):
    """The update is refused in one line, the install root is unchanged and 1.1.0 still serves."""
    before = tree(e["device"])
    line = one_error_line(update(e, url=url, timeout=timeout), phrase)
    assert tree(e["device"]) == before
    assert installed(e["device"])["version"] == "1.1.0"
    assert "1.1.0 is still in service" in line
    return line


def publish_12(e, *args):
    ok(e["cli"]("repo", "add", e["repo"], e["pkgs"]["1.2.0"]))
    ok(e["cli"]("repo", "publish", e["repo"], *args))
    digest = hashlib.sha256(e["pkgs"]["1.2.0"].read_bytes()).hexdigest()
    (target,) = (e["repo"] / "targets" / "adapters").glob(f"{digest}.*")
    return target


# --- the happy path ---------------------------------------------------------------------------------------------

def test_fresh_device_installs_then_publish_moves_it(fleet):
    first = json.loads(fleet["steps"]["first"].stdout)
    assert first["action"] == "installed" and first["version"] == "1.0.0" and first["previous"] is None
    assert first["health"]["ok"] and first["health"]["images"] == 4
    second = json.loads(fleet["steps"]["second"].stdout)
    assert (second["action"], second["version"], second["previous"]) == ("installed", "1.1.0", "1.0.0")
    assert second["health"]["ok"] and second["health"]["top1_agreement"] == 1.0
    assert "up to date" in fleet["steps"]["again"].stdout
    info = installed(fleet["device"])
    assert (info["version"], info["previous"], info["task"]) == ("1.1.0", "1.0.0", TASK)
    # the adapter went through the delegated role whose paths cover it
    assert fleet["add1"][0]["role"] == "crack" and fleet["add1"][0]["target"] == target_path(TASK, info["backbone_sha256"])
    # the backbone recorded on the device is the compiled artifact, identified by backbone_sha256
    recorded = json.loads((fleet["device"] / "backbone.json").read_text())
    assert recorded["kind"] == "artifact" and recorded["backbone_sha256"] == info["backbone_sha256"]


def test_init_says_which_keys_are_offline_and_status(fleet, tmp_path):
    init = fleet["init"]
    assert len(init["root_keys"]) == 3 and init["root_threshold"] == 2 and init["keys_created"]
    assert all("root-" in p for p in init["root_keys"]) and set(init["online_keys"]) == {"targets", "snapshot",
                                                                                           "timestamp"}
    assert stat.S_IMODE(Path(init["root_keys"][0]).stat().st_mode) == 0o600
    r = ok(fleet["cli"]("repo", "init", tmp_path / "r2", "--keys", tmp_path / "k2", "--root-keys", 1,
                        "--root-threshold", 1))
    assert "OFFLINE root keys" in r.stdout and str(tmp_path / "k2" / "root-1" / "private_key.pem") in r.stdout
    s = json.loads(ok(fleet["cli"]("repo", "status", fleet["repo"], "--json")).stdout)
    roles = {r["role"]: r for r in s["roles"]}
    assert set(roles) == {"root", "targets", "snapshot", "timestamp", "crack", "paint"}
    assert roles["root"]["threshold"] == 2 and len(roles["root"]["keys"]) == 3
    assert roles["crack"]["paths"] == ["adapters/crack-*"] and roles["crack"]["targets"] == 1
    assert s["consistent_snapshot"] and not any(r["expired"] for r in s["roles"])
    assert [a["version"] for a in s["adapters"]] == ["1.1.0"]
    assert "crack" in ok(fleet["cli"]("repo", "status", fleet["repo"])).stdout


def test_repository_refusals(fleet, tmp_path):
    cli = fleet["cli"]
    one_error_line(cli("repo", "init", fleet["repo"], "--keys", tmp_path / "k"), "not empty")
    one_error_line(cli("repo", "init", tmp_path / "r", "--keys", tmp_path / "k", "--root-threshold", 4),
                   "--root-threshold")
    one_error_line(cli("repo", "init", tmp_path / "r", "--keys", tmp_path / "k", "--expires", "root=1y"), "unit")
    assert not (tmp_path / "r").exists() and not (tmp_path / "k").exists()
    assert parse_duration("30s") == 30 and parse_duration("10m") == 600 and parse_duration("1d") == 86400
    with pytest.raises(EdgekitError, match="unit"):
        parse_duration("0s")


# --- package binding and the one backbone_sha256 ----------------------------------------------------------------

def test_any_changed_added_or_removed_byte_is_refused(fleet, tmp_path):
    pkg = fleet["pkgs"]["1.0.0"]
    data = pkg.read_bytes()
    key = {fleet["pkg_pub"]}
    verify_package(pkg, key)
    n = len(data)
    positions = sorted(set(range(0, n, max(1, n // 150))) | set(range(max(0, n - 300), n)) | set(range(64)))
    variants = [data + b"\0", b"\0" + data, data[:-1], data[1:], data[:n // 2] + data[n // 2 + 1:],
                data[:n // 2] + b"x" + data[n // 2:]]
    variants += [data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:] for i in positions]
    bad = tmp_path / "bad.zip"
    for v in variants:
        bad.write_bytes(v)
        with pytest.raises(EdgekitError):
            verify_package(bad, key)


def test_compiled_backbone_device_flow_without_tuf(fleet, tmp_path, cli):
    """The documented device flow with a compiled artifact: edgekit install --backbone ART accepts the adapter."""
    art = fleet["art"]
    ident = resolve_backbone(art)
    manifest = json.loads((art / "manifest.json").read_text())
    assert ident.sha256 == manifest["model"]["backbone_sha256"] == load_backbone(str(fleet["ckpt"])).weights_sha256
    assert ident.sha256 != hashlib.sha256((art / "model.onnx").read_bytes()).hexdigest()
    root = tmp_path / "dev"
    r = ok(cli("install", fleet["pkgs"]["1.0.0"], "--root", root, "--pubkey", fleet["pkg_pub"], "--backbone", art,
               "--json"))
    assert json.loads(r.stdout)["backbone_checked"]
    # the documented backbone.sha256 line for an artifact works too
    (root / "backbone.sha256").write_text(manifest["model"]["backbone_sha256"] + "\n")
    ok(cli("install", fleet["pkgs"]["1.1.0"], "--root", root, "--pubkey", fleet["pkg_pub"]))
    h = check_health(installed(root)["path"], resolve_and_load(art))
    assert h["ok"] and h["max_abs_diff"] < 1e-3
    # another backbone: refused before anything changes
    torch.manual_seed(1)
    other = Checkpoint.from_model(GMBINet(GMBINetConfig(widths=(8, 8, 8, 16, 16), depths=(1, 1, 1, 1), scales=4)),
                                  preprocess=PreprocessSpec(input_size=(32, 32))).save(tmp_path / "other.pt")
    before = tree(root, skip=())
    one_error_line(cli("install", fleet["pkgs"]["1.2.0"], "--root", root, "--pubkey", fleet["pkg_pub"],
                       "--backbone", other), "backbone mismatch")
    assert tree(root, skip=()) == before


def resolve_and_load(ref):
    from edgekit.fleet.backbone import load_device_backbone

    return load_device_backbone(resolve_backbone(ref))


# --- attacks: each refused, install root unchanged, 1.1.0 still serving ------------------------------------------

def test_changed_target_bytes(env):
    target = publish_12(env)
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # flip the last byte (writing a 0 could change nothing)
    refused(env, "did not verify")


def test_targets_metadata_edited_without_resigning(env):
    publish_12(env)
    meta = env["repo"] / "metadata"
    latest = max(meta.glob("*.crack.json"), key=lambda p: int(p.name.split(".")[0]))
    doc = json.loads(latest.read_text())
    for tf in doc["signed"]["targets"].values():
        tf["custom"]["edgekit"]["version"] = "9.0.0"
    latest.write_text(json.dumps(doc))
    refused(env, "metadata did not verify")


def test_replayed_old_timestamp_and_snapshot(env):
    meta = env["repo"] / "metadata"
    current = (meta / "timestamp.json").read_bytes()
    (meta / "timestamp.json").write_bytes(env["ts_v1"])  # an older, validly signed timestamp
    refused(env, "metadata did not verify")
    (meta / "timestamp.json").write_bytes(current)
    # a new timestamp whose snapshot file is replaced by an older, validly signed snapshot
    publish_12(env)
    newest = max(meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
    newest.write_bytes(next(iter(env["snapshot_files_v1"].values())))
    refused(env, "metadata did not verify")


def test_expired_timestamp(env):
    publish_12(env, "--timestamp-expires", "1s")
    time.sleep(2.1)
    line = refused(env, "metadata did not verify")
    assert "xpired" in line


def test_delegated_role_cannot_publish_outside_its_paths(env):
    from tuf.api.metadata import Metadata, TargetFile
    from securesystemslib.signer import CryptoSigner

    cli = env["cli"]
    # the build side refuses it ...
    one_error_line(cli("repo", "add", env["repo"], env["pkgs"]["1.2.0"], "--role", "paint"), "outside its paths")
    # ... and a holder of the paint key who signs a crack adapter into paint's metadata anyway is ignored by devices
    meta = env["repo"] / "metadata"
    latest = max(meta.glob("*.paint.json"), key=lambda p: int(p.name.split(".")[0]))
    md = Metadata.from_bytes(latest.read_bytes())
    pkg = env["pkgs"]["1.2.0"]
    path = target_path(TASK, installed(env["device"])["backbone_sha256"])
    crack = Metadata.from_bytes(max(meta.glob("*.crack.json"), key=lambda p: int(p.name.split(".")[0])).read_bytes())
    tf = TargetFile.from_data(path, pkg.read_bytes(), ["sha256"])
    tf.unrecognized_fields["custom"] = json.loads(json.dumps(crack.signed.targets[path].custom))
    tf.unrecognized_fields["custom"]["edgekit"]["version"] = "1.2.0"
    md.signed.targets[path] = tf
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner(load_private_key(env["w"] / "paint-key" / "private_key.pem")))
    (meta / f"{md.signed.version}.paint.json").write_bytes(md.to_bytes())
    shutil.copy(pkg, env["repo"] / "targets" / "adapters" / f"{tf.hashes['sha256']}.{path.split('/')[1]}")
    ok(cli("repo", "publish", env["repo"]))  # the honest snapshot lists paint's new version
    before = tree(env["device"])
    r = ok(update(env))
    assert "up to date" in r.stdout
    assert tree(env["device"]) == before and installed(env["device"])["version"] == "1.1.0"


def test_revoked_key_is_refused(env):
    from tuf.api.metadata import Metadata
    from securesystemslib.signer import CryptoSigner

    cli, keys = env["cli"], env["keys"]
    new_ts = generate_keypair(env["w"] / f"ts-{time.monotonic_ns()}")[0].parent
    ok(cli("repo", "rotate", env["repo"], "--role", "timestamp", "--add-key", new_ts, "--remove-key",
           keys / "timestamp"))
    ok(cli("repo", "publish", env["repo"]))
    ok(update(env))  # the device learns root v2, where the old timestamp key is revoked
    ts_path = env["repo"] / "metadata" / "timestamp.json"
    md = Metadata.from_bytes(ts_path.read_bytes())
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner(load_private_key(keys / "timestamp" / "private_key.pem")))  # the stolen, revoked key
    ts_path.write_bytes(md.to_bytes())
    refused(env, "metadata did not verify")


def test_root_update_below_threshold_is_refused(env):
    from tuf.api.metadata import Metadata
    from securesystemslib.signer import CryptoSigner

    meta = env["repo"] / "metadata"
    root = Metadata.from_bytes((meta / "1.root.json").read_bytes())
    thief = env["w"] / f"thief-{time.monotonic_ns()}"
    generate_keypair(thief)
    from edgekit.fleet.repository import public_key

    root.signed.add_key(public_key(thief), "timestamp")
    root.signed.version = 2
    root.signatures.clear()
    root.sign(CryptoSigner(load_private_key(env["keys"] / "root-1" / "private_key.pem")))  # 1 of 2 needed
    (meta / "2.root.json").write_bytes(root.to_bytes())
    refused(env, "metadata did not verify")


def test_connection_closed_mid_download(env):
    publish_12(env)
    env["server"].truncate = True
    refused(env, "download of")


def test_server_that_never_answers_and_no_server(env):
    with silent_server() as url:
        t0 = time.monotonic()
        line = refused(env, "could not be fetched", url=url, timeout=1)
        waited = time.monotonic() - t0
    assert "Slow" in line or "imeout" in line
    print(f"silent server: refused after {waited:.1f} s with --timeout 1")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused(env, "could not be fetched", url=f"http://127.0.0.1:{port}")


def test_concurrent_run_is_refused(env):
    import fcntl

    with open(env["device"] / "tuf" / "update.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        before = tree(env["device"])
        one_error_line(update(env), "another edgekit update is running")
        assert tree(env["device"]) == before


def test_failing_health_check_never_serves_and_blocks(env):
    """The failing version is only ever a trial: 1.1.0 keeps serving throughout, and 1.2.0 is blocked."""
    ok(env["cli"]("repo", "add", env["repo"], env["pkgs"]["bad-health"]))
    ok(env["cli"]("repo", "publish", env["repo"]))
    line = one_error_line(update(env), "health check of 1.2.0 failed")
    assert "1.1.0 is still in service" in line and "1.2.0 is blocked" in line
    info = installed(env["device"])
    assert (info["version"], info["previous"], info["trial"]) == ("1.1.0", "1.0.0", None)
    assert "health check" in info["blocked"]["1.2.0"]
    last = info["history"][-1]
    assert last["action"] == "failed" and "health check" in last["reason"]


# --- key rotation ---------------------------------------------------------------------------------------------

def test_root_rotation_then_update_on_a_device_that_trusted_only_the_old_root(env):
    cli, keys, w = env["cli"], env["keys"], env["w"]
    # root-1 is revoked (say it was stolen): the new root is signed by 2 of the old keys and 2 of the new ones
    new_root = generate_keypair(w / f"root-new-{time.monotonic_ns()}")[0].parent
    offline = w / f"offline-{time.monotonic_ns()}"
    shutil.copytree(keys / "root-2", offline)  # an offline key brought back on a stick
    r = cli("repo", "rotate", env["repo"], "--role", "root", "--add-key", new_root, "--remove-key", keys / "root-1",
            "--sign-with", offline)
    ok(r)
    new_targets = generate_keypair(w / f"targets-new-{time.monotonic_ns()}")[0].parent
    ok(cli("repo", "rotate", env["repo"], "--role", "targets", "--add-key", new_targets, "--remove-key",
           keys / "targets"))
    publish_12(env)
    # a device that never saw anything but the first root
    fresh = env["device"].parent / "fresh-device"
    r = ok(env["cli"]("update", "--repo", env["url"], "--root", fresh, "--trust", env["trust"], "--backbone",
                      env["art"], "--task", TASK, "--json"))
    assert json.loads(r.stdout)["version"] == "1.2.0"
    assert (fresh / "tuf" / "metadata" / "root_history" / "3.root.json").is_file()
    r = ok(update(env, "--json"))
    assert (json.loads(r.stdout)["version"], installed(env["device"])["previous"]) == ("1.2.0", "1.1.0")


def test_root_change_below_threshold_is_refused_on_the_build_side(env, tmp_path):
    cli, keys = env["cli"], env["keys"]
    before = sorted(p.name for p in (env["repo"] / "metadata").iterdir())
    config = (env["repo"] / "edgekit-repository.json").read_bytes()
    for k in ("root-2", "root-3"):  # only root-1 left at hand: 1 of the 2 needed
        (keys / k / "private_key.pem").rename(tmp_path / f"{k}.pem")
    try:
        one_error_line(cli("repo", "rotate", env["repo"], "--role", "root", "--remove-key", keys / "root-1" /
                           "public_key.pem", "--add-key", generate_keypair(tmp_path / "nk")[0].parent), "--sign-with")
    finally:
        for k in ("root-2", "root-3"):
            (tmp_path / f"{k}.pem").rename(keys / k / "private_key.pem")
    assert sorted(p.name for p in (env["repo"] / "metadata").iterdir()) == before
    assert (env["repo"] / "edgekit-repository.json").read_bytes() == config


def test_add_refuses_old_versions_and_untrusted_packages(env, tmp_path):
    cli = env["cli"]
    before = sorted(p.name for p in (env["repo"] / "metadata").iterdir())
    one_error_line(cli("repo", "add", env["repo"], env["pkgs"]["1.0.0"]), "not newer than 1.1.0")
    foreign_key = generate_keypair(tmp_path / "foreign")[0]
    foreign = tmp_path / "foreign.zip"
    build_package(env["adapters"][0], foreign_key, "2.0.0", foreign)
    one_error_line(cli("repo", "add", env["repo"], foreign), "unknown key")
    one_error_line(cli("repo", "add", env["repo"], env["pkgs"]["1.2.0"], "--role", "nope"), "no such delegated role")
    assert sorted(p.name for p in (env["repo"] / "metadata").iterdir()) == before
    # a fresh device must say which task it runs
    one_error_line(env["cli"]("update", "--repo", env["url"], "--root", tmp_path / "d", "--trust", env["trust"],
                              "--backbone", env["art"]), "give --task")
    assert not (tmp_path / "d").exists()
