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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError

WEIGHTS_FILE = "weights.bin"
PRECISIONS = ("fp32", "int8", "bf16")
BF16_ISA = "avx512amx"  # bf16: the GMBI modules' 1x1 on AMX tiles (bf16 products, fp32 accumulation)


def library_name(isa: str) -> str:
    return f"kernels/libgmbinet_{isa}.so"


def build_cpu_fused(checkpoint, folder: Path, precision: str = "fp32", *, isas: Optional[Sequence[str]] = None,
                    calibration: Optional[Sequence[np.ndarray]] = None, calibration_description: Optional[str] = None,
                    log: Callable = print) -> dict:
    """Write the weights and the libraries into ``folder``; returns the manifest fields.

    ``int8``: the GMBI modules' 1x1 convs run INT8 (``quantize_gmbi_1x1``), their activation ranges
    calibrated in PyTorch on ``calibration`` (preprocessed real images); everything else stays fp32.
    ``bf16``: the same weights, and only the ``avx512amx`` library (the GMBI modules' 1x1 as bf16 products on
    AMX tiles; everything else fp32), so it runs on CPUs with AMX-BF16 only."""
    from edgekit.kernels.cpu.build import build_library, find_compiler, gmbi_1x1_ranges, quantize_gmbi_1x1
    from edgekit.kernels.cpu.runtime import DEFAULT_ISAS, ISA_LEVELS, source_path
    from edgekit.kernels.fold import fold_gmbinet
    from edgekit.kernels.sources import source_digest

    if checkpoint is None:
        raise EdgekitError("--target cpu-fused compiles from a GMBINet checkpoint, not from an artifact folder")
    if checkpoint.model_name != "gmbinet":
        raise EdgekitError(f"--target cpu-fused runs GMBINet only, not {checkpoint.model_name!r}")
    if precision not in PRECISIONS:
        raise EdgekitError(f"target cpu-fused does not offer precision {precision} (choose from {', '.join(PRECISIONS)})")
    if not isas:
        isas = [BF16_ISA] if precision == "bf16" else list(DEFAULT_ISAS)
    isas = list(isas)
    # the bf16 level and the bf16 precision go together: the parity gate holds each artifact to its precision
    if (precision == "bf16") != (BF16_ISA in isas) or (precision == "bf16" and len(isas) > 1):
        raise EdgekitError(f"cpu-fused: precision bf16 is the {BF16_ISA} library alone (the GMBI 1x1 in bf16), and "
                           f"{BF16_ISA} is precision bf16 only (asked: {precision}, {', '.join(isas)})")
    unknown = [i for i in isas if i not in ISA_LEVELS]
    if unknown:
        raise EdgekitError(f"cpu-fused: unknown ISA level {unknown[0]!r} (choose from {', '.join(ISA_LEVELS)})")
    cxx = find_compiler()  # one line, before anything is written, when there is no compiler
    if precision == "int8" and not calibration:
        raise EdgekitError("cpu-fused int8 calibrates its 1x1 activation ranges on real images: give --calib")
    model = checkpoint.build().eval()
    net = fold_gmbinet(model, channel_multiple=1)  # any width; refuses (one line) what the kernels cannot run
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


# What a manifest may claim before anything is sized from it: far above any GMBINet edgekit builds
# (widths 16..128, depths 3..6), far below what would need gigabytes of parameters.
MAX_CHANNELS = 16  # in_channels, out_channels
MAX_WIDTH = 1024  # stage widths, head width
MAX_DEPTH = 32  # GMBI modules per stage
MAX_ACTIVATION_BYTES = 2 << 30  # one image's activation arena (plan_gmbinet's act_bytes; 512x512: 21 MB, 4096x4096: 1.3 GB)


