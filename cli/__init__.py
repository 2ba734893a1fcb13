"""The ``mdsens`` command line (installed as ``mdsens.cli``): the Typer application and its entry point.

A thin shell over the library: each command is a module here that parses, calls ``mdsens`` and
prints; ``console`` holds the error policy and exit codes, ``options`` the shared options, and
``docs`` generates docs/cli.md from this application. The library never imports this package.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import typer

from . import check, design, ensemble, export, paper, plot, predict, relax, sensitivity, systems, uncertainty

app = typer.Typer(
    name="mdsens",
    help=(
        "Relax particle systems with JAX-MD and compute how the relaxed structure changes with "
        "the potential's parameters (implicit differentiation of grad E = 0). Typical session: "
        "`mdsens relax --system binary-packing`, `mdsens sensitivity --param diameter`, "
        "`mdsens plot`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help, not Rich panels: Typer's panels print a Python type beside every option
    # (`<str>`, `<list[str]>`, even `--help <bool>`), keep the docstrings' hard line breaks in the
    # command list and split `--spectrum/--no-spectrum` over two columns. Plain help shows each
    # option's metavar (options.py) and rewraps the text; usage errors stay one line.
    rich_markup_mode=None,
)

# Registered here, not by decorators in each module, so that this tuple is the order in which
# `mdsens --help` and docs/cli.md list the commands.
for _command in (
    relax.relax,
    sensitivity.sensitivity,
    uncertainty.uncertainty,
    predict.predict,
    design.design,
    ensemble.ensemble,
    plot.plot,
    check.check,
    export.export,
    paper.paper,
    systems.systems,
):
    # The command list shows each docstring's first paragraph whole, rewrapped to the terminal
    # (Click would cut it at the first sentence's width with "...").
    summary = " ".join(inspect.getdoc(_command).split("\n\n")[0].split())
    app.command(short_help=summary)(_command)


# The commands that compile JAX functions; the others (plot, export, systems) must start without
# touching an accelerator.
COMPILING = ("relax", "sensitivity", "uncertainty", "predict", "design", "ensemble", "check", "paper")


@app.callback()
def _compilation_cache(ctx: typer.Context) -> None:
    """Keep compiled functions on disk, so a second run of the same system shape starts fast.

    On by default on GPU and TPU (for ``ensemble`` only by the variable below). Off on CPU:
    jaxlib 0.10 rejects its own CPU cache entries on reload and logs an error for each (jax issue
    38445), so the cache would only cost time. MDSENS_COMPILATION_CACHE=DIR turns it on
    anywhere, MDSENS_COMPILATION_CACHE="" off.
    """
    if ctx.invoked_subcommand not in COMPILING:
        return
    import jax

    directory = os.environ.get("MDSENS_COMPILATION_CACHE")
    # Asking for the backend starts JAX, which `ensemble` must not do before it may call
    # jax.distributed.initialize: there the cache is on only by MDSENS_COMPILATION_CACHE.
    if directory is None and ctx.invoked_subcommand != "ensemble" and jax.default_backend() != "cpu":
        directory = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mdsens" / "jax")
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` replaces ``sys.argv[1:]`` (for scripts and tests)."""
    app(args=argv, prog_name="mdsens")


__all__ = ["app", "main"]
