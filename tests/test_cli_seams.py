"""Issue 19 item 4: real failures a new user met came out as a usage block, "internal error", or a
wrong count. Each test here failed before its fix."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line


# -- Click's own usage errors: one line, exit 2 ------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (("predict", "--threads", "0", "m.pt", "x.png"), "'--threads': 0 is not in the range"),
    (("eval", "--batch", "0"), "'--batch': 0 is not in the range"),
    (("info", "--bogus"), "No such option '--bogus'"),
    (("nosuch",), "No such command 'nosuch'"),
    (("--bogus",), "No such option '--bogus'"),
    (("predict",), "Missing argument"),
    (("repo", "init", "--bogus"), "No such option '--bogus'"),
])
def test_click_usage_errors_are_one_error_line_exit_2(cli, args, says):
    result = cli(*args)
    line = one_error_line(result)
    assert result.exit_code == 2
    assert says in line and "--help" in line, line


def test_bare_command_still_shows_its_help(cli):
    result = cli()
    assert result.output.startswith("Usage: ") and "Commands:" in result.output


# -- --data: class folders, masks beside images ---------------------------------------------------

def test_class_folders_given_to_eval_say_masks_are_needed(cli, neu):
    line = one_error_line(cli("eval", "--data", neu, "--limit", "2"))
    assert "class folders" in line and "1800 images" in line and "masks" in line
    assert "edgekit adapt" in line and "no images" not in line


def _side_by_side(folder, n=3, mask_name="{stem}.png"):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((48, 64)) * 255).astype("uint8")).save(folder / f"exp1_num_{i}.jpg")
        m = np.zeros((48, 64), "uint8")
        m[8:20, 10:40] = 255
        Image.fromarray(m).save(folder / mask_name.format(stem=f"exp1_num_{i}"))
    return folder


@pytest.mark.parametrize("mask_name", ["{stem}.png", "{stem}_mask.png"])
def test_masks_beside_images_are_masks_not_images(tmp_path, mask_name):
    from edgekit.data.datasets import open_segmentation

    ds = open_segmentation(str(_side_by_side(tmp_path / "Imgs", mask_name=mask_name)))
    assert len(ds.samples) == 3, [s.name for s in ds.samples]
    assert all(s.image_path.suffix == ".jpg" and s.mask_path is not None for s in ds.samples)


def test_eval_on_an_imgs_folder_with_masks_beside_images(cli, tmp_path):
    import json

    result = cli("eval", "--data", _side_by_side(tmp_path / "Imgs"), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["overall"]["images"] == 3


# -- messages clipped at a word, not mid-word -------------------------------------------------

def test_long_messages_are_clipped_at_a_word_boundary():
    from edgekit.errors import first_line

    text = "upstream connect error or disconnect/reset before headers. " * 4 + "server down"
    clipped = first_line(RuntimeError(text + "\nsecond line"), 120)
    assert len(clipped) <= 120 and clipped.endswith("...")
    assert text.startswith(clipped[:-3]) and text[len(clipped) - 3] == " "  # cut where a word ends
    assert first_line(RuntimeError("server down\ntraceback")) == "server down"


# -- an --out that cannot be written: refused up front, naming what the user gave ------------------

def _unwritable_outs(tmp_path):
    (tmp_path / "afile").write_text("x")
    outs = {"afile/art": "is not a folder"}  # a parent that is a file: refused for root too
    if Path("/proc").is_dir():
        outs["/proc/art"] = "/proc is not writable"  # no one can create a folder in /proc
    return outs


@pytest.mark.parametrize("args", [("compile", "--target", "onnx"), ("quantize", "--target", "openvino",
                                                                    "--calib", "synthetic")])
def test_unwritable_out_is_refused_before_the_work(cli, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    for out, says in _unwritable_outs(tmp_path).items():
        started = time.monotonic()
        line = one_error_line(cli(*args, "--out", out))
        assert line.startswith(f"error: cannot write {out}: ") and says in line, line
        assert "internal error" not in line and time.monotonic() - started < 5  # before any model work


def test_read_only_folder_is_refused_naming_it(cli, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a mode-0555 folder; the /proc and file-as-parent cases cover root")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_error_line(cli("compile", "--target", "onnx", "--out", ro / "art"))
    finally:
        ro.chmod(0o755)
    assert f"cannot write {ro / 'art'}" in line and "not writable" in line and not list(ro.iterdir())


# -- keygen prints both ids a key goes by ---------------------------------------------------------

def test_keygen_prints_the_ids_repo_status_shows(cli, tmp_path, monkeypatch):
    pytest.importorskip("tuf")
    monkeypatch.chdir(tmp_path)
    pkg, role = cli("keygen", "--out", "pkgkey"), cli("keygen", "--out", "rolekey")
    assert pkg.exit_code == 0 and role.exit_code == 0
    ids = {}
    for name, result in (("pkg", pkg), ("role", role)):
        lines = {l.split(" (")[0].rsplit(" ", 1)[0]: l.split(" (")[0].rsplit(" ", 1)[1]
                 for l in result.stdout.splitlines() if "key id" in l}
        ids[name] = lines
        assert set(lines) == {"key id", "TUF key id"} and lines["key id"] != lines["TUF key id"]
    assert cli("repo", "init", "repo", "--keys", "repokeys", "--package-key", "pkgkey/public_key.pem",
               "--tasks", "crack-*").exit_code == 0
    assert cli("repo", "delegate", "repo", "crack", "--paths", "adapters/crack-*", "--key", "rolekey").exit_code == 0
    status = json.loads(cli("repo", "status", "repo", "--json").stdout)
    crack = next(r for r in status["roles"] if r["role"] == "crack")
    assert [k["keyid"] for k in crack["keys"]] == [ids["role"]["TUF key id"]]
    assert ids["pkg"]["key id"] in [k["key_id"] for k in status["package_keys"]]


# -- .ci/run: says what it installs, and why tests were skipped (issue 19 item 3) ----------------

def test_ci_runs_the_readmes_test_command_with_skip_reasons_and_visible_installs():
    from conftest import ROOT

    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    test_line = [l for l in ci if l.startswith("python -m pytest")]
    assert test_line == ["python -m pytest -q -rs tests"]
    assert f"```bash\n{test_line[0]}\n```" in readme  # the README's test command, exactly
    install = [l for l in ci if "pip install" in l and "-e '." in l]
    assert len(install) == 1 and " -q" not in install[0]  # pip lists what it installs
    assert sum(l.startswith("step ") for l in ci) >= 4  # each step announced


def test_a_servers_long_error_is_clipped_at_a_word(cli):
    """A real HTTP server on 127.0.0.1 that is up but answers the model's metadata with a long error."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pytest.importorskip("tritonclient.http")
    message = "the model repository is unavailable because the " + "backing storage server is down " * 8

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path in ("/v2/health/live", "/v2/models/m/ready")
            body = b"" if ok else json.dumps({"error": message}).encode()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        line = one_error_line(cli("bench", "--server", f"127.0.0.1:{server.server_address[1]}", "--model", "m"))
    finally:
        server.shutdown()
        server.server_close()
    assert "model 'm' on 127.0.0.1:" in line and line.endswith("...")
    last_word = line[:-3].split()[-1]
    assert last_word in message.split(), line  # the message ends on a whole word


