"""The whole eval-mode GMBINet on our own CUDA kernels: BN folding of every layer, and ONE planner
that turns a network and an input shape into the exact launch sequence (kernel, grid, block, shared
memory, arguments, buffer layout).

The same :class:`NetPlan` drives both executors:

* :func:`run_net_emulated` runs it on the CPU through the host emulator
  (``edgekit/kernels/cuda/emu/gmbinet_emu_main.cpp``: the same ``.cu`` sources compiled by g++), and
* ``edgekit.backends.cuda_fused.runner`` runs it on a GPU with PyCUDA (optionally as a CUDA graph),

so what the emulator tests is what the GPU runs.  Nothing here needs PyCUDA or a GPU.

Launch sequence (eval mode: main head only), ``5 + sum(depths) + 6`` launches (27 for the
published architecture)::

    stem            x (fp32) -> e1                     gmbinet_stem
    stage s=2..5    DownBlock  e(s-1) -> es            gmbinet_dwpw_s2
                    GMBI x depth[s-2], ping-pong       gmbi_fused
    decoder5        ConvBlock e5 -> d5                 gmbinet_pw
    DF4..DF1        DW(low + up(high)) + PW            gmbinet_dwpw_up
    head            conv_out1 + sigmoid + up -> probs  gmbinet_head (fp32 output)
"""
from __future__ import annotations

import math
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from edgekit.errors import EdgekitError
from edgekit.kernels.gmbi import (
    ARG_FORMAT as GMBI_ARG_FORMAT,
    DEFAULT_SMEM_LIMIT_48K,
    PORTABLE_SMEM_LIMIT,
    THREADS,
    GMBIParams,
    fold_conv_bn,
    fold_gmbi,
    kernel_build_dir,
    kernel_dir,
    plan_gmbi,
)
from edgekit.kernels.cuda_module import _require_pycuda, load_module, source_digest

LAYERS_SOURCE = "gmbinet_layers.cu"  # #includes gmbi_fused.cu: one module holds every network kernel

# kind -> (kernel name prefix, PyCUDA argument format)
KERNEL_KINDS = {
    "stem": ("gmbinet_stem", "PPPPiiiiii"),
    "s2": ("gmbinet_dwpw_s2", "PPPPPPPiiiiiiiiffiiiii"),
    "pw": ("gmbinet_pw", "PPPPPPPiiiiiiiiffiiiii"),
    "up": ("gmbinet_dwpw_up", "PPPPPPPiiiiiiiiffiiiii"),
    "gmbi": ("gmbi_fused", GMBI_ARG_FORMAT),
    "head": ("gmbinet_head", "PPPPiiiiiiff"),
}
SUFFIX = {"float32": "f32", "float16": "f16"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
NET_KERNEL_NAMES = tuple(f"{prefix}_{sfx}" for prefix, _ in KERNEL_KINDS.values() for sfx in SUFFIX.values())
ALIGN = 256  # every parameter array and activation buffer starts on a 256-byte boundary
DWPW_SMEM_LIMIT = DEFAULT_SMEM_LIMIT_48K  # the DW+PW kernels never need the dynamic-smem opt-in
DWPW_TILES = ((16, 16), (8, 16), (8, 8), (4, 8), (4, 4))


def layers_source_path() -> Path:
    path = kernel_dir() / LAYERS_SOURCE
    if not path.is_file():
        raise EdgekitError(f"the GMBINet layer kernels are missing: {path} (set EDGEKIT_KERNEL_DIR to the folder "
                           f"holding {LAYERS_SOURCE} and gmbi_fused.cu)")
    return path


def kernel_name(kind: str, dtype: str) -> str:
    return f"{KERNEL_KINDS[kind][0]}_{SUFFIX[dtype]}"


def _dtype(dtype) -> str:
    name = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}.get(str(dtype))
    if name is None:
        try:
            name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(np.dtype(dtype))
        except TypeError:
            name = None
    if name is None:
        raise EdgekitError(f"GMBINet kernels: precision must be fp32 or fp16, got {dtype!r}")
    return name


