"""Shared base for runners that load an artifact folder (see ``edgekit.artifact``)."""
from __future__ import annotations

from pathlib import Path

from edgekit.artifact import read_manifest
from edgekit.backends.base import Runner
from edgekit.data.preprocess import PreprocessSpec


class ArtifactRunner(Runner):
    def __init__(self, folder: Path):
        self.manifest = read_manifest(folder)  # verifies file hashes first
        super().__init__(PreprocessSpec.from_dict(self.manifest["preprocess"]), folder, self.manifest)
        self.name = self.manifest.get("target", self.name)  # the backend's one name
        self.precision = self.manifest.get("precision", "fp32")

    def describe(self) -> str:
        return f"{self.name} {self.precision} ({self.source})"
