"""Shared base for runners that load an artifact folder (see ``edgekit.artifact``)."""
from __future__ import annotations

from pathlib import Path

from edgekit.artifact import read_manifest
from edgekit.backends.base import Runner
from edgekit.data.preprocess import PreprocessSpec


class ArtifactRunner(Runner):
    """An artifact folder (its manifest verified), or a plain model file (``model.onnx``, ``model.xml``)
    with the default preprocessing, which the subclass fits to the model's input with ``adopt_input``."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if folder.is_file():  # a plain model file: nothing recorded, so the published model's preprocessing
            self.manifest = {"model_file": folder.name, "precision": "fp32", "preprocess": PreprocessSpec().to_dict()}
            self.model_path = folder
        else:
            self.manifest = read_manifest(folder)  # verifies file hashes first
            self.model_path = folder / self.manifest["model_file"]
        super().__init__(PreprocessSpec.from_dict(self.manifest["preprocess"]), folder, self.manifest)
        self.name = self.manifest.get("target", self.name)  # the backend's one name (a plain file: the class's)
        self.precision = self.manifest.get("precision", "fp32")

    def adopt_input(self, shape) -> None:
        """A plain model file: input channels and size from the model (N x C x H x W; a dynamic H/W keeps
        the default), and the assumed preprocessing stated in ``meta['preprocess_assumed']``."""
        if not self.source.is_file():
            return
        dims = [d if isinstance(d, int) and d > 0 else None for d in list(shape)[-3:]]
        if len(dims) == 3 and dims[0]:
            self.spec.channels = dims[0]
        if len(dims) == 3 and dims[1] and dims[2]:
            self.spec.input_size = (dims[1], dims[2])
        s, sized = self.spec, len(dims) == 3 and bool(dims[1] and dims[2])
        self.meta = {**self.meta, "preprocess_assumed": (
            f"{self.source.name} is a plain model file without an edgekit manifest: assuming the published GMBINet "
            f"checkpoint's preprocessing (gray / its max, (x - {s.mean}) / {s.std}, {s.channels} channels, bilinear "
            f"resize to {s.input_size[0]}x{s.input_size[1]}, "
            f"{'the model input size' if sized else 'the default: the model input size is dynamic'}); "
            "an artifact from edgekit compile records the checked preprocessing instead")}

    def describe(self) -> str:
        return f"{self.name} {self.precision} ({self.source})"
