"""The ``edgekit`` command: parse, call, print. The work lives in the library modules.

Commands come from small modules listed in ``COMMAND_MODULES``; each exposes ``commands`` (a list
of click commands). A module whose optional dependency is missing is skipped with a note in
``edgekit --help`` instead of breaking the whole CLI.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from edgekit import __version__
from edgekit.errors import EdgekitError

COMMAND_MODULES = (
    "edgekit.commands.core",  # info, eval, predict, import, synth
    "edgekit.commands.deploy",  # compile, quantize
    "edgekit.commands.ota",  # keygen, package, verify, install, rollback
    "edgekit.commands.train",  # train
    "edgekit.commands.prune",  # prune
    "edgekit.commands.adapt",
    "edgekit.commands.fleet",  # repo init|add|delegate|publish|rotate|status, update
)


class EdgekitGroup(click.Group):
    """Turns every EdgekitError into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # a bug: still one line, the traceback on request
            if os.environ.get("EDGEKIT_DEBUG"):
                traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: internal error ({type(e).__name__}: {first[:200]}); "
                       "set EDGEKIT_DEBUG=1 for the traceback", err=True)
            sys.exit(1)


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def main():
    """edgekit: from a trained checkpoint to the fastest artifact that keeps its accuracy."""


_unavailable = []
for _mod in COMMAND_MODULES:
    try:
        for _cmd in importlib.import_module(_mod).commands:
            main.add_command(_cmd)
    except ImportError as _e:  # an optional dependency is missing: keep the rest of the CLI working
        _unavailable.append(f"{_mod.rsplit('.', 1)[-1]} ({_e.name or _e})")
if _unavailable:
    main.help = (main.help or "") + "\n\nUnavailable (missing packages): " + ", ".join(_unavailable)


if __name__ == "__main__":  # pragma: no cover
    main()
