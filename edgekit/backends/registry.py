"""The backend registry: one ``BackendSpec`` per backend, registered by the module that defines it.

Everything that depends on which backends exist is read from here: ``edgekit compile --target``
choices and help, the precisions each target offers, the default ``edgekit bench`` rows, tool
versions in manifests, capability checks (device, INT8 quantizer, calibration) and the loader
``edgekit.runtime.load`` uses for an artifact folder. A backend's name is the one name used
everywhere: the CLI, ``manifest["target"]``, bench rows and error messages.

Adding a backend = one module that calls ``register_backend(BackendSpec(...))`` at import, plus its
line in ``BACKEND_MODULES`` (modules are imported lazily: listing choices imports no heavy package).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from edgekit.errors import EdgekitError, MissingBackendError

# The one list of backend modules (timm-style: each registers itself when imported).
BACKEND_MODULES = (
    "edgekit.backends.torch_eager",
    "edgekit.backends.onnxruntime",
    "edgekit.backends.openvino",
    "edgekit.backends.tensorrt",
    "edgekit.backends.cuda_fused",
    "edgekit.backends.cpu_fused",
    "edgekit.backends.executorch",
)


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is and can do.

    ``build(ctx)`` writes the model files into ``ctx.folder`` and returns manifest fields
    (``model_file``, optional ``extra_files`` and anything else worth recording);
    ``load(folder, **options)`` returns a ``Runner`` (``load_options`` names the options it takes; any other
    is refused by ``load_kwargs``).
    """

    name: str
    description: str
    precisions: Tuple[str, ...]
    build: Optional[Callable] = None  # None: not a compile target (torch runs checkpoints as they are)
    load: Optional[Callable] = None
    package: Optional[str] = None  # import name needed to build and run (None: nothing beyond edgekit)
    pip_name: Optional[str] = None
    extra: Optional[str] = None  # the edgekit extra that installs it
    device: str = "cpu"  # cpu | gpu
    # "nncf": the pipeline quantizes the built file with NNCF (``quantize_format`` says which model format);
    # "builder": build() quantizes itself from ctx.calibration; None: no INT8
    int8: Optional[str] = None
    quantize_format: Optional[str] = None  # onnx | openvino (for int8 == "nncf")
    # precision -> what the build needs: "calibration" (real images given by --calib)
    needs: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    load_options: Tuple[str, ...] = ("threads",)
    async_queue: bool = False  # the runner offers throughput_queue(batch, jobs)
    tools: Tuple[str, ...] = ()  # pip package names recorded in manifest["tools"]
    bench_default: Tuple[str, ...] = ()  # precisions in `edgekit bench`'s default rows
    # optional: () -> None, or why this machine cannot build it (no compiler, an ISA it lacks): default rows skip it
    # optional: (manifest) -> None, or why an artifact built earlier no longer matches this edgekit (a cache rebuilds it)
    outdated: Optional[Callable[[dict], Optional[str]]] = None
    not_here: Optional[Callable[[], Optional[str]]] = None
    # optional: (precision) -> None, or why this machine cannot run that one precision (--precision auto skips it)
    precision_not_here: Optional[Callable[[str], Optional[str]]] = None
    kinds: Tuple[str, ...] = ("gmbinet",)  # model kinds it compiles
    # artifact targets it can be compiled from (besides checkpoints); None: any float artifact
    from_artifacts: Optional[Tuple[str, ...]] = None
    # optional: (folder, precision, log) -> (runner, images, method) used for the compile-time parity check
    verifier: Optional[Callable] = None
    # load options of a benchmark row, e.g. {"graph": {"cuda_graph": True}} (torch's variants)
    variants: Dict[str, dict] = field(default_factory=dict)
    # plain model files (no manifest) ``load`` also runs, by suffix, with the default preprocessing
    model_suffixes: Tuple[str, ...] = ()
    # ``edgekit bench --device gpu`` (edgekit.bench.gpu reads only these, as the CPU bench reads
    # ``bench_default``): the precisions of its default rows, for each of ``variants`` where there are
    # some (torch: eager, graph, compile), and the load options every GPU row passes (torch: device=cuda).
    gpu_bench_default: Tuple[str, ...] = ()
    gpu_load_options: Dict[str, object] = field(default_factory=dict)
    # load() takes a checkpoint as it is (GPU bench rows skip the compile); torch always does (build is None)
    runs_checkpoints: bool = False
    # build() works without ``package`` (cuda-fused: nvcc and host emulation build and verify it; only
    # running it needs PyCUDA), so ``check`` does not require the package for a compile
    builds_without_package: bool = False
    # every free channel count of a GMBINet it compiles (the five stage widths and the head width) must be
    # a multiple of this (its kernels' vector width); `edgekit prune` rounds what it keeps to the least
    # common multiple over every registered backend (``common_channel_multiple``). 1: any count.
    channel_multiple: int = 1

    @property
    def compile_precisions(self) -> Tuple[str, ...]:
        """What ``edgekit compile`` offers: the precisions, plus ``auto`` where there is a choice to measure
        here (CPU targets: ``auto`` times the candidates on this machine)."""
        choice = [p for p in self.precisions if p != "default"]
        return self.precisions + (("auto",) if len(choice) > 1 and self.device == "cpu" else ())

    def available(self) -> bool:
        if self.package is None:
            return True
        try:
            return importlib.util.find_spec(self.package) is not None
        except ValueError:  # imported already, without a module spec (a stand-in module): it is there
            return True

    def install_hint(self) -> str:
        return f"pip install 'edgekit[{self.extra}]'" if self.extra else f"pip install {self.pip_name or self.package}"

    def require(self, what: Optional[str] = None) -> None:
        if not self.available():
            raise MissingBackendError(what or f"target {self.name}", self.pip_name or self.package)

    def check(self, precision: str, kind: str = "gmbinet") -> None:
        """Refuse, in one line, a precision or model kind this backend does not offer, or a missing package."""
        if self.build is None:
            raise EdgekitError(f"{self.name} is not a compile target (it runs checkpoints as they are)")
        if precision not in self.compile_precisions:
            raise EdgekitError(f"target {self.name} does not offer precision {precision} "
                               f"(choose from {', '.join(self.compile_precisions)})")
        if kind not in self.kinds:
            raise EdgekitError(f"target {self.name} compiles {', '.join(self.kinds)} models, not {kind}")
        if not self.builds_without_package:
            self.require()

    def load_kwargs(self, options: dict) -> dict:
        """The options to pass ``load``: those given (None means not given), each one the backend declares in
        ``load_options``; an option it does not declare is refused in one line, naming it and what the backend
        accepts (it used to be dropped silently: ``device="cuda"`` for an ONNX Runtime artifact ran on the CPU)."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = [k for k in given if k not in self.load_options]
        if unknown:
            accepted = ", ".join(self.load_options) or "none"
            raise EdgekitError(f"backend {self.name} does not take the load option{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(unknown)} (it accepts: {accepted})")
        return given

    def declared_options(self, options: dict) -> dict:
        """The part of ``options`` this backend declares (given, not None): for a caller that offers one set of
        options to every backend it opens (a benchmark's rows), where leaving the others out is the intent."""
        return {k: v for k, v in options.items() if k in self.load_options and v is not None}


@dataclass
class BuildContext:
    """What the pipeline hands ``BackendSpec.build``.

    ``precision`` is what to build (``fp32`` when the pipeline quantizes the built file with NNCF
    afterwards; ``requested_precision`` is what the user asked for). ``calibration``: preprocessed
    ``1 x C x H x W`` float32 batches of the ``--calib`` images (INT8 only).
    """

    source: object  # edgekit.pipeline.sources: .kind, .spec (PreprocessSpec), .checkpoint, .manifest, .path
    folder: Path
    precision: str
    log: Callable = print
    threads: Optional[int] = None
    requested_precision: Optional[str] = None
    calibration: Optional[List] = None
    calibration_description: Optional[str] = None
    int8_scheme: str = "pointwise"
    subset: int = 100
    onnx: Optional[Callable[[], Path]] = None
    check_batches: Optional[Callable[..., List]] = None  # (n=16) -> a few preprocessed real images

    def onnx_path(self) -> Path:
        """The simplified float ONNX export of the source (made once), or the source artifact's model file."""
        return self.onnx()

    def torch_module(self):
        """The float source model in eval mode."""
        return self.source.torch_module().eval()


_SPECS: Dict[str, BackendSpec] = {}
_imported = False


def register_backend(spec: BackendSpec) -> BackendSpec:
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"backend {spec.name!r} registered twice")
    _SPECS[spec.name] = spec
    return spec


