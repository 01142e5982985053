"""Helpers shared by the command modules: the shared options (defined once here, meaning the same in
every command), JSON output, tables, thread settings, the model argument.

--threads N   CPU threads for inference and compilation checks (torch and the runtime backends)
--json        the result on stdout as exactly one JSON document; notes and progress go to stderr
--out PATH    where the command writes its result (a file or a folder, as the command says)
--force       replace what --out names if it exists (without it an existing --out is refused,
              before anything is loaded)
--limit N     use N images only, taken across all classes
--input-size HxW | N   (compile, quantize, train; bench calls it --size) the network input, height x width
              (N: N x N); recorded in the preprocessing spec
--resize stretch|letterbox   how an image reaches that input: stretched to it (the published model's way)
              or scaled to fit with its aspect ratio kept and padded; recorded in the preprocessing spec
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import click

from edgekit.errors import EdgekitError
from edgekit.utils import atomic_write


BUILD_EXTRA = "build"  # pip install 'edgekit[build]': torch and what compile, quantize, prune, train, adapt need


def needs(extra: str, *packages: str):
    """Mark a click command as needing ``packages`` (import names), provided by ``edgekit[extra]``: where one is
    missing, edgekit.cli lists the command as needing that extra and any call fails with the pip line."""

    def mark(cmd: click.Command) -> click.Command:
        cmd.edgekit_extra, cmd.edgekit_requires = extra, tuple(packages)
        return cmd

    return mark


def build_command(cmd: click.Command) -> click.Command:
    """A build command (compile, quantize, import, train, adapt): it needs torch, which ``edgekit[build]`` brings;
    ``pip install edgekit`` alone is the station runtime."""
    return needs(BUILD_EXTRA, "torch")(cmd)


def threads_option(default: int | None = None):
    return click.option("--threads", type=click.IntRange(1, 256), default=default, show_default=default is not None,
                        help="CPU threads for inference (torch and the runtime backends).")


_result_stream = None  # the real stdout while a --json command runs (everything else printed goes to stderr)


@contextlib.contextmanager
def result_stdout():
    """Inside: stdout is stderr, except for ``echo_json``, which writes the one result document."""
    global _result_stream
    _result_stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _result_stream = None


def json_option(command):
    """``--json`` (flag, ``as_json``): stdout carries exactly one JSON document, written by ``echo_json``;
    whatever else the command or a library prints to stdout meanwhile (NNCF progress...) goes to stderr."""

    @functools.wraps(command)
    def run(*args, as_json=False, **kwargs):
        if not as_json:
            return command(*args, as_json=as_json, **kwargs)
        with result_stdout():
            return command(*args, as_json=as_json, **kwargs)

    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result on stdout as one JSON document (notes and progress: stderr).")(run)
force_option = click.option("--force", is_flag=True, help="Replace what --out names if it exists.")


class SizeType(click.ParamType):
    """``HxW`` or ``N`` -> (height, width) (``edgekit.data.preprocess.parse_size``)."""

    name = "HxW"

    def convert(self, value, param, ctx):
        from edgekit.data.preprocess import parse_size

        if isinstance(value, tuple):
            return value
        try:
            return parse_size(value)
        except EdgekitError as e:
            self.fail(str(e), param, ctx)


def input_size_option(name: str = "--input-size", dest: str = "input_size", help: str | None = None):
    """The network input size, ``HxW`` or ``N`` (default: the model's own): one type and meaning for
    ``compile``/``quantize``/``train`` (``--input-size``) and ``bench`` (``--size``)."""
    return click.option(name, dest, type=SizeType(), default=None, metavar="HxW|N", help=help or (
        "Network input height x width, or N for N x N (default: the model's own, e.g. 512x512); recorded in the "
        "preprocessing spec."))


def resize_option(help: str | None = None):
    """``--resize stretch|letterbox`` (default: the model's own): how an image reaches the input size."""
    from edgekit.data.preprocess import RESIZE_MODES

    return click.option("--resize", type=click.Choice(RESIZE_MODES), default=None, help=help or (
        "How images reach the input size: stretch (the published model was trained so) or letterbox (scaled to "
        "fit, aspect ratio kept, padded); default: the model's own; recorded in the preprocessing spec."))


LIMIT_HELP = ("Use at most N images (quick runs): taken across all classes, and from each split where a command "
              "uses train/val/test.")


def limit_option(dest: str = "limit", *aliases: str):
    """``--limit N``, the one spelling of "fewer images" on every command (older spellings stay as aliases)."""
    return click.option("--limit", *aliases, dest, type=click.IntRange(1), default=None, help=LIMIT_HELP)


def out_option(kind: str, help: str, required: bool = True, dest: str = "out"):
    """``--out`` naming a ``"file"`` or a ``"folder"``."""
    return click.option("--out", dest, required=required, help=help,
                        type=click.Path(file_okay=kind == "file", dir_okay=kind == "folder"))


def check_out(out, force: bool) -> None:
    """Refuse, before anything is loaded, an existing ``--out`` without ``--force`` and an ``--out``
    that cannot be written."""
    if out is None:
        return
    if Path(out).exists() and not force:
        raise EdgekitError(f"{out} already exists (use --force to replace it)")
    check_writable(out)


def check_writable(out) -> None:
    """Refuse an ``--out`` whose folder cannot be written, naming what the user gave.

    Outputs are written into a temporary name beside ``out`` and renamed into place at the end, so an
    unwritable folder used to surface only after all the work, as "internal error (OSError ...
    '.art._pexka79')". The probe is the real operation (a temporary folder made and removed where the
    output will go), not ``os.access``, which says yes to root on a read-only mount."""
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:  # the folders that would be created
        parent = parent.parent
    if not parent.is_dir():
        raise EdgekitError(f"cannot write {out}: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgekit-write-check.", dir=parent))
    except OSError as e:
        raise EdgekitError(f"cannot write {out}: {parent} is not writable ({e.strerror or type(e).__name__})") from None


def note(message: str) -> None:
    click.echo(message, err=True)


def looks_like_model(path: str) -> bool:
    """A path that names a model rather than an image: by suffix (even when missing: checkpoints and the
    model files a backend runs, e.g. .onnx, .xml), or an artifact folder."""
    from edgekit.artifact import is_artifact
    from edgekit.backends.registry import model_file_suffixes
    from edgekit.runtime import CHECKPOINT_SUFFIXES

    p = Path(path)
    return p.suffix.lower() in CHECKPOINT_SUFFIXES + model_file_suffixes() or is_artifact(p)


def model_path(model: str | None, registry_ok: bool = False, quiet: bool = False) -> str:
    """The MODEL argument: the path given, checked (it exists; a folder is an artifact or, where
    ``registry_ok``, an MLFF adapter registry), or the embedded default (said on stderr unless ``quiet``)."""
    from edgekit.artifact import MANIFEST, not_an_artifact
    from edgekit.models.default import resolve_model

    if not model:
        return resolve_model(None, note=None if quiet else note)
    p = Path(model)
    if not registry_ok and not p.exists():  # (with registry_ok, a name such as efficientnet-lite0 is a model too)
        raise EdgekitError(f"model not found: {p}")
    if p.is_dir() and not (p / MANIFEST).is_file():
        from edgekit.mlff.registry import REGISTRY_NAME

        if not (registry_ok and (p / REGISTRY_NAME).is_file()):
            raise not_an_artifact(p)
    return model


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2), file=_result_stream)


