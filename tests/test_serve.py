"""export-repo (Triton / OVMS repositories), a real tritonserver serving an artifact, bench --server."""
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit import runtime
from edgekit.artifact import read_manifest
from edgekit.pipeline.compile import compile_model
from edgekit.utils import sha256_file

from conftest import SD900, one_error_line

pytest.importorskip("openvino", reason="openvino not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'edgekit[cpu]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (pip install 'edgekit[serve]')")

from edgekit.serve.repository import parse_triton_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_art")
    out = {}
    for target in ("onnx", "ort", "openvino"):
        out[target] = root / target
        compile_model(str(tiny_ckpt), target, "fp32", str(out[target]), parity_data="synthetic:2", log=lambda *_: None)
    return out


def _served_files_match(vdir: Path):
    """edgekit.json beside the model: the manifest travels, and each copied file is the artifact's."""
    served = json.loads((vdir / "edgekit.json").read_text())
    man = served["manifest"]
    assert served["preprocess"] == man["preprocess"] and "parity" in man and man["files"]
    for dst, rec in served["files"].items():
        assert sha256_file(vdir / dst) == rec["sha256"]
        if rec["from"] in man["files"]:
            assert rec["sha256"] == man["files"][rec["from"]]
    return served


def test_triton_configs_parse_into_model_config(cli, tiny_artifacts, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    routes = {"onnx": "onnxruntime", "ort": "onnxruntime", "openvino": "openvino"}
    for backend in ("auto", "python"):
        repo = tmp_path / f"repo_{backend}"
        r = cli("export-repo", *tiny_artifacts.values(), "--format", "triton", "--out", repo, "--dynamic-batching",
                "--max-batch", 16, "--instances", 3, "--accelerator", "openvino", "--triton-backend", backend, "--json")
        assert r.exit_code == 0, r.stderr
        summary = json.loads(r.stdout)
        assert [m["name"] for m in summary["models"]] == ["onnx", "ort", "openvino"]
        for target, art in tiny_artifacts.items():
            man = read_manifest(art)
            cfg = parse_triton_config(repo / target / "config.pbtxt")
            assert isinstance(cfg, mc.ModelConfig) and cfg.name == target
            want = routes[target] if backend == "auto" else "python"
            assert cfg.backend == want and not cfg.platform
            assert cfg.max_batch_size == 16
            assert [i.name for i in cfg.input] == [man["input"]["name"]]
            assert list(cfg.input[0].dims) == [3, *man["preprocess"]["input_size"]]
            assert list(cfg.output[0].dims) == [1, *man["preprocess"]["input_size"]]
            assert cfg.input[0].data_type == mc.TYPE_FP32
            assert cfg.instance_group[0].count == 3 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
            q = cfg.dynamic_batching.default_queue_policy
            assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
            assert q.timeout_action == mc.ModelQueuePolicy.REJECT and q.max_queue_size > 0
            assert cfg.model_warmup[0].inputs[man["input"]["name"]].zero_data  # random FP32 bytes hold NaN/inf
            assert json.loads(cfg.parameters["edgekit_preprocess"].string_value) == man["preprocess"]
            accel = [a.name for a in cfg.optimization.execution_accelerators.cpu_execution_accelerator]
            assert accel == (["openvino"] if want == "onnxruntime" else [])
            vdir = repo / target / "1"
            served = _served_files_match(vdir)
            assert served["route"] == want
            if want == "python":  # the whole artifact, still verifiable, beside the generated model.py
                assert read_manifest(vdir / "artifact")["files"] == man["files"]
                assert (vdir / "model.py").read_text().startswith('"""Triton python-backend model')
            elif want == "openvino":
                assert (vdir / "model.xml").is_file() and (vdir / "model.bin").is_file()
                assert cfg.parameters["INFERENCE_PRECISION_HINT"].string_value == "f32"
            else:
                assert (vdir / "model.onnx").is_file()


def test_ovms_config_shape(cli, tiny_artifacts, tmp_path):
    repo = tmp_path / "ovms"
    r = cli("export-repo", tiny_artifacts["openvino"], tiny_artifacts["onnx"], "--format", "ovms", "--out", repo,
            "--max-batch", 8, "--instances", 2)
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((repo / "config.json").read_text())
    assert set(cfg) == {"model_config_list"}
    entries = {c["config"]["name"]: c["config"] for c in cfg["model_config_list"]}
    assert set(entries) == {"openvino", "onnx"}
    for name, c in entries.items():
        man = read_manifest(tiny_artifacts[name])
        h, w = man["preprocess"]["input_size"]
        assert c["base_path"] == f"models/{name}" and (repo / c["base_path"] / "1").is_dir()
        assert c["shape"] == {man["input"]["name"]: f"(1:8,3,{h},{w})"}
        assert c["nireq"] >= 2 and c["plugin_config"]["NUM_STREAMS"] == "2"
        assert c["plugin_config"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert c["model_version_policy"] == {"latest": {"num_versions": 1}}
        _served_files_match(repo / c["base_path"] / "1")
    assert (repo / "models/openvino/1/model.xml").is_file() and (repo / "models/onnx/1/model.onnx").is_file()
    # a new numbered version beside the old one: OVMS's latest-version policy picks it up by itself
    r = cli("export-repo", tiny_artifacts["openvino"], "--format", "ovms", "--out", repo, "--add")
    assert r.exit_code == 0, r.stderr
    assert (repo / "models/openvino/2/model.xml").is_file() and (repo / "models/openvino/1/model.xml").is_file()
    names = [c["config"]["name"] for c in json.loads((repo / "config.json").read_text())["model_config_list"]]
    assert sorted(names) == ["onnx", "openvino"]


def test_ort_artifact_refused_by_ovms_or_served(cli, tiny_artifacts, tmp_path):
    """An ort artifact with ONNX Runtime's own fused operators cannot go to OVMS; the message names Triton."""
    import onnx

    m = onnx.load(str(tiny_artifacts["ort"] / "model.onnx"))
    foreign = {n.domain for n in m.graph.node} - {"", "ai.onnx"}
    r = cli("export-repo", tiny_artifacts["ort"], "--format", "ovms", "--out", tmp_path / "o")
    if foreign:
        line = one_error_line(r)
        assert "cannot read" in line and "--format triton" in line
        assert not (tmp_path / "o").exists()
    else:  # nothing ORT-specific in the graph: OpenVINO reads it
        assert r.exit_code == 0, r.stderr


def test_export_repo_refusals(cli, tiny_artifacts, tmp_path):
    ov = tiny_artifacts["openvino"]
    repo = tmp_path / "repo"
    assert cli("export-repo", ov, "--format", "triton", "--out", repo).exit_code == 0
    before = (repo / "openvino" / "config.pbtxt").read_text()
    # existing repository without --force: refused, untouched
    assert "already exists" in one_error_line(cli("export-repo", ov, "--format", "triton", "--out", repo))
    assert (repo / "openvino" / "config.pbtxt").read_text() == before
    # --add with the same name and version: a clash
    line = one_error_line(cli("export-repo", ov, "--format", "triton", "--out", repo, "--add", "--version", 1))
    assert "name clash" in line
    # --add: the next version of the same model
    r = cli("export-repo", ov, "--format", "triton", "--out", repo, "--add", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["models"][0]["version"] == 2
    assert (repo / "openvino" / "2" / "model.xml").is_file()
    # another backend under the same name: a clash (one config.pbtxt serves every version)
    line = one_error_line(cli("export-repo", tiny_artifacts["onnx"], "--format", "triton", "--out", repo, "--add",
                              "--name", "openvino"))
    assert "name clash" in line
    # two artifacts that would get one name
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(ov, tmp_path / "a" / "m")
    shutil.copytree(ov, tmp_path / "b" / "m")
    line = one_error_line(cli("export-repo", tmp_path / "a" / "m", tmp_path / "b" / "m", "--format", "triton",
                              "--out", tmp_path / "r2"))
    assert "name clash" in line and not (tmp_path / "r2").exists()
    assert "one artifact" in one_error_line(cli("export-repo", ov, tiny_artifacts["onnx"], "--format", "triton",
                                                "--name", "x", "--out", tmp_path / "r3"))
    assert "not an artifact" in one_error_line(cli("export-repo", tmp_path / "a", "--format", "ovms",
                                                   "--out", tmp_path / "r4"))
    # a repository with Triton's openvino backend: the bundled (python-only) server says so before starting
    from edgekit.errors import EdgekitError
    from edgekit.serve.triton import check_repository

    with pytest.raises(EdgekitError, match="python backend only"):
        check_repository(repo)


def test_bench_server_not_up(cli):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url in (f"127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        line = one_error_line(cli("bench", "--server", url, "--model", "m"))
        assert "no inference server answering" in line


def test_a_repository_served_once_can_be_served_again(cli, tiny_artifacts, tmp_path):
    """The stub writes model.py's bytecode into __pycache__ as it loads it (it ignores PYTHONDONTWRITEBYTECODE):
    the check before the next `edgekit serve` refused the repository. That cache is removed before the check,
    and anything else that is not exported is still refused."""
    from edgekit.errors import EdgekitError
    from edgekit.serve.triton import check_repository

    repo = tmp_path / "repo"
    assert cli("export-repo", tiny_artifacts["openvino"], "--format", "triton", "--out", repo, "--name", "m",
               "--triton-backend", "python").exit_code == 0
    vdir = repo / "m" / "1"
    (vdir / "__pycache__").mkdir()
    (vdir / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\xa7\r\r\n" + bytes(12))  # as the stub leaves it
    assert check_repository(repo) == ["m"] and not (vdir / "__pycache__").exists()
    (vdir / "numpy.py").write_text("raise SystemExit\n")
    with pytest.raises(EdgekitError, match="numpy.py is not part of the exported model"):
        check_repository(repo)


def test_the_stub_gets_the_folders_pth_files_add(tmp_path):
    """Triton's python-backend stub does no site processing of edgekit's environment, so ``edgekit serve`` passes
    it the folders: a package reached through a .pth file (a venv sharing another environment's packages, an
    editable install) was left out, and the served model said "needs the optional package 'openvino'"."""
    import os
    import subprocess
    import venv

    env_dir, behind = tmp_path / "env", tmp_path / "behind-a-pth"
    behind.mkdir()
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site_dir = Path(subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                                   text=True, check=True).stdout.strip())
    root = Path(__file__).resolve().parents[1]
    (site_dir / "edgekit.pth").write_text(f"{root}\n")
    (site_dir / "zz_shared.pth").write_text(f"# shared packages\nimport os\n{behind}\n{tmp_path / 'missing'}\n")
    out = subprocess.run([py, "-c", "import json; from edgekit.serve.triton import stub_python_path; "
                                    "print(json.dumps(stub_python_path()))"],
                         capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    paths = json.loads(out.stdout)
    assert paths[0] == str(root) and str(site_dir) in paths and str(behind.resolve()) in paths
    assert str(tmp_path / "missing") not in paths and not any(p.startswith("import") for p in paths)


# --- a real tritonserver ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton_dist():
    """The tritonserver of the nvidia-pytriton wheel, pip-installed (no dependencies) into edgekit's cache."""
    from edgekit.errors import EdgekitError
    from edgekit.serve.triton import install_triton

    t0 = time.monotonic()
    try:
        dist = install_triton(timeout=600)
    except EdgekitError as e:
        pytest.skip(f"the bundled tritonserver cannot be installed here: {e}")
    print(f"tritonserver ready to use in {time.monotonic() - t0:.1f} s "
          f"(install record: {(dist.home / 'edgekit-triton.json').read_text().strip()})")
    return dist


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _images(n):
    from edgekit.data.datasets import limit_samples, open_segmentation

    data = str(SD900) if SD900.exists() else f"synthetic:{n}"
    return data, [s.load()[0] for s in limit_samples(open_segmentation(data, "test").samples, n)]


def test_tritonserver_serves_artifact_over_http_and_grpc(cli, triton_dist, tmp_path_factory):
    from tritonclient.http import InferenceServerClient

    from edgekit.data.preprocess import preprocess
    from edgekit.models.default import resolve_model
    from edgekit.serve.client import ServerRunner
    from edgekit.serve.triton import TritonServer

    root = tmp_path_factory.mktemp("served")
    art = root / "ov_fp32"
    compile_model(resolve_model(None), "openvino", "fp32", str(art), parity_data="synthetic:2", log=lambda *_: None)
    repo = root / "repo"
    r = cli("export-repo", art, "--format", "triton", "--out", repo, "--name", "gmbinet", "--triton-backend", "python",
            "--dynamic-batching", "--max-batch", 8, "--instances", 1)
    assert r.exit_code == 0, r.stderr
    http_port, grpc_port = _free_ports(2)
    server = TritonServer(repo, http=f"127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}", dist=triton_dist,
                          log_file=root / "tritonserver.log", threads=1)
    data, images = _images(8)
    local = runtime.load(art)
    x = preprocess(images, local.spec)
    want = local.infer(x)
    try:
        server.start(timeout=300)
        for url in (f"127.0.0.1:{http_port}", f"grpc://127.0.0.1:{grpc_port}"):
            served = ServerRunner(url, "gmbinet")
            assert served.spec == local.spec and served.max_batch == 8
            got = np.concatenate([served.infer(x[i:i + 1]) for i in range(len(x))] + [served.infer(x[:3])])
            ref = np.concatenate([want, want[:3]])
            assert got.shape == ref.shape
            a, b = got > 0.5, ref > 0.5
            for i in range(len(a)):
                union = (a[i] | b[i]).sum()
                assert union == 0 or (a[i] & b[i]).sum() / union == 1.0, f"{url}: image {i} masks differ ({data})"
            assert float(np.abs(got - ref).max()) < 1e-4
        # dynamic batching: 16 requests, 8 in flight, fewer model executions than requests
        served = ServerRunner(f"grpc://127.0.0.1:{grpc_port}", "gmbinet")
        queue = served.throughput_queue(1, 8)
        for i in range(16):
            queue.start_async({0: x[i % len(x)][None]})
        queue.wait_all()
        stats = InferenceServerClient(f"127.0.0.1:{http_port}").get_inference_statistics("gmbinet")
        st = stats["model_stats"][0]
        assert st["inference_count"] >= 16 + 2 * (len(x) + 3) and st["execution_count"] < st["inference_count"]
        # bench --server: the served row beside the local one, same accuracy
        out = root / "bench.json"
        r = cli("bench", art, "--server", f"127.0.0.1:{http_port}", "--model", "gmbinet", "--data", data,
                "--eval-limit", 3, "--rounds", 1, "--iters", 2, "--batch", "1", "--concurrency", 2, "--json", out)
        assert r.exit_code == 0, r.stderr
        rows = json.loads(out.read_text())["rows"]
        assert [row["backend"] for row in rows] == ["openvino", "server-http"]
        assert rows[1]["iou"] == pytest.approx(rows[0]["iou"], abs=1e-6)
        assert rows[1]["latency_ms"]["p50"] > 0 and rows[1]["throughput_fps"] > 0
    finally:
        rc = server.stop()
    assert server.proc.poll() is not None, "tritonserver still running after stop()"
    assert rc is not None


def _pids_listening_on(port: int) -> list:
    """Processes whose command line names ``--http-port PORT`` (the tritonserver edgekit serve started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--http-port" in args and args[args.index(b"--http-port") + 1:][:1] == [str(port).encode()]:
                pids.append(int(d.name))
    return pids


def test_sigterm_while_serve_starts_stops_tritonserver_too(triton_dist, tiny_artifacts, tmp_path):
    """Ctrl-C / SIGTERM while `edgekit serve` waited for the server to be ready left tritonserver running (in its
    own session, orphaned, still answering on the port). Now serve stops it, as it does once serving."""
    import os
    import signal
    import subprocess
    import sys

    repo = tmp_path / "repo"
    r = subprocess.run([sys.executable, "-m", "edgekit.cli", "export-repo", tiny_artifacts["openvino"], "--format",
                        "triton", "--out", repo, "--name", "m", "--triton-backend", "python"], capture_output=True)
    assert r.returncode == 0, r.stderr
    http, grpc = _free_ports(2)
    env = dict(os.environ, EDGEKIT_TRITON_HOME=str(triton_dist.home))
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", repo, "--http", f"127.0.0.1:{http}",
                             "--grpc", f"127.0.0.1:{grpc}", "--log", tmp_path / "triton.log"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _pids_listening_on(http) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert _pids_listening_on(http), "tritonserver was never started"
        proc.send_signal(signal.SIGTERM)  # before the models are ready: serve is still starting
        _, err = proc.communicate(timeout=90)
        left = _pids_listening_on(http)
    finally:
        for pid in _pids_listening_on(http):  # the orphan of a failing run: this test's own, by its pid
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert not left, f"tritonserver {left} still running after edgekit serve stopped:\n{err}"
    assert proc.returncode == 0 and "stopping tritonserver" in err, err