def _plausible_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def expected_param_layout(net: dict, int8: bool) -> Tuple[Dict[str, Tuple[int, int]], int]:
    """({"layer.array": (offset, nbytes)}, blob bytes) that ``fold_gmbinet(..).param_layout()`` (and
    ``quantize_gmbi_1x1`` for INT8) writes for a net of these dimensions: the only layout the kernels
    may be given, since every array's size follows from the widths, depths and channels."""
    from edgekit.kernels.graph import ALIGN

    cin, w, d, cout, hw = net["in_channels"], net["widths"], net["depths"], net["out_channels"], net["head_width"]
    f = 4  # fp32
    arrays: List[Tuple[str, int]] = [("stem.w", cin * 9 * w[0] * f), ("stem.b", w[0] * f)]

    def dwpw(layer, ci, co):
        return [(f"{layer}.dw_w", ci * 9 * f), (f"{layer}.dw_b", ci * f), (f"{layer}.pw_wt", ci * co * f),
                (f"{layer}.pw_b", co * f)]
    for s in range(2, 6):
        arrays += dwpw(f"down{s}", w[s - 2], w[s - 1])
        c = w[s - 1]
        for i in range(1, d[s - 2] + 1):
            arrays += dwpw(f"gmbi{s}_{i}", c, c)
            if int8:  # s8 weights packed 4 to a word [C/4][C], per-channel scale, 1 / s_z
                arrays += [(f"gmbi{s}_{i}.pw_q", c * c), (f"gmbi{s}_{i}.pw_qscale", c * f), (f"gmbi{s}_{i}.pw_qinv", f)]
    arrays += [("decoder5.pw_wt", w[4] * w[3] * f), ("decoder5.pw_b", w[3] * f)]
    for name, ci, co in (("DF4", w[3], w[2]), ("DF3", w[2], w[1]), ("DF2", w[1], w[0]), ("DF1", w[0], hw)):
        arrays += dwpw(name, ci, co)
    arrays += [("head.w", cout * hw * f), ("head.b", cout * f)]
    layout, pos = {}, 0
    for name, nb in arrays:
        layout[name] = (pos, nb)
        pos += -(-nb // ALIGN) * ALIGN
    return layout, max(pos, ALIGN)


def check_geometry(folder, manifest: dict, weights_size: int):
    """(FoldedGMBINet, offsets) from a cpu-fused manifest, every value checked before native code sees it.

    The net's dimensions must be plausible (``MAX_*``: one line instead of gigabytes or a crash), the
    parameter layout must be exactly the one those dimensions give (so no offset or size points outside
    the weights and every array has its parameter's shape), and the weights file (already hashed) must be
    exactly as long as that layout.  The input size comes from the preprocess record (checked by the
    runner) and the activation arena it gives is bounded too."""
    from edgekit.kernels.graph import FoldedGMBINet, plan_gmbinet

    n, layout = manifest.get("net"), manifest.get("param_layout")
    if not isinstance(n, dict) or not isinstance(layout, dict):
        raise EdgekitError(f"{folder}: not a complete cpu-fused artifact (no net or parameter layout)")
    widths, depths, hw = n.get("widths"), n.get("depths"), n.get("head_width")
    ok = (_plausible_int(n.get("in_channels"), 1, MAX_CHANNELS) and _plausible_int(n.get("out_channels"), 1, MAX_CHANNELS)
          and isinstance(widths, list) and len(widths) == 5 and isinstance(depths, list) and len(depths) == 4
          and all(_plausible_int(v, 1, MAX_WIDTH) for v in (widths[0], hw))
          and all(_plausible_int(v, 4, MAX_WIDTH) and v % 4 == 0 for v in widths[1:])  # the GMBI stages: 4 groups
          and all(_plausible_int(v, 1, MAX_DEPTH) for v in depths))
    if not ok:
        raise EdgekitError(f"{folder}: implausible cpu-fused net in the manifest ({n!r}: 5 widths and a head width "
                           f"in 1..{MAX_WIDTH}, the GMBI stages' multiples of 4; 4 depths in 1..{MAX_DEPTH}; channels 1..{MAX_CHANNELS})")
    int8 = manifest.get("precision") == "int8"
    expected, total = expected_param_layout(n, int8)
    got = {}
    for k, v in layout.items():
        if not (isinstance(v, list) and len(v) == 2 and all(_plausible_int(x, 0, 1 << 62) for x in v)):
            raise EdgekitError(f"{folder}: parameter {k!r} has layout {v!r}, not [offset, bytes]")
        got[k] = (v[0], v[1])
    if got != expected:
        bad = next((k for k in (*expected, *got) if got.get(k) != expected.get(k)), "?")
        raise EdgekitError(f"{folder}: the manifest's parameter layout does not match its net ({bad}: "
                           f"{list(got[bad]) if bad in got else 'missing'}, the net's shapes give "
                           f"{list(expected[bad]) if bad in expected else 'no such parameter'}); refused")
    if manifest.get("weights_bytes") != total or weights_size != total:
        raise EdgekitError(f"{folder}: {manifest.get('model_file')} has {weights_size} bytes, the manifest says "
                           f"{manifest.get('weights_bytes')}, its net needs {total}; refused")
    net = FoldedGMBINet(in_channels=n["in_channels"], widths=tuple(widths), depths=tuple(depths),
                        out_channels=n["out_channels"], head_width=hw)
    h, w = manifest["preprocess"]["input_size"]
    arena = plan_gmbinet(net, 1, int(h), int(w), "float32", channel_multiple=1).act_bytes
    if arena > MAX_ACTIVATION_BYTES:
        raise EdgekitError(f"{folder}: a {h}x{w} input through this net needs {arena / 2**30:.1f} GiB of activations "
                           f"per image (at most {MAX_ACTIVATION_BYTES >> 30} GiB); refused")
    return net, expected