def write_json(path: str | Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence], caption: str | None = None,
                numeric: bool = True, err: bool = False) -> None:
    """A table on stdout (``err``: on stderr); columns after the first are right-aligned when ``numeric``.

    Drawn by rich where it is installed (every build extra brings it); the runtime-only station install has no
    rich (with pygments it is 14 MB of a ~125 MB install), so there the same cells go out as plain aligned text."""
    rows = [[str(v) for v in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        click.echo(_plain_table(title, [str(c) for c in columns], rows, caption, numeric), err=err)
        return
    table = Table(title=title, caption=caption)
    for i, c in enumerate(columns):
        table.add_column(c, justify="right" if i and numeric else "left")
    for r in rows:
        table.add_row(*r)
    Console(width=max(160, shutil.get_terminal_size().columns), stderr=err).print(table)


def _plain_table(title: str, columns: List[str], rows: List[List[str]], caption: Optional[str],
                 numeric: bool) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows if i < len(r)]) for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join((cell.rjust(w) if i and numeric else cell.ljust(w))
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    out = [title, line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out + ([caption] if caption else []))


def parse_batches(batch: str) -> list[int]:
    """``--batch 1,8`` -> [1, 8]; one error line for anything else."""
    try:
        batches = sorted({int(b) for b in batch.split(",") if b.strip()})
    except ValueError:
        raise EdgekitError(f"--batch takes a comma list of integers, not {batch!r}") from None
    if not batches or min(batches) < 1:
        raise EdgekitError("--batch needs positive batch sizes")
    return batches


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, where torch is installed (a station without it passes threads to the runtimes)."""
    if threads:
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(int(threads))

