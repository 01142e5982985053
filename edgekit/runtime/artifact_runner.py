"""Shared base for runners that load an artifact folder (see ``edgekit.export.artifact``)."""
from __future__ import annotations

from pathlib import Path

from edgekit.data.preprocess import PreprocessSpec
from edgekit.export.artifact import is_artifact, read_manifest
from edgekit.runtime.base import Runner


class ArtifactRunner(Runner):
    def __init__(self, folder: Path):
        self.manifest = read_manifest(folder)  # verifies file hashes first
        super().__init__(PreprocessSpec.from_dict(self.manifest["preprocess"]), folder, self.manifest)
        self.precision = self.manifest.get("precision", "fp32")

    def describe(self) -> str:
        return f"{self.name} {self.precision} ({self.source})"


def recognizes_target(*targets: str):
    """A cheap ``recognizes`` check: an artifact folder whose manifest names one of ``targets``."""

    def check(p: Path) -> bool:
        if not is_artifact(p):
            return False
        try:
            return read_manifest(p, verify=False).get("target") in targets
        except Exception:
            return False

    return check
