"""Shared base for runners that load an artifact folder (see ``edgekit.artifact``)."""
from __future__ import annotations

from pathlib import Path

from edgekit.artifact import VerifiedArtifact, verify_artifact
from edgekit.backends.base import Runner
from edgekit.data.preprocess import PreprocessSpec
from edgekit.errors import EdgekitError


# What a manifest may ask of a runner's input (channels, H, W) before any buffer is sized from it.
MAX_INPUT_CHANNELS = 16
MAX_INPUT_SIDE = 8192


def check_input_geometry(source, spec: PreprocessSpec) -> None:
    c, (h, w) = spec.channels, spec.input_size
    if not (isinstance(c, int) and 1 <= c <= MAX_INPUT_CHANNELS) or not all(
            isinstance(v, int) and 1 <= v <= MAX_INPUT_SIDE for v in (h, w)):
        raise EdgekitError(f"{source}: implausible input geometry in the manifest ({c} channels, {h}x{w}; "
                           f"at most {MAX_INPUT_CHANNELS} channels and {MAX_INPUT_SIDE} px a side)")


class ArtifactRunner(Runner):
    """An artifact folder (its manifest verified), or a plain model file (``model.onnx``, ``model.xml``)
    with the default preprocessing, which the subclass fits to the model's input with ``adopt_input``."""

    def __init__(self, folder):
        """``folder``: a ``VerifiedArtifact`` (``runtime.load`` verified it), an artifact folder (verified
        here, with the ``EDGEKIT_TRUSTED_KEYS`` policy), or a plain model file."""
        self.artifact = None
        if isinstance(folder, VerifiedArtifact):
            self.artifact = folder
        elif Path(folder).is_file():  # a plain model file: nothing recorded, so the published model's preprocessing
            folder = Path(folder)
            self.manifest = {"model_file": folder.name, "precision": "fp32", "preprocess": PreprocessSpec().to_dict()}
            self.model_path = folder
        else:
            self.artifact = verify_artifact(folder)  # signature (if keys are trusted), paths, every file's hash
        if self.artifact is not None:
            self.manifest = self.artifact.manifest
            self.model_path = self.artifact.path(self.manifest.get("model_file"), "model_file")
            folder = self.artifact.folder
        try:
            spec = PreprocessSpec.from_dict(self.manifest["preprocess"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise EdgekitError(f"{folder}: the manifest's preprocess record is missing or malformed") from None
        check_input_geometry(folder, spec)
        super().__init__(spec, folder, self.manifest)
        self.name = self.manifest.get("target", self.name)  # the backend's one name (a plain file: the class's)
        self.precision = self.manifest.get("precision", "fp32")

    def model_bytes(self) -> bytes:
        """The model file's bytes: an artifact's read once and hashed as read (the bytes checked are the
        bytes the backend parses), a plain model file's as they are."""
        if self.artifact is not None:
            return self.artifact.read(self.manifest["model_file"], "model_file")
        return self.model_path.read_bytes()

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