def _ensure_imported() -> None:
    global _imported
    if not _imported:
        _imported = True
        for mod in BACKEND_MODULES:
            importlib.import_module(mod)


def backends() -> List[BackendSpec]:
    """Every registered backend, in registration order."""
    _ensure_imported()
    return list(_SPECS.values())


def targets() -> List[BackendSpec]:
    """The backends ``edgekit compile --target`` can build."""
    return [b for b in backends() if b.build is not None]


def target_names() -> List[str]:
    return [b.name for b in targets()]


def get_backend(name: str) -> BackendSpec:
    _ensure_imported()
    if name not in _SPECS:
        raise EdgekitError(f"unknown target {name!r} (choose from {', '.join(target_names())})")
    return _SPECS[name]


def default_bench_rows(device: str = "cpu", log: Optional[Callable[[str], None]] = None) -> List[str]:
    """``target:precision`` rows of ``edgekit bench`` without ``--backends`` (a backend this machine cannot
    build, by its ``not_here``, is left out and said on ``log``)."""
    return [f"{b.name}:{p}" if b.build is not None else b.name
            for b in backends() if b.device == device and b.bench_default and buildable_here(b, log, "default rows")
            for p in b.bench_default]


def buildable_here(spec: BackendSpec, log: Optional[Callable[[str], None]] = None, rows: str = "rows") -> bool:
    """False, said on ``log``, when the spec's ``not_here`` names why this machine cannot build it."""
    why = spec.not_here() if spec.not_here else None
    if why and log:
        log(f"{rows}: no {spec.name} rows here ({why})")
    return not why


