"""Model repositories for Triton Inference Server and OpenVINO Model Server from edgekit artifacts.

Triton (``REPO/<name>/config.pbtxt`` + ``REPO/<name>/<version>/...``), one route per artifact target:

* ``openvino``  -> ``backend: "openvino"``, ``<version>/model.xml|bin``
* ``onnx|ort``  -> ``backend: "onnxruntime"``, ``<version>/model.onnx`` (``--accelerator openvino|tensorrt``:
  ONNX Runtime's OpenVINO execution provider on the CPU, or its TensorRT one on the GPU)
* ``trt``       -> ``platform: "tensorrt_plan"``, ``<version>/model.plan`` and ``cc_model_filenames`` for the
  compute capability the engine was built for (an engine runs only on that GPU)
* any target    -> ``backend: "python"``: ``<version>/model.py`` (edgekit/serve/triton_model.py) runs the copied
  artifact folder ``<version>/artifact`` through ``edgekit.runtime``; the only route for ``cuda-fused``
  (and any other target without a Triton backend of its own), and the one the ``tritonserver`` of the
  nvidia-pytriton wheel can run (it bundles the python backend only).

OVMS (``REPO/models/<name>/<version>/model.xml|model.onnx`` + ``REPO/config.json`` with ``model_config_list``):
OpenVINO IR and plain ONNX only (OVMS runs models with OpenVINO).

Every served model carries ``edgekit.json`` beside its files: the artifact's manifest (source checkpoint
sha256, preprocessing, file hashes, parity measured at compile time) and how it is served.

The served model takes what ``runner.infer`` takes: preprocessed float32 ``N x C x H x W``. Preprocessing
stays with the client (``edgekit.data.preprocess`` with the spec in ``edgekit.json``, also in the
config's ``parameters``): the same tensor contract for every backend and both servers, so a served
model's masks can be compared bit for bit with the local runner's. See the README for the trade-off.

Configs are built as Triton's own ``ModelConfig`` protobuf (tritonclient's ``model_config_pb2``) and
written with protobuf's text format, so what we write is what Triton parses.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.artifact import artifact_writer, is_artifact, now_utc, read_manifest, verify_artifact
from edgekit.utils import sha256_file

FORMATS = ("triton", "ovms")
TRITON_BACKENDS = ("auto", "native", "python")
ACCELERATORS = ("none", "openvino", "tensorrt")
SERVED_MANIFEST = "edgekit.json"
PYTHON_ARTIFACT_DIR = "artifact"
TRITON_MODEL_PY = Path(__file__).with_name("triton_model.py")
OVMS_CONFIG = "config.json"
# Triton's openvino backend and OpenVINO's CPU plugin take the precision hint by these names.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


@dataclass
class ServeOptions:
    max_batch: int = 32
    instances: int = 2
    dynamic_batching: bool = False
    max_queue_delay_us: int = 2000
    queue_timeout_us: int = 1_000_000  # a request waiting longer is rejected, not served late
    max_queue_size: int = 256
    triton_backend: str = "auto"  # auto: the native backend where there is one, else python
    accelerator: str = "none"
    warmup: bool = True


@dataclass
class ModelEntry:
    """One artifact placed in the repository."""
    artifact: Path
    manifest: dict
    name: str
    version: int
    route: str = ""  # triton: openvino | onnxruntime | tensorrt_plan | python; ovms: openvino
    max_batch: int = 0
    notes: List[str] = field(default_factory=list)


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingBackendError("writing and checking Triton model configs", "tritonclient[grpc]", "serve") from None
    return model_config_pb2, text_format


def parse_triton_config(path_or_text) -> object:
    """A ``config.pbtxt`` parsed into Triton's ``ModelConfig`` message (raises on anything Triton would refuse)."""
    mc, text_format = _pb()
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else str(path_or_text)
    return text_format.Parse(text, mc.ModelConfig())


