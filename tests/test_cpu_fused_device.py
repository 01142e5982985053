"""What a station runs for a cpu-fused artifact: ``runtime.load`` + ``infer`` need numpy, ctypes and the artifact's
library only.  A fresh process loads a real artifact of the published checkpoint and runs an image with torch
and PyCUDA made unimportable, and reports every module it imported; its result must still be PyTorch's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a device must never import to run a cpu-fused artifact (the build side, other backends' runtimes)
HEAVY = ("torch", "torchvision", "pycuda", "onnxruntime", "openvino", "executorch", "nncf", "onnx")

CHILD = textwrap.dedent("""
    import json, sys

    class Refuse:  # any import of these fails: a lazy import on the load/infer path cannot hide
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {heavy!r}:
                raise ImportError(f"{{name}} imported on a cpu-fused device path")
            return None

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from edgekit import runtime

    with runtime.load(sys.argv[1], threads=2) as runner:
        y = runner.infer(np.load(sys.argv[2]))
    np.save(sys.argv[3], y)
    print(json.dumps({{"modules": sorted(sys.modules), "describe": runner.describe()}}))
""").format(heavy=set(HEAVY))


@pytest.fixture(scope="module")
def published_artifact(tmp_path_factory, published_ckpt):
    """A cpu-fused artifact of the published checkpoint with one library (one g++ run)."""
    from edgekit.kernels.cpu.runtime import supported_isas

    isas = supported_isas()
    if not isas or not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("cpu-fused needs AVX2/AVX-512 and g++")
    from edgekit.artifact import write_manifest
    from edgekit.backends.cpu_fused.build import build_cpu_fused
    from edgekit.pipeline.sources import open_source

    folder = tmp_path_factory.mktemp("cf") / "A"
    folder.mkdir()
    src = open_source(str(published_ckpt))
    fields = build_cpu_fused(src.checkpoint, folder, isas=["avx2" if "avx2" in isas else isas[0]], log=lambda *_: None)
    files = [fields["model_file"], *fields.pop("extra_files")]
    write_manifest(folder, {"target": "cpu-fused", "precision": "fp32", **fields, **src.base}, files)
    return folder


def test_load_and_infer_import_no_torch(published_artifact, published_ckpt, tmp_path):
    import torch

    from edgekit.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(published_ckpt)
    c, (h, w) = ckpt.preprocess.channels, ckpt.preprocess.input_size
    x = np.random.default_rng(0).standard_normal((1, c, h, w)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEKIT_NO_PROGRESS": "1"}
    env.pop("EDGEKIT_TRUSTED_KEYS", None)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", CHILD, str(published_artifact),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    tops = {m.split(".")[0] for m in report["modules"]}
    assert not tops & set(HEAVY), sorted(tops & set(HEAVY))
    # -X importtime lists every module the process imported, in order: none of them torch's
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert "edgekit.kernels.cpu.runtime" in imported and not [m for m in imported if m.split(".")[0] in HEAVY]
    assert {"edgekit.kernels.fold", "edgekit.kernels.cpu.build", "edgekit.models"}.isdisjoint(report["modules"])
    assert report["describe"].startswith("cpu-fused fp32")
    with torch.no_grad():
        ref = ckpt.build().eval()(torch.from_numpy(x)).numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-4  # a real run of the published model
