"""The package layering: imports point down the list in the README's Layout section only."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "edgekit"
# lower number = lower layer; a module may import its own layer's packages and any lower one
LAYER = {"__init__": 0, "errors": 0, "utils": 0, "progress": 0, "artifact": 0, "keys": 0,
         "data": 1, "device": 1, "models": 2, "compress": 3, "kernels": 3, "backends": 4, "runtime": 4,
         "pipeline": 5, "mlff": 5, "eval": 5, "bench": 6, "train": 6, "ota": 7, "fleet": 7, "serve": 7, "station": 7,
         "commands": 8, "cli": 9, "__main__": 9}
# same-layer packages: which may import which (no circle between them)
SAME_LAYER_ORDER = {"pipeline": {"mlff", "eval"}, "mlff": {"eval"}, "train": {"bench"}, "runtime": {"backends"},
                    "fleet": {"ota"}, "serve": {"ota", "fleet"}, "station": {"ota", "fleet"}}


def _imports():
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        src = rel.parts[0].removesuffix(".py") if rel.parts else "__init__"
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "edgekit":
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "edgekit"]
            for n in names:
                parts = n.split(".")
                yield f"{rel}:{node.lineno}", src, parts[1] if len(parts) > 1 else "__init__", n


def test_every_package_has_a_layer():
    missing = sorted({p.name.removesuffix(".py") for p in PKG.iterdir()
                      if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"} - set(LAYER))
    assert not missing, f"add {missing} to LAYER (and the README's Layout)"


def test_imports_point_down():
    bad = []
    for where, src, dst, name in _imports():
        if src == dst or LAYER[src] == LAYER[dst] == 0:  # the base modules
            continue
        if LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] and dst not in SAME_LAYER_ORDER.get(src, set())):
            bad.append(f"{where}: {src} -> {name}")
    assert not bad, "imports pointing up (or across) the layers:\n" + "\n".join(bad)
