"""The ``mdsens`` command line (installed as ``mdsens.cli``): the Typer application and its entry point.

A thin shell over the library: each command is a module here that parses, calls ``mdsens`` and
prints; ``console`` holds the error policy and exit codes, ``options`` the shared options, and
``docs`` generates docs/cli.md from this application. The library never imports this package.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
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

    On by default (for ``ensemble`` only by the variable below), in a folder per host CPU.
    MDSENS_COMPILATION_CACHE=DIR turns it on in DIR, MDSENS_COMPILATION_CACHE="" off.
    """
    if ctx.invoked_subcommand not in COMPILING:
        return
    import jax

    directory = os.environ.get("MDSENS_COMPILATION_CACHE")
    # Asking for the backend starts JAX, which `ensemble` must not do before it may call
    # jax.distributed.initialize: there the cache is on only by MDSENS_COMPILATION_CACHE.
    if directory is None and ctx.invoked_subcommand != "ensemble":
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mdsens" / "jax"
        directory = str(base / _host_cpu())
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every compiled function, even a one-operation one: loading an entry takes a few ms, compiling
    # a small function 20-100 ms on CPU, and a small command compiles about a hundred of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.default_backend() == "cpu":
        # jaxlib 0.9-0.10 logs an error on loading each CPU entry, even one this host wrote
        # (jax issue 38445: the tuning flags +prefer-no-gather/-scatter are compared as if they
        # were CPU features), then uses the entry: measured here, every entry hits and relaxed
        # positions are bitwise those of an uncached run. Those lines (two per function) would
        # bury the command's output, so JAX's logs below CRITICAL are off on CPU unless the user
        # asked for a level or for JAX's compilation log.
        # (`import jax` sets TF_CPP_MIN_LOG_LEVEL=1 where it is unset: another value is the user's.)
        asked = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") != "1" or "JAX_LOGGING_LEVEL" in os.environ
        if not asked and not jax.config.jax_log_compiles:
            jax.config.update("jax_logging_level", "CRITICAL")


def _host_cpu() -> str:
    """A name for this host's CPU (architecture and instruction-set flags), so that a cache folder
    shared between machines (a home directory on a cluster) never hands one CPU code compiled for
    another: jaxlib's CPU loader only logs such a mismatch (see above), it does not refuse it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:  # not Linux: the architecture and the processor's name
        flags = platform.processor()
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f"cpu-{platform.machine()}-{digest}"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` replaces ``sys.argv[1:]`` (for scripts and tests)."""
    app(args=argv, prog_name="mdsens")


__all__ = ["app", "main"]