def default_name(artifact: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(artifact).resolve().name).strip("._") or "model"
    return name if _NAME_OK.match(name) else f"m_{name}"


def _check_kind(entry: ModelEntry) -> None:
    kind = entry.manifest.get("model", {}).get("kind", "gmbinet")
    if kind != "gmbinet":
        raise EdgekitError(f"{entry.artifact}: a {kind!r} artifact; export-repo serves segmentation artifacts "
                           f"(GMBINet: image in, mask out)")


def artifact_max_batch(manifest: dict) -> Optional[int]:
    """The largest batch the artifact runs, or None when its batch dimension is free."""
    if manifest.get("target") == "trt":
        profiles = manifest.get("tensorrt", {}).get("profiles") or []
        return max((int(p["max"]) for p in profiles), default=1)
    first = (manifest.get("input", {}).get("shape") or ["batch"])[0]
    return int(first) if isinstance(first, int) else None


def _route(entry: ModelEntry, fmt: str, opts: ServeOptions) -> str:
    target = entry.manifest.get("target")
    if fmt == "ovms":
        if target == "openvino":
            return "openvino"
        if target in ("onnx", "ort"):
            if target == "ort" and _foreign_onnx_domains(entry):
                raise EdgekitError(
                    f"{entry.artifact}: this ort artifact holds ONNX Runtime's own fused operators "
                    f"({', '.join(_foreign_onnx_domains(entry))}) that OpenVINO (and so OVMS) cannot read: export an "
                    f"onnx or openvino artifact for --format ovms, or serve this one with --format triton")
            return "openvino"
        why = {"trt": "a TensorRT engine needs TensorRT", "cuda-fused": "edgekit's CUDA kernels need PyCUDA"}.get(
            target, f"OVMS runs OpenVINO IR and ONNX models only, not target {target!r}")
        raise EdgekitError(f"{entry.artifact}: OpenVINO Model Server cannot serve a {target} artifact ({why}): "
                           f"use --format triton ({'platform tensorrt_plan' if target == 'trt' else 'python backend'})")
    native = {"openvino": "openvino", "onnx": "onnxruntime", "ort": "onnxruntime", "trt": "tensorrt_plan"}.get(target)
    if opts.triton_backend == "python":
        return "python"
    if native is None:
        if opts.triton_backend == "native":
            raise EdgekitError(f"{entry.artifact}: Triton has no backend of its own for target {target!r}: "
                               f"use --triton-backend python (runs it through edgekit.runtime)")
        return "python"
    return native


def _foreign_onnx_domains(entry: ModelEntry) -> List[str]:
    import onnx

    model = onnx.load(str(entry.artifact / entry.manifest["model_file"]), load_external_data=False)
    return sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def _io(manifest: dict):
    spec = manifest["preprocess"]
    c, (h, w) = int(spec.get("channels", 3)), spec["input_size"]
    return (manifest.get("input", {}).get("name", "image"), [c, int(h), int(w)],
            manifest.get("output", {}).get("name", "mask"), [1, int(h), int(w)])


# --- Triton -----------------------------------------------------------------------------------------------

