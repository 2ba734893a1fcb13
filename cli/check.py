"""``mdsens check``: implicit dx*/dθ against independent references, as a table and check.json."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from .console import err, guarded, out
from .options import RunOption, param_option

Params = param_option("Parameter to check; repeatable (default: every parameter).")

# (header, cell of a row): plain text in fixed-width columns, one line per row whatever the
# terminal's width (or none, when piped); details live in the last column, not in the labels.
COLUMNS = (
    ("method", lambda r: r.method),
    ("h", lambda r: "" if r.h is None else f"{r.h:g}"),
    ("steps", lambda r: "" if r.steps is None else str(r.steps)),
    ("rel. error", lambda r: "reference" if r.kind == "implicit" else f"{r.error:.2e}"),
    ("error off crossings", lambda r: "" if r.error_unchanged is None else f"{r.error_unchanged:.2e}"),
    ("crossings", lambda r: "" if r.crossings is None else " ".join([str(r.crossings), *r.crossed])),
    ("time (s)", lambda r: f"{r.wall_time:.3f}"),
    ("compile (s)", lambda r: "" if r.compile_time is None else f"{r.compile_time:.2f}"),
    ("peak memory", lambda r: "" if r.peak_memory is None else f"{r.peak_memory / 2**20:.1f} MiB"),
    ("note", lambda r: r.note),
)


def format_table(check) -> str:
    """The table of one parameter's comparisons (a :class:`mdsens.check.ParameterCheck`), as
    plain fixed-width lines under the title ``dx*/dθ for NAME``."""
    cells = [[header for header, _ in COLUMNS]] + [[cell(r) for _, cell in COLUMNS] for r in check.rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(COLUMNS))]
    lines = [
        "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([f"dx*/dθ for {check.name}", *lines])


def check(
    param: Params = None,
    run: RunOption = None,
    tol: Annotated[
        float,
        typer.Option(
            "--tol",
            metavar="TOL",
            help="Largest relative disagreement with a trusted reference that passes (positive).",
        ),
    ] = 1e-5,
    h: Annotated[
        list[float] | None,
        typer.Option(
            "--h",
            metavar="H",
            help="Finite-difference step, positive; repeatable (default: 1e-4, 1e-5, 1e-6).",
            show_default=False,
        ),
    ] = None,
    unroll: Annotated[
        bool,
        typer.Option(
            "--unroll/--no-unroll",
            help="Also differentiate through the unrolled minimiser (small systems only). Default: on.",
            show_default=False,
        ),
    ] = True,
) -> None:
    """Check implicit dx*/dθ against finite differences, a direct solve and unrolled autodiff.

    Prints a table per parameter (method, relative error, crossings, time of the compiled call,
    compilation time, peak memory), writes RUN/check.json and exits 1 when the implicit result
    disagrees with a trusted reference beyond --tol. A finite difference across which a pair
    crosses a non-smooth radius of the potential (a soft-sphere contact, either end of the
    Lennard-Jones or Morse switch) is reported, not blamed on the implicit answer.
    """

    def action():
        from mdsens.check import STEPS, check_run, to_json
        from mdsens.parameters import expand_parameters, parameter_names
        from mdsens.run import load_run, save_check
        from mdsens.verdict import require_positive

        # Refused before a run is read: a NaN tolerance would compare false, and pass, everywhere.
        require_positive("--tol", tol)
        for step in h or ():
            require_positive("--h", step)
        system, relaxed, run_dir = load_run(run)
        names = expand_parameters(system, param or parameter_names(system))
        with err.status("relaxing at θ ± h and solving"):
            checks = check_run(system, relaxed, names, tol, tuple(h) if h else STEPS, None if unroll else ())
        for result in checks:
            out.print(format_table(result), markup=False)
            verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
            out.print(f"{verdict} {escape(result.reason)}\n")
        # Recorded in the run's manifest with the state it checked (a new relax removes it).
        save_check(run_dir, system, relaxed, to_json(checks, tol))
        out.print(str(run_dir / "check.json"), markup=False)
        if not all(c.passed for c in checks):
            raise typer.Exit(1)

    guarded(action)
