"""The ``edgekit`` command: parse, call, print. The work lives in the library modules.

Commands come from small modules listed in ``COMMAND_MODULES``; each exposes ``commands`` (a list
of click commands) and imports nothing heavy at module level (torch, onnx, openvino, nncf, rich,
matplotlib load inside the command), so ``edgekit --help`` and ``edgekit CMD --help`` start fast.
A module may name the optional extra it needs (``EXTRA`` and the import names in ``REQUIRES``), and a
command its own (``edgekit.commands._common.needs``: the build commands need ``edgekit[build]``, which
brings torch): when one of those packages is not installed the command is still listed, marked, and fails
with one line naming the ``pip install`` that provides it. ``pip install edgekit`` is the station runtime
(no torch); a runtime command that reaches a build-only path (a checkpoint instead of an artifact) fails
with the same kind of line (``BUILD_PACKAGES``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

import click

from edgekit import __version__
from edgekit.errors import EdgekitError, first_line

COMMAND_MODULES = (
    "edgekit.commands.core",  # info, eval, predict, import, synth
    "edgekit.commands.deploy",  # compile, quantize, bench
    "edgekit.commands.ota",  # keygen, package, verify, install, rollback (extra: ota)
    "edgekit.commands.train",  # train
    "edgekit.commands.prune",  # prune (extra: prune)
    "edgekit.commands.adapt",  # adapt, adapters, classify
    "edgekit.commands.serve",  # export-repo, serve (extra: serve)
    "edgekit.commands.fleet_status",  # fleet status (extra: station)
    "edgekit.commands.fleet",  # repo init|add|delegate|publish|rotate|status, update (extra: ota)
    "edgekit.commands.station",  # station ROOT, station status|promote|reject (inputs/outputs: extra station)
)

# What the `build` extra brings on top of the runtime: a runtime command that gets as far as importing one of
# these (info or predict of a checkpoint, bench compiling one) says which install provides it, in one line.
BUILD_PACKAGES = ("torch", "torchvision", "torch_pruning", "nncf", "onnx", "onnxsim", "yaml")


def report_error(e: BaseException) -> None:
    """Exit with one line on stderr: the message of an EdgekitError, or a short note for a bug."""
    if isinstance(e, EdgekitError):
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    if os.environ.get("EDGEKIT_DEBUG"):
        traceback.print_exc()
    click.echo(f"error: internal error ({type(e).__name__}: {first_line(e)}); "
               "set EDGEKIT_DEBUG=1 for the traceback", err=True)
    sys.exit(1)


def report_usage_error(e: click.UsageError) -> None:
    """Exit 2 with one line for Click's own usage errors (unknown option, a value out of range, a
    missing argument), where Click prints a 4-line usage block; the line names the --help to read."""
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare `edgekit` or `edgekit repo`: the help, as Click shows it
        raise e
    message = " ".join(e.format_message().split())
    where = e.ctx.command_path if e.ctx is not None else "edgekit"
    click.echo(f"error: {message} (see '{where} --help')", err=True)
    sys.exit(2)


class EdgekitGroup(click.Group):
    """Turns every EdgekitError and every Click usage error into one line on stderr and a
    non-zero exit."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the group's own options and arguments (`edgekit --bogus`)
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            report_usage_error(e)

    def invoke(self, ctx):
        try:  # an unknown command, and each command's options (`edgekit eval --batch 0`)
            return super().invoke(ctx)
        except click.UsageError as e:
            report_usage_error(e)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except ModuleNotFoundError as e:
            report_error(missing_build_package(e, ctx) or e)
        except (Exception, KeyboardInterrupt) as e:
            report_error(e)


def missing_build_package(e: ModuleNotFoundError, ctx) -> EdgekitError | None:
    """The one-line error for a build package a runtime-only install lacks (None for any other module)."""
    top = (e.name or "").split(".")[0]
    if top not in BUILD_PACKAGES:
        return None
    sub = ctx.invoked_subcommand or "this command"
    return EdgekitError(f"edgekit {sub} needs {top} for this input, which is not installed (pip install edgekit is "
                        f"the station runtime: it runs compiled artifacts): pip install 'edgekit[build]'")


def missing_packages(requires) -> list:
    """The import names in ``requires`` that are not installed (located without importing them)."""
    missing = []
    for name in requires:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def unavailable_command(cmd: click.Command, extra: str, missing) -> click.Command:
    """A stand-in for ``cmd``: listed in --help, and any call fails with the install line."""
    line = (f"edgekit {cmd.name} needs the optional package{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}: pip install 'edgekit[{extra}]'")

    def fail(args):
        raise EdgekitError(line)

    return click.Command(
        cmd.name, callback=fail, params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        help=f"(needs edgekit[{extra}]) {cmd.help or ''}", short_help=f"(needs edgekit[{extra}]) "
        + cmd.get_short_help_str(45), add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def main():
    """edgekit: from a trained checkpoint to the fastest artifact that keeps its accuracy."""


# `edgekit bench` times torch beside OpenVINO in one process: torch's OpenMP workers must sleep, not
# spin, while other threads hold the cores (measured on the shared 2-core machine, load 12: 16 s per
# torch call with the default policy, 0.13 s with PASSIVE). libgomp reads this once, when torch loads.
if sys.argv[1:2] == ["bench"]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

for _name in COMMAND_MODULES:
    _mod = importlib.import_module(_name)
    for _cmd in _mod.commands:
        # a command's own extra (needs()) first: `compile` needs edgekit[build] whatever its module's extra
        _extra = getattr(_cmd, "edgekit_extra", None) or getattr(_mod, "EXTRA", None)
        _missing = missing_packages((*getattr(_cmd, "edgekit_requires", ()), *getattr(_mod, "REQUIRES", ())))
        main.add_command(unavailable_command(_cmd, _extra, _missing) if _missing else _cmd)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="edgekit")