def triton_config(entry: ModelEntry, opts: ServeOptions):
    """The ``ModelConfig`` message of one served model."""
    mc, _ = _pb()
    man = entry.manifest
    in_name, in_dims, out_name, out_dims = _io(man)
    cfg = mc.ModelConfig(name=entry.name, max_batch_size=entry.max_batch)
    gpu = _runs_on_gpu(man.get("target"))
    if entry.route == "tensorrt_plan":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
        cc = man.get("tensorrt", {}).get("compute_capability")
        if cc:  # the engine runs on this GPU only: Triton picks the file by the GPU's compute capability
            cfg.cc_model_filenames[str(cc)] = "model.plan"
    else:
        cfg.backend = entry.route
        cfg.default_model_filename = {"openvino": "model.xml", "onnxruntime": "model.onnx",
                                      "python": "model.py"}[entry.route]
    cfg.input.add(name=in_name, data_type=mc.TYPE_FP32, dims=in_dims)
    cfg.output.add(name=out_name, data_type=mc.TYPE_FP32, dims=out_dims)
    cfg.instance_group.add(count=opts.instances, kind=mc.ModelInstanceGroup.KIND_GPU if gpu
                           else mc.ModelInstanceGroup.KIND_CPU)
    if opts.dynamic_batching and entry.max_batch > 1:
        db = cfg.dynamic_batching
        db.max_queue_delay_microseconds = opts.max_queue_delay_us
        db.preferred_batch_size.extend(sorted({b for b in (4, 8, entry.max_batch) if b <= entry.max_batch}))
        db.default_queue_policy.timeout_action = mc.ModelQueuePolicy.REJECT
        db.default_queue_policy.default_timeout_microseconds = opts.queue_timeout_us
        db.default_queue_policy.allow_timeout_override = True
        db.default_queue_policy.max_queue_size = opts.max_queue_size
    if entry.route == "openvino":
        # The backend's defaults are a throughput setup that would differ from the verified artifact:
        # pass the precision the manifest records (the CPU plugin defaults to bf16 where it can).
        prec = OV_PRECISION.get(man.get("inference_precision", man.get("precision")))
        if prec:
            cfg.parameters["INFERENCE_PRECISION_HINT"].string_value = prec
        cfg.parameters["PERFORMANCE_HINT"].string_value = "LATENCY"
        cfg.parameters["RESHAPE_IO_LAYERS"].string_value = "yes"  # the IR's batch dim is dynamic
    if entry.route == "onnxruntime" and opts.accelerator != "none":
        acc = cfg.optimization.execution_accelerators
        if opts.accelerator == "openvino":
            acc.cpu_execution_accelerator.add(name="openvino")
        else:
            a = acc.gpu_execution_accelerator.add(name="tensorrt")
            a.parameters["precision_mode"] = "FP16"
            a.parameters["max_workspace_size_bytes"] = str(1 << 30)
    if opts.warmup:
        # zeros, not random_data: Triton fills FP32 inputs with random bytes, whose NaN/inf patterns every
        # edgekit runner refuses (Runner.infer's finite check), so a random warmup failed the model at load
        w = cfg.model_warmup.add(name="zero_batch1", batch_size=1, count=2)
        w.inputs[in_name].data_type = mc.TYPE_FP32
        w.inputs[in_name].dims.extend(in_dims)
        w.inputs[in_name].zero_data = True
    # What a client needs to prepare inputs, readable through Triton's model-config API.
    cfg.parameters["edgekit_preprocess"].string_value = json.dumps(man["preprocess"], sort_keys=True)
    cfg.parameters["edgekit_source_sha256"].string_value = man.get("source", {}).get("sha256", "")
    cfg.parameters["edgekit_target"].string_value = f"{man.get('target')}:{man.get('precision')}"
    cfg.parameters["edgekit_size_bytes"].string_value = str(man.get("size_bytes", 0))
    return cfg


def _runs_on_gpu(target) -> bool:
    """From the backend registry: GPU backends get GPU instances."""
    from edgekit.backends.registry import get_backend

    try:
        return get_backend(target).device == "gpu"
    except EdgekitError:  # a target this edgekit does not know: the python backend on the CPU
        return False