# ----------------------------------------------------------------------------------------------
# BN folding of the whole network


@dataclass
class FoldedLayer:
    """One launch's parameters, fp32 and in the kernel's layout."""

    name: str
    kind: str  # a KERNEL_KINDS key
    cin: int
    cout: int
    arrays: Dict[str, np.ndarray]


@dataclass
class FoldedGMBINet:
    in_channels: int
    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    out_channels: int
    head_width: int  # DF1's output channels = the head's input (widths[0] unless pruned)
    layers: Dict[str, FoldedLayer] = field(default_factory=dict)
    gmbi: Dict[str, GMBIParams] = field(default_factory=dict)  # float64 originals, for references

    def param_layout(self) -> Tuple[np.ndarray, Dict[str, Tuple[int, int]]]:
        """All parameter arrays in one byte blob (each 256-byte aligned): (blob, {"layer.array": (offset, nbytes)}).
        Float arrays are stored as fp32, integer arrays (the CPU INT8 path's packed weights) byte for byte."""
        offsets: Dict[str, Tuple[int, int]] = {}
        pos = 0
        for lname, layer in self.layers.items():
            for aname, arr in layer.arrays.items():
                offsets[f"{lname}.{aname}"] = (pos, arr.nbytes)
                pos += -(-arr.nbytes // ALIGN) * ALIGN
        blob = np.zeros(max(pos, ALIGN), dtype=np.uint8)
        for lname, layer in self.layers.items():
            for aname, arr in layer.arrays.items():
                off, nb = offsets[f"{lname}.{aname}"]
                a = np.ascontiguousarray(arr)  # float arrays as fp32; packed integer words as they are
                a = a.astype(np.float32) if a.dtype.kind == "f" else a
                blob[off:off + nb] = np.frombuffer(a.tobytes(), np.uint8)
        return blob, offsets


def _f32(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def _seq_parts(seq: nn.Module, n_convs: int, where: str) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    parts = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    out = []
    for i in range(n_convs):
        trio = parts[3 * i:3 * i + 3]
        if (len(trio) != 3 or not isinstance(trio[0], nn.Conv2d) or not isinstance(trio[1], nn.BatchNorm2d)
                or not isinstance(trio[2], nn.ReLU)):
            raise EdgekitError(f"GMBINet fold: {where} is not {n_convs} x (Conv2d + BatchNorm2d + ReLU)")
        out.append((trio[0], trio[1]))
    if len(parts) != 3 * n_convs:
        raise EdgekitError(f"GMBINet fold: {where} has {len(parts)} modules, expected {3 * n_convs}")
    return out


def _check_conv(conv: nn.Conv2d, where: str, *, k: int, stride: int, groups: int, cin: int, cout: int):
    if (tuple(conv.kernel_size) != (k, k) or tuple(conv.stride) != (stride, stride) or conv.groups != groups
            or conv.in_channels != cin or conv.out_channels != cout or tuple(conv.dilation) != (1, 1)
            or tuple(conv.padding) != (k // 2, k // 2)):
        raise EdgekitError(f"GMBINet fold: {where} is not a {k}x{k} stride-{stride} conv {cin}->{cout} "
                           f"(groups {groups}, padding {k // 2})")


def _fold_dw(conv, bn, where, c, stride):
    _check_conv(conv, where, k=3, stride=stride, groups=c, cin=c, cout=c)
    w, b = fold_conv_bn(conv, bn)
    return {"dw_w": _f32(w.reshape(c, 9)), "dw_b": _f32(b)}


def _fold_pw(conv, bn, where, cin, cout):
    _check_conv(conv, where, k=1, stride=1, groups=1, cin=cin, cout=cout)
    w, b = fold_conv_bn(conv, bn)
    return {"pw_wt": _f32(w.reshape(cout, cin).t()), "pw_b": _f32(b)}


def fold_gmbinet(model: nn.Module, channel_multiple: int = 4) -> FoldedGMBINet:
    """Fold every BatchNorm of an eval-mode ``GMBINet`` (running statistics) into its conv, in
    float64, and lay the parameters out as the kernels read them (fp32).

    ``channel_multiple``: what every stage width and the head width must be a multiple of for the
    target's kernels (the CUDA kernels' float4 loads over output channels: 4, the default; the CPU
    kernels take any count: 1). The GMBI stage widths are multiples of 4 whatever it is: the model's
    4 equal channel groups need that (``GMBINetConfig`` refuses anything else)."""
    from edgekit.models.gmbinet import GMBINet

    if not isinstance(model, GMBINet):
        raise EdgekitError(f"fold_gmbinet expects a GMBINet, got {type(model).__name__}")
    cfg = model.config
    w, d = tuple(cfg.widths), tuple(cfg.depths)
    if cfg.scales != 4:
        raise EdgekitError(f"the fused GMBI kernel is written for 4 groups, this GMBINet has scales={cfg.scales}")
    hw = int(getattr(cfg, "head_width", None) or w[0])
    if any(c % 4 for c in w[1:]):
        raise EdgekitError(f"GMBINet fold: the GMBI stage widths {list(w[1:])} do not split into 4 equal groups")
    if channel_multiple > 1 and any(c % channel_multiple for c in (*w, hw)):
        raise EdgekitError(f"the GMBINet kernels need stage widths (and the head width) divisible by {channel_multiple}, "
                           f"got {list(w)} (head {hw})")
    net = FoldedGMBINet(in_channels=cfg.in_channels, widths=w, depths=d, out_channels=cfg.out_channels,
                        head_width=hw)

    (conv, bn), = _seq_parts(model.encoder1, 1, "encoder1")
    _check_conv(conv, "encoder1", k=3, stride=2, groups=1, cin=cfg.in_channels, cout=w[0])
    sw, sb = fold_conv_bn(conv, bn)  # [w0, cin, 3, 3] -> [cin*9][w0]: a float4 is 4 consecutive outputs
    net.layers["stem"] = FoldedLayer("stem", "stem", cfg.in_channels, w[0],
                                     {"w": _f32(sw.permute(1, 2, 3, 0).reshape(cfg.in_channels * 9, w[0])),
                                      "b": _f32(sb)})
    for s in range(2, 6):
        enc = getattr(model, f"encoder{s}")
        blocks = list(enc.children())
        if len(blocks) != 1 + d[s - 2]:
            raise EdgekitError(f"GMBINet fold: encoder{s} has {len(blocks)} blocks, expected {1 + d[s - 2]}")
        (c1, b1), (c2, b2) = _seq_parts(blocks[0].conv, 2, f"encoder{s}.0")
        arrays = {**_fold_dw(c1, b1, f"encoder{s}.0 depthwise", w[s - 2], 2),
                  **_fold_pw(c2, b2, f"encoder{s}.0 pointwise", w[s - 2], w[s - 1])}
        net.layers[f"down{s}"] = FoldedLayer(f"down{s}", "s2", w[s - 2], w[s - 1], arrays)
        for i, blk in enumerate(blocks[1:], start=1):
            p = fold_gmbi(blk)
            if p.channels != w[s - 1] or p.scales != 4:
                raise EdgekitError(f"GMBINet fold: encoder{s}.{i} has {p.channels} channels, expected {w[s - 1]}")
            name = f"gmbi{s}_{i}"
            net.gmbi[name] = p
            net.layers[name] = FoldedLayer(name, "gmbi", p.channels, p.channels, p.kernel_arrays())
    (conv, bn), = _seq_parts(model.decoder5.conv, 1, "decoder5")
    net.layers["decoder5"] = FoldedLayer("decoder5", "pw", w[4], w[3], _fold_pw(conv, bn, "decoder5", w[4], w[3]))
    for name, cin, cout in (("DF4", w[3], w[2]), ("DF3", w[2], w[1]), ("DF2", w[1], w[0]), ("DF1", w[0], hw)):
        (c1, b1), (c2, b2) = _seq_parts(getattr(model, name).conv, 2, name)
        arrays = {**_fold_dw(c1, b1, f"{name} depthwise", cin, 1), **_fold_pw(c2, b2, f"{name} pointwise", cin, cout)}
        net.layers[name] = FoldedLayer(name, "up", cin, cout, arrays)
    head = [m for m in model.conv_out1.children() if isinstance(m, nn.Conv2d)]
    if len(head) != 1:
        raise EdgekitError("GMBINet fold: conv_out1 has no single Conv2d")
    hc = head[0]
    _check_conv(hc, "conv_out1", k=1, stride=1, groups=1, cin=hw, cout=cfg.out_channels)
    hb = hc.bias if hc.bias is not None else hc.weight.new_zeros(cfg.out_channels)
    net.layers["head"] = FoldedLayer("head", "head", hw, cfg.out_channels,
                                     {"w": _f32(hc.weight.reshape(cfg.out_channels, hw)), "b": _f32(hb)})
    return net


# ----------------------------------------------------------------------------------------------
# the planner


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: Tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Launch:
    """One kernel launch.  ``args`` are (kind, value): ("param", "layer.array"), ("act", buffer
    name), ("int", v) or ("float", v), in the kernel's argument order (``fmt``)."""

    layer: str
    kind: str
    kernel: str
    fmt: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    smem_bytes: int
    args: Tuple[Tuple[str, object], ...]

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class NetPlan:
    n: int
    height: int
    width: int
    dtype: str
    buffers: Dict[str, Buffer]
    launches: List[Launch]
    act_bytes: int
    input: str = "input"
    output: str = "output"

    def resolve(self, param_offsets: Dict[str, Tuple[int, int]], param_base: int, act_base: int):
        """[(launch, [argument values])] with pointers as ``base + offset`` (device or emulator addresses)."""
        out = []
        for ln in self.launches:
            vals = []
            for kind, v in ln.args:
                if kind == "param":
                    vals.append(int(param_base) + param_offsets[v][0])
                elif kind == "act":
                    vals.append(int(act_base) + self.buffers[v].offset)
                elif kind == "int":
                    vals.append(int(v))
                else:
                    vals.append(float(v))
            out.append((ln, vals))
        return out

    def max_smem(self, kernel: str) -> int:
        return max((ln.smem_bytes for ln in self.launches if ln.kernel == kernel), default=0)

    def summary(self) -> str:
        rows = [f"GMBINet plan: N={self.n} {self.height}x{self.width} {self.dtype}, {len(self.launches)} launches, "
                f"activations {self.act_bytes / 1e6:.2f} MB",
                "layer      kernel                grid             smem B   blocks"]
        for ln in self.launches:
            rows.append(f"{ln.layer:<10} {ln.kernel:<21} {str(ln.grid):<16} {ln.smem_bytes:>7}  {ln.blocks:>6}")
        return "\n".join(rows)


def conv_s2_size(h: int) -> int:
    """Output size of a 3x3 stride-2 conv with padding 1."""
    return (h - 1) // 2 + 1


def nearest_scale(in_size: int, out_size: int) -> float:
    """PyTorch's fp32 scale of a nearest resize to a given size: float(in) / float(out)."""
    return float(np.float32(in_size) / np.float32(out_size))


def _split_channels(blocks: int, cout: int, sm_count: int) -> Tuple[int, int]:
    s = 1
    while blocks * s < sm_count and cout // (2 * s) >= 8 and (cout // (2 * s)) % 4 == 0:
        s *= 2
    co_per_block = 4 * math.ceil(math.ceil(cout / s) / 4)
    return co_per_block, math.ceil(cout / co_per_block)


def plan_dwpw(n: int, cin: int, cout: int, h: int, w: int, sm_count: int = 132,
              smem_limit: int = DWPW_SMEM_LIMIT, channel_multiple: int = 4) -> Tuple[int, int, int, int, int]:
    """(tile_h, tile_w, co_per_block, co_splits, smem_bytes) for a DW+PW launch with an h x w
    output: the largest tile of ``DWPW_TILES`` that fits ``smem_limit`` and still gives
    ``sm_count`` blocks (else the smallest that fits), then output-channel splits as for GMBI.
    ``channel_multiple`` 1: a plan only the CPU kernels run (they ignore the CUDA tiling)."""
    if cout % channel_multiple:
        raise EdgekitError(f"GMBINet kernels: output channels must be a multiple of 4, got {cout}")
    chosen = None
    for th, tw in DWPW_TILES:
        th, tw = min(th, h), min(tw, w)
        smem = 4 * cin * th * tw
        if smem > smem_limit:
            continue
        blocks = n * math.ceil(h / th) * math.ceil(w / tw)
        chosen = (th, tw, blocks, smem)
        if blocks >= sm_count:
            break
    if chosen is None:
        raise EdgekitError(f"GMBINet kernels: {cin} input channels do not fit {smem_limit} bytes of shared memory")
    th, tw, blocks, smem = chosen
    co_per_block, splits = _split_channels(blocks, cout, sm_count)
    return th, tw, co_per_block, splits, smem


def plan_gmbinet(net: FoldedGMBINet, n: int, height: int, width: int, dtype="float16", *, sm_count: int = 132,
                 smem_limit: int = PORTABLE_SMEM_LIMIT, channel_multiple: int = 4) -> NetPlan:
    """The launch sequence and activation buffer layout for ``n`` images of ``height x width``.

    ``sm_count`` / ``smem_limit`` are the device's (the GMBI launches may opt in to more than 48 KB
    of dynamic shared memory; the others stay below). ``channel_multiple`` as in ``fold_gmbinet``:
    1 for the CPU kernels, which take any width and ignore the CUDA tiling."""
    dtype = _dtype(dtype)
    if min(n, height, width) < 1:
        raise EdgekitError(f"GMBINet kernels: empty input {n}x{net.in_channels}x{height}x{width}")
    w, d = net.widths, net.depths
    buffers: Dict[str, Buffer] = {}
    pos = 0

    def buf(name, c, h, wd, dt=dtype):
        nonlocal pos
        nb = n * c * h * wd * np.dtype(NP_DTYPES[dt]).itemsize
        buffers[name] = Buffer(name, (n, c, h, wd), dt, pos, nb)
        pos += -(-nb // ALIGN) * ALIGN
        return name

    sizes = [(height, width)]
    for _ in range(5):
        sizes.append((conv_s2_size(sizes[-1][0]), conv_s2_size(sizes[-1][1])))
    # sizes[k] = resolution of e_k (k = 1..5); sizes[0] = input
    buf("input", net.in_channels, height, width, "float32")
    launches: List[Launch] = []
    block = (THREADS, 1, 1)

    def add(layer, kind, grid, smem, args):
        kname = kernel_name(kind, dtype)
        fmt = KERNEL_KINDS[kind][1]
        if len(args) != len(fmt):
            raise AssertionError(f"{layer}: {len(args)} arguments for format {fmt}")
        if grid[1] > 65535 or grid[2] > 65535:
            raise EdgekitError(f"GMBINet kernels: grid {grid} of {layer} exceeds the CUDA limits; use a smaller batch")
        launches.append(Launch(layer, kind, kname, fmt, tuple(grid), block, int(smem), tuple(args)))

    P = lambda layer, arr: ("param", f"{layer}.{arr}")  # noqa: E731
    A = lambda name: ("act", name)  # noqa: E731
    I = lambda v: ("int", int(v))  # noqa: E731, E741
    F = lambda v: ("float", float(v))  # noqa: E731

    # stem
    h1, w1 = sizes[1]
    feats = {1: buf("e1", w[0], h1, w1)}
    add("stem", "stem", (math.ceil(h1 * w1 / THREADS), n, 1), 0,
        [A("input"), A("e1"), P("stem", "w"), P("stem", "b"), I(net.in_channels), I(w[0]), I(height), I(width),
         I(h1), I(w1)])

    def dwpw(layer, kind, x, high, out, cin, cout, hw_out, hw_in, hw_high):
        (ho, wo), (hi, wi), (hh, wh) = hw_out, hw_in, hw_high
        th, tw, cob, splits, smem = plan_dwpw(n, cin, cout, ho, wo, sm_count=sm_count, channel_multiple=channel_multiple)
        has_dw = kind != "pw"
        add(layer, kind, (math.ceil(wo / tw), math.ceil(ho / th), n * splits), smem,
            [A(x), A(high if high else x), A(out),
             P(layer, "dw_w" if has_dw else "pw_b"), P(layer, "dw_b" if has_dw else "pw_b"),
             P(layer, "pw_wt"), P(layer, "pw_b"), I(cin), I(cout), I(ho), I(wo), I(hi), I(wi), I(hh), I(wh),
             F(nearest_scale(hh, ho)), F(nearest_scale(wh, wo)), I(th), I(tw), I(cob), I(splits), I(smem // 4)])

    for s in range(2, 6):
        hs, ws = sizes[s]
        a, b = buf(f"e{s}a", w[s - 1], hs, ws), buf(f"e{s}b", w[s - 1], hs, ws)
        dwpw(f"down{s}", "s2", feats[s - 1], None, a, w[s - 2], w[s - 1], (hs, ws), sizes[s - 1], sizes[s - 1])
        cur, other = a, b
        for i in range(1, d[s - 2] + 1):
            layer = f"gmbi{s}_{i}"
            p = plan_gmbi(n, w[s - 1], hs, ws, sm_count=sm_count, smem_limit=smem_limit)
            add(layer, "gmbi", p.grid, p.smem_bytes,
                [A(cur), A(other), P(layer, "dw_w"), P(layer, "dw_b"), P(layer, "pw_wt"), P(layer, "pw_b"),
                 *(I(v) for v in p.scalar_args())])
            cur, other = other, cur
        feats[s] = cur

    h5, w5 = sizes[5]
    buf("d5", w[3], h5, w5)
    dwpw("decoder5", "pw", feats[5], None, "d5", w[4], w[3], (h5, w5), (h5, w5), (h5, w5))
    high = "d5"
    for name, k, cin, cout in (("DF4", 4, w[3], w[2]), ("DF3", 3, w[2], w[1]), ("DF2", 2, w[1], w[0]),
                               ("DF1", 1, w[0], net.head_width)):
        hk, wk = sizes[k]
        out = buf(f"d{k}", cout, hk, wk)
        hh, wh = buffers[high].shape[2:]
        dwpw(name, "up", feats[k], high, out, cin, cout, (hk, wk), (hk, wk), (hh, wh))
        high = out
    buf("output", net.out_channels, height, width, "float32")
    add("head", "head", (math.ceil(height * width / THREADS), n, 1), 0,
        [A("d1"), A("output"), P("head", "w"), P("head", "b"), I(net.head_width), I(net.out_channels), I(h1), I(w1),
         I(height), I(width), F(nearest_scale(h1, height)), F(nearest_scale(w1, width))])
    return NetPlan(n=n, height=height, width=width, dtype=dtype, buffers=buffers, launches=launches,
                   act_bytes=max(pos, ALIGN))


# ----------------------------------------------------------------------------------------------
# host emulation of a whole plan (CPU test harness; see edgekit/kernels/cuda/emu/gmbinet_emu_main.cpp)


def _plan_text(plan: NetPlan, param_offsets: Dict[str, Tuple[int, int]]) -> str:
    lines = [f"params {len(param_offsets)}"]
    lines += [f"{off} {nb}" for off, nb in param_offsets.values()]
    lines.append(f"acts {len(plan.buffers)}")
    lines += [f"{b.offset} {b.nbytes}" for b in plan.buffers.values()]
    lines.append(f"launches {len(plan.launches)}")
    for ln in plan.launches:
        toks = [ln.kernel, ln.fmt, *map(str, ln.grid), *map(str, ln.block), str(ln.smem_bytes)]
        for kind, v in ln.args:
            if kind == "param":
                toks.append(f"p{param_offsets[v][0]}")
            elif kind == "act":
                toks.append(f"a{plan.buffers[v].offset}")
            elif kind == "int":
                toks.append(f"i{int(v)}")
            else:  # the exact fp32 bits
                toks.append(f"f{int(np.array(v, dtype=np.float32).view(np.uint32))}")
        lines.append(" ".join(toks))
    return "\n".join(lines) + "\n"


def run_net_emulated(exe: Union[str, Path], net: FoldedGMBINet, plan: NetPlan, x: np.ndarray,
                     timeout: float = 1800) -> Dict[str, np.ndarray]:
    """Run a whole plan under host emulation (``build_emulator(..., program="gmbinet")``) on a float32
    NCHW batch.  Activation buffers start poisoned with NaN (all bytes 0xFF); returns every buffer
    after the run, by name (``plan.output`` is the probability map)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    inp = plan.buffers[plan.input]
    if tuple(x.shape) != inp.shape:
        raise EdgekitError(f"run_net_emulated: x shape {x.shape} does not match the plan's {inp.shape}")
    blob, offsets = net.param_layout()
    acts = np.full(plan.act_bytes, 0xFF, dtype=np.uint8)
    acts[inp.offset:inp.offset + inp.nbytes] = np.frombuffer(x.tobytes(), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "plan.txt").write_text(_plan_text(plan, offsets))
        blob.tofile(t / "params.bin")
        acts.tofile(t / "acts.bin")
        proc = subprocess.run([str(exe), str(t / "plan.txt"), str(t / "params.bin"), str(t / "acts.bin"),
                               str(t / "out.bin")], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise EdgekitError(f"emulated GMBINet failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = np.fromfile(t / "out.bin", dtype=np.uint8)
    if out.size != plan.act_bytes:
        raise EdgekitError(f"emulated GMBINet wrote {out.size} bytes, expected {plan.act_bytes}")
    return {name: out[b.offset:b.offset + b.nbytes].view(NP_DTYPES[b.dtype]).reshape(b.shape).copy()
            for name, b in plan.buffers.items()}


# ----------------------------------------------------------------------------------------------
# the network's kernel module on a GPU (PyCUDA)

def load_net_module(arch: Optional[str] = None, build_dir: Optional[Path] = None):
    """The ``pycuda.driver.Module`` holding every network kernel (``gmbinet_layers.cu``) for the
    current context: a prebuilt cubin/fatbin whose manifest matches the sources (in ``build_dir``, e.g.
    a cuda-fused artifact's ``kernels/``, else the default build folder), otherwise compiled at load
    time with ``pycuda.compiler`` (nvcc on PATH; see ``edgekit.kernels.cuda_module.load_module``)."""
    _require_pycuda()
    return load_module(layers_source_path(), Path(build_dir) if build_dir is not None else kernel_build_dir(), arch)


def launch_count(depths: Sequence[int]) -> int:
    """Launches per forward pass: stem, 4 down blocks, the GMBI modules, decoder5, 4 DF, head."""
    return 1 + 4 + sum(depths) + 1 + 4 + 1


__all__ = ["FoldedGMBINet", "FoldedLayer", "NetPlan", "Launch", "Buffer", "fold_gmbinet", "plan_gmbinet",
           "plan_dwpw", "run_net_emulated", "kernel_name", "layers_source_path", "NET_KERNEL_NAMES",
           "KERNEL_KINDS", "launch_count", "nearest_scale", "load_net_module", "source_digest"]
