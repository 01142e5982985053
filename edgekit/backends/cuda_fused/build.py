"""Compile target ``cuda-fused``: an artifact folder for edgekit's own CUDA kernels.

The folder holds the GMBINet checkpoint (``model.pt``; BN is folded when the runtime loads it),
the network's kernels prebuilt as a fatbin for sm_87 / sm_89 / sm_90 plus PTX (``kernels/``, with
nvcc's per-kernel register and spill report), and the manifest. ``edgekit.runtime.load`` hands the
folder to the ``cuda-fused`` runner, so ``eval``, ``predict`` and ``bench`` use it like any other
artifact.

Verification at compile time: on a machine with a CUDA GPU and PyCUDA the artifact itself runs;
without one, the same launch plan runs under host emulation (the same ``.cu`` sources compiled with
g++), on fewer images because it takes about a minute per 512x512 image. The manifest's parity
records which of the two it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

from edgekit.errors import EdgekitError, MissingBackendError
from edgekit.backends.base import Runner

EMULATED_PARITY_IMAGES = 2


def build(ctx) -> dict:
    """Write ``model.pt`` and the prebuilt kernels into ``ctx.folder``; the manifest fields."""
    src, folder, log = ctx.source, ctx.folder, ctx.log
    from edgekit.kernels.cuda.build import DEFAULT_ARCHS, compile_kernels, find_nvcc
    from edgekit.kernels.cuda.gmbinet import layers_source_path
    from edgekit.kernels.fold import fold_gmbinet
    from edgekit.kernels.graph import launch_count
    from edgekit.kernels.sources import source_digest

    ck = src.checkpoint
    if ck is None:
        raise EdgekitError("--target cuda-fused compiles from a GMBINet checkpoint, not from an artifact folder")
    if ck.model_name != "gmbinet":
        raise EdgekitError(f"--target cuda-fused runs GMBINet only, not {ck.model_name!r}")
    model = ck.build()
    fold_gmbinet(model)  # refuses what the kernels cannot run (one line) before anything is written
    ck.save(folder / "model.pt")
    fields = {"model_file": "model.pt", "runtime": "pycuda", "launches": launch_count(model.config.depths),
              "kernel_source_sha256": source_digest(layers_source_path())}
    if find_nvcc() is None:
        fields["kernels"] = {"prebuilt": False, "note": "nvcc not found: PyCUDA compiles them at load time, which "
                                                        "needs nvcc on the GPU machine's PATH"}
        return fields
    res = compile_kernels(DEFAULT_ARCHS, fmt="fatbin", out_dir=folder / "kernels", source=layers_source_path())
    regs = [r.registers for r in res.resources]
    import json

    built = json.loads((folder / "kernels" / "manifest.json").read_text())
    fields["kernels"] = {"prebuilt": True, "format": "fatbin", "archs": list(res.archs),
                         # a driver older than this CUDA version cannot load them (JetPack 6 on Orin: 12.x)
                         "cuda_version": built.get("cuda_version"),
                         "max_registers": max(regs) if regs else None,
                         "spills": sum(r.spill_stores + r.spill_loads for r in res.resources)}
    fields["extra_files"] = [f"kernels/{name}" for name in res.files()] + ["kernels/manifest.json"]
    log(f"cuda-fused: kernels built for {', '.join(res.archs)} (max {fields['kernels']['max_registers']} registers, "
        "no spills)")
    return fields


def verification_runner(folder: Path, precision: str, log: Callable = print) -> Tuple[Runner, int, str]:
    """The runner to verify a fresh artifact with, how many images to use, and how it ran."""
    from edgekit.models.checkpoint import load_checkpoint
    from edgekit.backends.cuda_fused.runner import EmulatedCudaFusedRunner, _load

    try:
        return _load(folder), 16, "GPU (PyCUDA)"
    except (MissingBackendError, EdgekitError) as gpu_error:
        reason = str(gpu_error)
    ck = load_checkpoint(folder / "model.pt")
    try:
        runner = EmulatedCudaFusedRunner(ck, precision)
        runner.infer(__import__("numpy").zeros((1, *runner.input_shape), "float32"))  # builds the emulator
    except EdgekitError as e:
        raise EdgekitError(f"cannot verify the cuda-fused artifact: no GPU ({reason}) and no host emulator ({e})") from None
    log(f"cuda-fused: verifying on {EMULATED_PARITY_IMAGES} images by host emulation")
    return runner, EMULATED_PARITY_IMAGES, f"host emulation of the H100 launch plan (no GPU here: {reason})"