def _place_triton(entry: ModelEntry, repo: Path, opts: ServeOptions) -> None:
    _, text_format = _pb()
    mdir = repo / entry.name
    vdir = mdir / str(entry.version)
    vdir.mkdir(parents=True)
    man = entry.manifest
    if entry.route == "python":
        shutil.copytree(entry.artifact, vdir / PYTHON_ARTIFACT_DIR)
        shutil.copyfile(TRITON_MODEL_PY, vdir / "model.py")
        copied = {PYTHON_ARTIFACT_DIR + "/" + n: n for n in [*man.get("files", {}), "manifest.json"]}
    elif entry.route == "tensorrt_plan":
        copied = {"model.plan": man["model_file"]}
    elif entry.route == "openvino":
        copied = {"model.xml": man["model_file"], "model.bin": Path(man["model_file"]).with_suffix(".bin").name}
    else:
        copied = {"model.onnx": man["model_file"]}
    if entry.route != "python":
        for dst, src in copied.items():
            shutil.copyfile(entry.artifact / src, vdir / dst)
    _check_copies(entry, vdir, copied)
    _write_served_manifest(entry, vdir, "triton", copied)
    cfg = triton_config(entry, opts)
    (mdir / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def verify_python_model(vdir: Path, trusted_keys=None) -> None:
    """Before a python-backend model version is served, every file in its folder: ``model.py`` byte for byte
    this edgekit's ``triton_model.py`` (Triton runs it, and puts its folder on the stub's ``sys.path``, so
    any other ``.py`` there could be imported in its place), ``edgekit.json``, and the artifact folder
    verified like ``runtime.load`` does (signature when keys are trusted, paths, every file's sha256, nothing
    unlisted); anything else in the folder (a new module, ``__pycache__``) is refused. One error line."""
    where = f"{vdir.parent.name} version {vdir.name}"
    model_py = vdir / "model.py"
    if not model_py.is_file() or model_py.is_symlink():
        raise EdgekitError(f"{where}: no model.py (write the repository with edgekit export-repo)")
    if sha256_file(model_py) != sha256_file(TRITON_MODEL_PY):
        raise EdgekitError(f"{where}: model.py is not edgekit's triton_model.py (modified, or written by another "
                           "edgekit version: re-export the repository); refused before serving")
    for f in sorted(vdir.iterdir()):
        if f.name in ("model.py", SERVED_MANIFEST) and f.is_file() and not f.is_symlink():
            continue
        if f.name == PYTHON_ARTIFACT_DIR and f.is_dir() and not f.is_symlink():
            continue
        raise EdgekitError(f"{where}: {f.name} is not part of the exported model (only model.py, {SERVED_MANIFEST} "
                           f"and {PYTHON_ARTIFACT_DIR}/ are); refused before serving")
    try:
        served = json.loads((vdir / SERVED_MANIFEST).read_text())
        recorded = {k: v["sha256"] for k, v in served["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise EdgekitError(f"{where}: {SERVED_MANIFEST} is missing or not edgekit's; refused before serving") from None
    art = verify_artifact(vdir / PYTHON_ARTIFACT_DIR, trusted_keys)
    for dst, digest in recorded.items():
        name = dst.removeprefix(PYTHON_ARTIFACT_DIR + "/")
        if name != "manifest.json" and art.manifest["files"].get(name) != digest:
            raise EdgekitError(f"{where}: {dst} is not the file exported ({SERVED_MANIFEST} disagrees with the "
                               "artifact's manifest); refused before serving")


def _check_copies(entry: ModelEntry, vdir: Path, copied: dict) -> None:
    """The files in the repository are the artifact's, byte for byte (the manifest's sha256s)."""
    hashes = entry.manifest.get("files", {})
    for dst, src in copied.items():
        if src in hashes and sha256_file(vdir / dst) != hashes[src]:
            raise EdgekitError(f"{entry.artifact}: {src} changed while it was copied into the repository")


def _write_served_manifest(entry: ModelEntry, vdir: Path, fmt: str, copied: dict) -> None:
    served = {
        "format": "edgekit-served-model", "format_version": 1, "created": now_utc(),
        "server": fmt, "name": entry.name, "version": entry.version, "route": entry.route,
        "max_batch_size": entry.max_batch, "notes": entry.notes,
        "artifact": {"path": str(entry.artifact.resolve()),
                     "manifest_sha256": sha256_file(entry.artifact / "manifest.json")},
        "files": {dst: {"from": src, "sha256": sha256_file(vdir / dst)} for dst, src in copied.items()},
        "preprocess": entry.manifest["preprocess"],
        "manifest": entry.manifest,
    }
    (vdir / SERVED_MANIFEST).write_text(json.dumps(served, indent=2) + "\n")


# --- OVMS -------------------------------------------------------------------------------------------------

def ovms_model_config(entry: ModelEntry, opts: ServeOptions) -> dict:
    in_name, in_dims, _, _ = _io(entry.manifest)
    batch = f"1:{entry.max_batch}" if entry.max_batch > 1 else "1"
    plugin = {"PERFORMANCE_HINT": "LATENCY" if opts.instances <= 1 else "THROUGHPUT",
              "NUM_STREAMS": str(opts.instances)}
    prec = OV_PRECISION.get(entry.manifest.get("inference_precision", entry.manifest.get("precision")))
    if prec:
        plugin["INFERENCE_PRECISION_HINT"] = prec
    return {"config": {
        "name": entry.name,
        "base_path": f"models/{entry.name}",  # relative to config.json
        "target_device": "CPU",
        "shape": {in_name: f"({batch},{','.join(map(str, in_dims))})"},
        "nireq": max(2, 2 * opts.instances),
        "plugin_config": plugin,
        # the newest numbered folder is served; dropping in models/<name>/<N+1>/ rolls forward on its own
        "model_version_policy": {"latest": {"num_versions": 1}},
    }}


def _place_ovms(entry: ModelEntry, repo: Path) -> None:
    vdir = repo / "models" / entry.name / str(entry.version)
    vdir.mkdir(parents=True)
    man = entry.manifest
    if entry.manifest.get("target") == "openvino":
        copied = {"model.xml": man["model_file"], "model.bin": Path(man["model_file"]).with_suffix(".bin").name}
    else:
        copied = {"model.onnx": man["model_file"]}
    for dst, src in copied.items():
        shutil.copyfile(entry.artifact / src, vdir / dst)
    _check_copies(entry, vdir, copied)
    _write_served_manifest(entry, vdir, "ovms", copied)


def _write_ovms_config(repo: Path, entries: Sequence[ModelEntry], opts: ServeOptions) -> None:
    path = repo / OVMS_CONFIG
    listed = json.loads(path.read_text()).get("model_config_list", []) if path.exists() else []
    names = {e.name for e in entries}
    listed = [c for c in listed if c.get("config", {}).get("name") not in names]
    listed += [ovms_model_config(e, opts) for e in entries]
    path.write_text(json.dumps({"model_config_list": listed}, indent=2) + "\n")


# --- the command ------------------------------------------------------------------------------------------

def _existing_versions(repo: Path, fmt: str, name: str) -> List[int]:
    mdir = repo / name if fmt == "triton" else repo / "models" / name
    return sorted(int(p.name) for p in mdir.iterdir() if p.is_dir() and p.name.isdigit()) if mdir.is_dir() else []


def plan_entries(artifacts: Sequence[str], fmt: str, name: Optional[str], version: Optional[int],
                 opts: ServeOptions, existing: Optional[Path] = None) -> List[ModelEntry]:
    if fmt not in FORMATS:
        raise EdgekitError(f"unknown repository format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not artifacts:
        raise EdgekitError("export-repo needs at least one artifact folder")
    if name and len(artifacts) > 1:
        raise EdgekitError("--name names one model: give one artifact with it (models are named after their folders)")
    if name and not _NAME_OK.match(name):
        raise EdgekitError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (a folder name on every server)")
    entries: List[ModelEntry] = []
    for a in artifacts:
        p = Path(a)
        if not is_artifact(p):
            raise EdgekitError(f"{p}: not an artifact folder (no manifest.json): compile one with edgekit compile")
        e = ModelEntry(p, read_manifest(p), name or default_name(p), 0)
        _check_kind(e)
        e.route = _route(e, fmt, opts)
        supported = artifact_max_batch(e.manifest)
        e.max_batch = opts.max_batch if supported is None else min(opts.max_batch, supported)
        if e.max_batch < opts.max_batch:
            e.notes.append(f"max_batch_size {e.max_batch}: the artifact runs batches up to {supported}")
        entries.append(e)
    seen = {}
    for e in entries:
        if e.name in seen:
            raise EdgekitError(f"name clash: {seen[e.name]} and {e.artifact} would both be model {e.name!r} "
                               f"(export them one at a time with --name)")
        seen[e.name] = e.artifact
        taken = _existing_versions(existing, fmt, e.name) if existing else []
        e.version = version if version is not None else (max(taken) + 1 if taken else 1)
        if e.version in taken:
            raise EdgekitError(f"name clash: {existing} already has model {e.name!r} version {e.version} "
                               f"(choose another --version, or another --name)")
    return entries


def export_repo(artifacts: Sequence[str], fmt: str, out: str, name: Optional[str] = None,
                version: Optional[int] = None, opts: Optional[ServeOptions] = None, force: bool = False,
                add: bool = False) -> dict:
    """Write (or, with ``add``, extend) a model repository; returns a summary of what was placed where.

    The repository is built in a temporary folder and renamed into place: nothing half-written, and an
    existing repository is only replaced (``force``) or extended (``add``, a copy updated) when asked.
    """
    opts = opts or ServeOptions()
    if opts.max_batch < 1 or opts.instances < 1:
        raise EdgekitError("--max-batch and --instances must be at least 1")
    out_p = Path(out)
    if out_p.exists() and not (force or add):
        raise EdgekitError(f"{out_p} already exists (use --force to replace it, or --add to add models to it)")
    if add and out_p.exists() and not _is_repo(out_p, fmt):
        raise EdgekitError(f"{out_p} is not a {fmt} model repository written by edgekit export-repo")
    existing = out_p if (add and out_p.exists()) else None
    entries = plan_entries(artifacts, fmt, name, version, opts, existing)
    if fmt == "triton":
        _pb()  # fail before writing anything when tritonclient is missing
    with artifact_writer(out_p, force=True) as tmp:
        if existing:
            shutil.rmtree(tmp)
            shutil.copytree(existing, tmp)
        for e in entries:
            if fmt == "triton":
                if existing and (tmp / e.name / "config.pbtxt").exists():
                    _check_same_io(tmp / e.name / "config.pbtxt", e, opts)
                _place_triton(e, tmp, opts)
            else:
                _place_ovms(e, tmp)
        if fmt == "ovms":
            _write_ovms_config(tmp, entries, opts)
        (tmp / ".edgekit-repo").write_text(fmt + "\n")
    return {"repository": str(out_p), "format": fmt, "models": [
        {"name": e.name, "version": e.version, "route": e.route, "max_batch_size": e.max_batch,
         "target": e.manifest.get("target"), "precision": e.manifest.get("precision"),
         "artifact": str(e.artifact), "notes": e.notes} for e in entries]}


def _is_repo(path: Path, fmt: str) -> bool:
    marker = path / ".edgekit-repo"
    return marker.is_file() and marker.read_text().strip() == fmt


def _check_same_io(config_path: Path, entry: ModelEntry, opts: ServeOptions) -> None:
    """A new version under an existing Triton model must fit its config (one config.pbtxt serves every version)."""
    old, new = parse_triton_config(config_path), triton_config(entry, opts)
    if (old.platform, old.backend, list(old.input), list(old.output)) != \
            (new.platform, new.backend, list(new.input), list(new.output)):
        raise EdgekitError(f"name clash: model {entry.name!r} in the repository has another backend or other "
                           f"inputs/outputs than {entry.artifact} (use another --name)")
