"""Helpers shared by the command modules: JSON output, tables, thread settings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import click

from edgekit.utils import atomic_write


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def write_json(path: str | Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence], caption: str | None = None,
                numeric: bool = True, err: bool = False) -> None:
    """A rich table on stdout (``err``: on stderr); columns after the first are right-aligned when ``numeric``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for i, c in enumerate(columns):
        table.add_column(c, justify="right" if i and numeric else "left")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    Console(width=max(160, shutil.get_terminal_size().columns), stderr=err).print(table)


def parse_batches(batch: str) -> list[int]:
    """``--batch 1,8`` -> [1, 8]; one error line for anything else."""
    from edgekit.errors import EdgekitError

    try:
        batches = sorted({int(b) for b in batch.split(",") if b.strip()})
    except ValueError:
        raise EdgekitError(f"--batch takes a comma list of integers, not {batch!r}") from None
    if not batches or min(batches) < 1:
        raise EdgekitError("--batch needs positive batch sizes")
    return batches


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def model_argument(required: bool = False):
    return click.argument("model", required=required, metavar="[CKPT|ARTIFACT]" if not required else "CKPT|ARTIFACT")