def common_channel_multiple() -> Tuple[int, Dict[str, int]]:
    """(the least common multiple of every registered backend's ``channel_multiple``, {backend: its
    multiple} for those that need more than 1): channel counts that are multiples of it compile for
    every target."""
    import math

    need = {b.name: int(b.channel_multiple) for b in backends() if int(b.channel_multiple) > 1}
    return math.lcm(1, *need.values()), need


def tool_packages() -> Tuple[str, ...]:
    """Every package a backend records in manifests (read without importing the backends' packages)."""
    seen: List[str] = []
    for b in backends():
        for t in b.tools:
            if t not in seen:
                seen.append(t)
    return tuple(seen)


def spec_for_model_file(path: Path) -> Optional[BackendSpec]:
    """The backend that runs a plain model file (``model.onnx``, ``model.xml``) by its suffix, if any."""
    return next((b for b in backends() if path.suffix.lower() in b.model_suffixes and b.load), None)


def model_file_suffixes() -> Tuple[str, ...]:
    return tuple(s for b in backends() for s in b.model_suffixes)


def spec_for_folder(folder: Path, manifest: dict) -> BackendSpec:
    target = manifest.get("target")
    _ensure_imported()
    spec = _SPECS.get(target)
    if spec is None or spec.load is None:
        raise EdgekitError(f"{folder}: no runtime backend for artifact target {target!r} is available here")
    return spec
