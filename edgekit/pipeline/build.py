"""The straight line every artifact is built by, driven by the target's ``BackendSpec``: open the
source, let the backend build its files, quantize them with NNCF when the backend asks the pipeline
to, check an INT8 budget on real images, then measure parity against the source model and record
everything in the manifest. A failure at any step leaves no folder behind.

``edgekit.pipeline.compile.compile_artifact`` checks the ``CompileRequest`` and calls this (or ``auto``
for ``--target auto`` / ``--precision auto``, which calls this once per candidate).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from edgekit.artifact import artifact_writer, sign_artifact, tool_versions, verify_artifact, write_manifest
from edgekit.backends.base import Runner
from edgekit.backends.registry import BackendSpec, BuildContext
from edgekit.errors import EdgekitError
from edgekit.pipeline.request import CompileRequest
from edgekit.progress import stage
from edgekit.pipeline.sources import open_source


def build_artifact(spec: BackendSpec, request: CompileRequest, log: Callable = print,
                   result: Optional[Callable] = None) -> dict:
    """One artifact folder of ``request.source`` for ``spec`` at ``request.precision`` (both checked by
    the caller: ``edgekit.pipeline.compile.check_request``). ``log``: the build's messages; ``result``: the one
    summary line once the folder is written (default: ``log``).

    ``request.sign_key`` (an Ed25519 private key, loaded by the caller before any work): ``manifest.sig`` is
    written over the final manifest inside the temporary folder, so the folder appears signed or not at all."""
    r = request
    precision, threads = r.precision, r.threads
    src = open_source(r.source, r.as_backbone, input_size=r.input_size, resize=r.resize)
    if src.artifact_target is not None and spec.from_artifacts is not None \
            and src.artifact_target not in spec.from_artifacts:
        hint = f"the checkpoint or an artifact of {', '.join(spec.from_artifacts)}" if spec.from_artifacts else "the checkpoint"
        raise EdgekitError(f"{r.source} is a {src.artifact_target} artifact; compile {spec.name} from {hint}")
    parity_set = src.parity_data(r.parity_images)
    calib_set = src.calibration_data(r.calib) if precision == "int8" and spec.int8 is not None else None
    val_set = src.validation_data(r.val) if r.val else None
    calibration = src.calibration_batches(calib_set, r.subset) if calib_set is not None else None
    with tempfile.TemporaryDirectory() as tmp, artifact_writer(r.out, force=r.force) as folder:
        onnx_cache: List[Path] = []

        def onnx_path() -> Path:
            if not onnx_cache:
                onnx_cache.append(src.model_file(Path(tmp)))
            return onnx_cache[0]

        ctx = BuildContext(source=src, folder=folder, log=log, threads=threads,
                           # an NNCF target builds the float model, which the pipeline then quantizes
                           precision="fp32" if (precision == "int8" and spec.int8 == "nncf") else precision,
                           requested_precision=precision, calibration=calibration,
                           calibration_description=calib_set.description if calib_set is not None else None,
                           int8_scheme=r.int8_scheme, subset=r.subset, onnx=onnx_path,
                           check_batches=lambda n=16: src.check_batches(parity_set, n))
        with stage(f"{spec.name}: building the {ctx.precision} model"):
            fields = spec.build(ctx)
        files = [fields["model_file"], *fields.pop("extra_files", [])]
        quantized = precision == "int8"
        manifest = {"target": spec.name, "precision": precision, **fields, **src.base,
                    "tools": tool_versions("torch", *spec.tools, *(("nncf",) if quantized and spec.int8 == "nncf" else ()))}
        if quantized and spec.int8 == "nncf":
            manifest["quantization"] = _nncf_quantize(src, spec, folder, manifest, calibration, calib_set, val_set, r)
        write_manifest(folder, manifest, files)  # hashes first: the runners below verify them
        if quantized and val_set is not None:  # the accuracy budget, the same for every backend
            manifest["quantization"] = {**manifest.get("quantization", {}),
                                        **src.int8_check(_load(spec, folder, threads), val_set, r.max_drop, threads,
                                                         metric=r.metric, log=log)}
        if spec.verifier is not None:
            runner, limit, method = spec.verifier(folder, precision, log)
            manifest["parity"] = {**src.parity(runner, parity_set, threads, limit=limit), "method": method}
        else:
            manifest["parity"] = src.parity(_load(spec, folder, threads), parity_set, threads)
        manifest = write_manifest(folder, manifest, files)
        if r.sign_key is not None:
            sign_artifact(folder, r.sign_key)
    (result or log)(src.summary(r.out, manifest))
    return manifest


def _load(spec: BackendSpec, folder: Path, threads) -> Runner:
    # the folder being built is not signed yet: hash-only, whatever EDGEKIT_TRUSTED_KEYS says on this machine
    # --threads is a compile option for the checks: offered to the backend, used where it declares it
    return spec.load(verify_artifact(folder, use_env=False), **spec.declared_options({"threads": threads}))


def _nncf_quantize(src, spec: BackendSpec, folder: Path, manifest: dict, calibration, calib_set, val_set,
                   request: CompileRequest) -> dict:
    """Replace the float model file in ``folder`` with its NNCF INT8 version (accuracy-controlled
    by NNCF itself when ``request.max_drop`` and validation images are given)."""
    from edgekit.compress.quantize import quantize_model

    subset, scheme, metric, max_drop = request.subset, request.int8_scheme, request.metric, request.max_drop

    fmt = spec.quantize_format
    path = folder / manifest["model_file"]
    items = fn = None
    if val_set is not None and max_drop is not None:
        items, fn = src.nncf_validation(val_set, metric, fmt)
    if fmt == "openvino":
        import openvino as ov

        q = quantize_model(ov.Core().read_model(str(path)), "openvino", calibration, scheme=scheme,
                           subset_size=subset, validation=items, validation_fn=fn, max_drop=max_drop)
        # The float IR's .bin is memory-mapped: write beside it and rename, never over it in place.
        staged = path.with_name("int8.xml")
        ov.save_model(q, str(staged), compress_to_fp16=False)
        os.replace(staged, path)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        manifest["inference_precision"] = "default"  # ops left in float run at the plugin's default
    elif fmt == "onnx":
        import onnx

        q = quantize_model(onnx.load(str(path)), "onnx", calibration, scheme=scheme, subset_size=subset,
                           validation=items, validation_fn=fn, max_drop=max_drop)
        onnx.save(q, str(path))
    else:
        raise EdgekitError(f"target {spec.name}: no NNCF model format declared")
    return {"tool": "nncf", "scheme": scheme, "calibration": calib_set.description,
            "calibration_images": len(calibration), "accuracy_control": fn is not None}