# -- the fleet section's backbone step: a registry's backbone compiles (its spec is per channel) ------

def test_backbone_preprocess_with_per_channel_mean_is_accepted_and_applied():
    """`edgekit compile REGISTRY` failed with "preprocess mean must be a finite number, not [0.485, ...]":
    the bounded spec refused the per-channel ImageNet mean every MLFF backbone carries."""
    from edgekit.data.preprocess import PreprocessSpec, preprocess
    from edgekit.errors import EdgekitError
    from edgekit.mlff.runner import backbone_preprocess_dict

    d = backbone_preprocess_dict({"shape": [3, 8, 8], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    spec = PreprocessSpec.from_dict(d)
    img = np.full((4, 4), 255, np.uint8)
    x = preprocess([img], spec)
    assert x.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(x[0, :, 0, 0], (1.0 - np.array(d["mean"])) / np.array(d["std"]), rtol=1e-5)
    scalar = preprocess([img], PreprocessSpec(mean=0.5, std=0.25, input_size=(8, 8)))
    np.testing.assert_allclose(scalar, 2.0)  # the one-number path unchanged
    for bad in ({"mean": [0.1, 0.2]}, {"mean": [0.1, float("nan"), 0.2]}, {"std": [0.2, 0.0, 0.2]},
                {"mean": [True, 0.1, 0.1]}, {"std": "x"}):
        with pytest.raises(EdgekitError, match="preprocess (mean|std)"):
            PreprocessSpec.from_dict({**d, **bad})


def test_fewer_images_is_spelled_limit_on_every_command():
    """A new user's `prune --limit 8` was refused: prune and train spelled it --limit-images (still an alias)."""
    import click

    from edgekit.cli import main

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(None):
                yield from walk(cmd.get_command(None, name), path + [name])
        else:
            yield path, cmd

    spelled = {}
    for path, cmd in walk(main, []):
        for p in cmd.params:
            if isinstance(p, click.Option) and "limit" in (p.name or "") and "--limit" in " ".join(p.opts):
                spelled[" ".join(path)] = p.opts
    assert {"prune", "train", "eval", "adapt"} <= set(spelled), spelled
    assert all("--limit" in opts for opts in spelled.values()), spelled
