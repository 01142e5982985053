"""Build a ``cpu-fused`` artifact: the folded weights and the kernel library, compiled here, per ISA level.

Folder::

    weights.bin                    every folded parameter, fp32, one blob (fold_gmbinet().param_layout())
    kernels/libgmbinet_avx2.so     gmbinet_cpu.cpp built with -mavx2 -mfma (the baseline)
    kernels/libgmbinet_avx512.so   the same source with -mavx512f/vl/bw/dq
    manifest.json                  + the parameter layout, the ISA levels, compiler and flags per library
                                     (int8: + "quantization", every GMBI module's calibrated z range)

The manifest's file hashes cover the weights and every library, so a corrupt or replaced file is refused
before anything is loaded.  The compiler is needed here only: a deployed device loads the library.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgekit.errors import EdgekitError

WEIGHTS_FILE = "weights.bin"
PRECISIONS = ("fp32", "int8")


def library_name(isa: str) -> str:
    return f"kernels/libgmbinet_{isa}.so"


def build_cpu_fused(checkpoint, folder: Path, precision: str = "fp32", *, isas: Optional[Sequence[str]] = None,
                    calibration: Optional[Sequence[np.ndarray]] = None, calibration_description: Optional[str] = None,
                    log: Callable = print) -> dict:
    """Write the weights and the libraries into ``folder``; returns the manifest fields.

    ``int8``: the GMBI modules' 1x1 convs run INT8 (``quantize_gmbi_1x1``), their activation ranges
    calibrated in PyTorch on ``calibration`` (preprocessed real images); everything else stays fp32."""
    from edgekit.kernels.cpu_fused import (ISA_LEVELS, build_library, find_compiler, gmbi_1x1_ranges,
                                           quantize_gmbi_1x1, source_path)
    from edgekit.kernels.gmbinet import fold_gmbinet, source_digest

    if checkpoint is None:
        raise EdgekitError("--target cpu-fused compiles from a GMBINet checkpoint, not from an artifact folder")
    if checkpoint.model_name != "gmbinet":
        raise EdgekitError(f"--target cpu-fused runs GMBINet only, not {checkpoint.model_name!r}")
    if precision not in PRECISIONS:
        raise EdgekitError(f"target cpu-fused does not offer precision {precision} (choose from {', '.join(PRECISIONS)})")
    isas = list(isas) if isas else list(ISA_LEVELS)
    unknown = [i for i in isas if i not in ISA_LEVELS]
    if unknown:
        raise EdgekitError(f"cpu-fused: unknown ISA level {unknown[0]!r} (choose from {', '.join(ISA_LEVELS)})")
    cxx = find_compiler()  # one line, before anything is written, when there is no compiler
    if precision == "int8" and not calibration:
        raise EdgekitError("cpu-fused int8 calibrates its 1x1 activation ranges on real images: give --calib")
    model = checkpoint.build().eval()
    net = fold_gmbinet(model)  # refuses (one line) what the kernels cannot run
    quantization = None
    if precision == "int8":
        log(f"cpu-fused: calibrating the GMBI 1x1 input ranges on {len(calibration)} images")
        layers = quantize_gmbi_1x1(net, gmbi_1x1_ranges(model, calibration))
        quantization = {"tool": "edgekit cpu-fused", "scheme": "GMBI 1x1 convs: weights s8 symmetric per output "
                        "channel; input z u7 per module (max over the calibration images); everything else fp32",
                        "calibration": calibration_description, "calibration_images": len(calibration),
                        "int8_layers": len(layers), "layers": layers}
    blob, offsets = net.param_layout()
    folder = Path(folder)
    blob.tofile(folder / WEIGHTS_FILE)
    (folder / "kernels").mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(isas)) as pool:  # one compiler process per ISA level, in parallel
        built = list(pool.map(lambda isa: build_library(isa, folder / library_name(isa), cxx), isas))
    libs = {}
    for isa, info in zip(isas, built):
        libs[isa] = {"file": library_name(isa), "compiler": info["compiler"], "flags": info["flags"]}
        log(f"cpu-fused: {isa} kernels built with {info['compiler']}")
    fields = {
        "model_file": WEIGHTS_FILE,
        "extra_files": [libs[i]["file"] for i in isas],
        "runtime": "cpu-fused (ctypes)",
        "isa": isas,
        "kernels": {"source": source_path().name, "source_sha256": source_digest(source_path()), "libraries": libs},
        "net": {"in_channels": net.in_channels, "widths": list(net.widths), "depths": list(net.depths),
                "out_channels": net.out_channels, "head_width": net.head_width},
        "param_layout": {name: [int(off), int(nb)] for name, (off, nb) in offsets.items()},
        "weights_bytes": int(blob.nbytes),
    }
    if quantization is not None:
        fields["quantization"] = quantization
    return fields


def read_weights(folder: Path, manifest: dict) -> np.ndarray:
    path = Path(folder) / manifest["model_file"]
    blob = np.fromfile(path, dtype=np.uint8)
    if blob.nbytes != int(manifest.get("weights_bytes", -1)):
        raise EdgekitError(f"{folder}: {manifest['model_file']} has {blob.nbytes} bytes, the manifest says "
                           f"{manifest.get('weights_bytes')}")
    return blob
