"""``edgekit.runtime.load(path).infer(batch)``: one interface for every model source."""
from edgekit.runtime.base import Backend, Runner, backends, load, register_backend

__all__ = ["Backend", "Runner", "backends", "load", "register_backend"]
