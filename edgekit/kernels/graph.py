"""The shared graph of GMBINet's own kernels, device-neutral (numpy only): the folded network's
parameter layout, and ONE planner that turns a network and an input shape into the exact launch
sequence (kernel, grid, block, shared memory, arguments, buffer layout).

The plan is written in the CUDA kernels' launch terms (grids, blocks, shared memory, the kernels'
argument order), and every executor takes it as it is:

* ``edgekit.kernels.cuda``: the GPU (``edgekit.backends.cuda_fused``, PyCUDA) and the host emulator
  (the same ``.cu`` sources compiled by g++, ``edgekit.kernels.cuda.gmbinet.run_net_emulated``), so
  what the emulator tests is what the GPU runs;
* ``edgekit.kernels.cpu``: the fused CPU kernels (``cpu-fused``), which take each launch's buffers,
  parameters and shapes and cut the work into bands of rows instead of CUDA blocks.

Folding a PyTorch model into a :class:`FoldedGMBINet` is build-side (``edgekit.kernels.fold``, which
needs torch); a device loads a folded network from an artifact and needs only this module.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import EdgekitError

if TYPE_CHECKING:  # the build side's float64 originals; a device never has them
    from edgekit.kernels.fold import GMBIParams

# ----------------------------------------------------------------------------------------------
# the CUDA kernels' launch constants (the plan is written in their terms)

THREADS = 256  # GMBI_THREADS in the kernel
WARPS = THREADS // 32
HALO_R1, HALO_R2, HALO_R3 = 9, 7, 4  # GMBI_HALO_* in the kernel
MAX_GROUP_CHANNELS = 32
# The largest dynamic shared memory a block can opt in to: sm_89 99 KB, sm_87 163 KB, sm_90 227 KB.
PORTABLE_SMEM_LIMIT = 99 * 1024
DEFAULT_SMEM_LIMIT_48K = 48 * 1024  # above this a kernel must opt in (cuFuncSetAttribute)
KERNEL_NAMES = {"float32": "gmbi_fused_f32", "float16": "gmbi_fused_f16"}
# PyCUDA argument format: x, out, dw_w, dw_b, pw_wt, pw_b, then C H W tile_h tile_w co_per_block
# co_splits buf_a buf_b.
ARG_FORMAT = "PPPPPPiiiiiiiii"


# kind -> (kernel name prefix, PyCUDA argument format)
KERNEL_KINDS = {
    "stem": ("gmbinet_stem", "PPPPiiiiii"),
    "s2": ("gmbinet_dwpw_s2", "PPPPPPPiiiiiiiiffiiiii"),
    "pw": ("gmbinet_pw", "PPPPPPPiiiiiiiiffiiiii"),
    "up": ("gmbinet_dwpw_up", "PPPPPPPiiiiiiiiffiiiii"),
    "gmbi": ("gmbi_fused", ARG_FORMAT),
    "head": ("gmbinet_head", "PPPPiiiiiiff"),
}
_DWPW_ARGS = ("x", "high", "out", "dw_w", "dw_b", "pw_wt", "pw_b", "cin", "cout", "ho", "wo", "hi", "wi", "hh", "wh",
              "sh", "sw", "tile_h", "tile_w", "co_per_block", "co_splits", "smem_floats")
# kind -> the name of each kernel argument, in the kernel's order (one per letter of its format): executors
# read a launch's arguments by name (Launch.named), never by position
KERNEL_ARGS = {
    "stem": ("x", "out", "w", "b", "cin", "cout", "H", "W", "h1", "w1"),
    "s2": _DWPW_ARGS, "pw": _DWPW_ARGS, "up": _DWPW_ARGS,
    "gmbi": ("x", "out", "dw_w", "dw_b", "pw_wt", "pw_b", "C", "H", "W", "tile_h", "tile_w", "co_per_block",
             "co_splits", "buf_a", "buf_b"),
    "head": ("x", "out", "w", "b", "cin", "cout", "h1", "w1", "H", "W", "sh", "sw"),
}
SUFFIX = {"float32": "f32", "float16": "f16"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
NET_KERNEL_NAMES = tuple(f"{prefix}_{sfx}" for prefix, _ in KERNEL_KINDS.values() for sfx in SUFFIX.values())
ALIGN = 256  # every parameter array and activation buffer starts on a 256-byte boundary
DWPW_SMEM_LIMIT = DEFAULT_SMEM_LIMIT_48K  # the DW+PW kernels never need the dynamic-smem opt-in
DWPW_TILES = ((16, 16), (8, 16), (8, 8), (4, 8), (4, 4))


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


# ----------------------------------------------------------------------------------------------
# launch planning (pure Python)


@dataclass(frozen=True)
class GMBIPlan:
    """Launch configuration of the fused kernel for one input shape."""

    n: int
    channels: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    co_per_block: int
    co_splits: int
    buf_a: int  # floats per warp, halo-7 region
    buf_b: int  # floats per warp, halo-9 region (reused for the halo-4 region)
    smem_bytes: int
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int] = (THREADS, 1, 1)

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def scalar_args(self) -> Tuple[int, ...]:
        return (self.channels, self.height, self.width, self.tile_h, self.tile_w, self.co_per_block,
                self.co_splits, self.buf_a, self.buf_b)


def smem_layout(channels: int, tile_h: int, tile_w: int, height: int, width: int) -> Tuple[int, int, int]:
    """(buf_a, buf_b, smem_bytes) for a tile; see the shared-memory comment in gmbi_fused.cu."""
    buf_b = min(tile_h + 2 * HALO_R1, height) * min(tile_w + 2 * HALO_R1, width)
    buf_a = min(tile_h + 2 * HALO_R2, height) * min(tile_w + 2 * HALO_R2, width)
    lane_warps = min(channels // 4, WARPS)
    return buf_a, buf_b, 4 * (channels * tile_h * tile_w + lane_warps * (buf_a + buf_b))


TILE_CANDIDATES = ((16, 16), (8, 16), (8, 8))


def plan_gmbi(n: int, channels: int, height: int, width: int, *, sm_count: int = 132,
              smem_limit: int = PORTABLE_SMEM_LIMIT, tile: Optional[Tuple[int, int]] = None,
              co_splits: Optional[int] = None) -> GMBIPlan:
    """Choose tile size and output-channel split for an input of ``[n, channels, height, width]``.

    Heuristic (to be replaced by measurements on the target GPU): among the tiles of
    ``TILE_CANDIDATES`` whose shared memory leaves room for two blocks per SM (if any), the largest
    that still gives at least ``sm_count`` blocks (else the smallest), then split
    the output channels over 2, 4, ... blocks (each recomputing z for its tile, which is cheap next
    to the 1x1 conv) until there are ``sm_count`` blocks or a block would get fewer than 8 outputs.
    ``tile`` / ``co_splits`` override the heuristic.
    """
    if min(n, height, width) < 1:
        raise EdgekitError(f"fused GMBI: empty input [{n}, {channels}, {height}, {width}]")
    if channels % 4 or not 1 <= channels // 4 <= MAX_GROUP_CHANNELS:
        raise EdgekitError(f"fused GMBI: channels must be 4 * G with 1 <= G <= {MAX_GROUP_CHANNELS}, got {channels}")
    candidates = [tuple(tile)] if tile is not None else list(TILE_CANDIDATES)
    chosen = None
    # First pass: only tiles that leave room for two resident blocks per SM; second: any that fits.
    for limit in ((smem_limit,) if tile is not None else (smem_limit // 2, smem_limit)):
        for th, tw in candidates:
            if th < 1 or tw < 1:
                raise EdgekitError(f"fused GMBI: bad tile {th}x{tw}")
            th, tw = min(th, height), min(tw, width)
            _, _, smem = smem_layout(channels, th, tw, height, width)
            if smem > limit:
                if tile is not None:
                    raise EdgekitError(
                        f"fused GMBI: tile {th}x{tw} with {channels} channels needs {smem} bytes of shared memory, "
                        f"more than the {smem_limit} available")
                continue
            blocks = n * math.ceil(height / th) * math.ceil(width / tw)
            chosen = (th, tw, blocks)
            if blocks >= sm_count:
                break
        if chosen is not None:
            break
    if chosen is None:
        raise EdgekitError(f"fused GMBI: no tile fits in {smem_limit} bytes of shared memory with {channels} channels")
    th, tw, blocks = chosen
    if co_splits is None:
        s = 1
        while blocks * s < sm_count and channels // (2 * s) >= 8 and (channels // (2 * s)) % 4 == 0:
            s *= 2
    else:
        s = int(co_splits)
        if s < 1:
            raise EdgekitError(f"fused GMBI: co_splits must be >= 1, got {co_splits}")
    co_per_block = 4 * math.ceil(math.ceil(channels / s) / 4)
    s = math.ceil(channels / co_per_block)
    buf_a, buf_b, smem = smem_layout(channels, th, tw, height, width)
    grid = (math.ceil(width / tw), math.ceil(height / th), n * s)
    if grid[1] > 65535 or grid[2] > 65535:
        raise EdgekitError(f"fused GMBI: grid {grid} exceeds the CUDA limits; use a smaller batch")
    return GMBIPlan(n=n, channels=channels, height=height, width=width, tile_h=th, tile_w=tw,
                    co_per_block=co_per_block, co_splits=s, buf_a=buf_a, buf_b=buf_b, smem_bytes=smem, grid=grid)


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

    def named(self, values: Sequence) -> Dict[str, object]:
        """{argument name: value} for this launch's resolved argument ``values`` (``NetPlan.resolve``)."""
        return dict(zip(KERNEL_ARGS[self.kind], values))


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
        if not len(args) == len(fmt) == len(KERNEL_ARGS[kind]):
            raise AssertionError(f"{layer}: {len(args)} arguments for format {fmt} ({len(KERNEL_ARGS[kind])} names)")
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


def launch_count(depths: Sequence[int]) -> int:
    """Launches per forward pass: stem, 4 down blocks, the GMBI modules, decoder5, 4 DF, head."""
    return 1 + 4 + sum(depths) + 1 + 4 + 1



__all__ = ["ALIGN", "Buffer", "FoldedGMBINet", "FoldedLayer", "GMBIPlan", "KERNEL_ARGS", "KERNEL_KINDS", "Launch", "NET_KERNEL_NAMES",
           "NetPlan", "kernel_name", "launch_count", "nearest_scale", "plan_dwpw", "plan_gmbi", "plan_gmbinet"]
