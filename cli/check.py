"""``mdsens check``: implicit dx*/dθ against independent references, as a table and check.json."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from .console import err, guarded, out
from .options import RunOption, param_option

Params = param_option("Parameter to check; repeatable (default: every parameter).")

COLUMNS = (
    "method",
    "h",
    "rel. error",
    "unchanged-contact error",
    "contact changes",
    "time (s)",
    "peak memory",
)


def check(
    param: Params = None,
    run: RunOption = None,
    tol: Annotated[
        float,
        typer.Option(
            "--tol",
            metavar="TOL",
            help="Largest relative disagreement with a trusted reference that passes.",
        ),
    ] = 1e-5,
    h: Annotated[
        list[float] | None,
        typer.Option(
            "--h",
            metavar="H",
            help="Finite-difference step; repeatable (default: 1e-4, 1e-5, 1e-6).",
            show_default=False,
        ),
    ] = None,
    unroll: Annotated[
        bool,
        typer.Option(
            "--unroll/--no-unroll",
            help="Also differentiate through the unrolled minimiser (small systems only).",
        ),
    ] = True,
) -> None:
    """Check implicit dx*/dθ against finite differences, a direct solve and unrolled autodiff.

    Prints a table (method, relative error, wall time, peak memory), writes RUN/check.json and
    exits 1 when the implicit result disagrees with a trusted reference beyond --tol. Finite
    differences across a change of contacts are reported, not blamed on the implicit answer.
    """

    def action():
        import json

        from rich.table import Table

        from mdsens import atomic
        from mdsens.check import STEPS, check_run, to_json
        from mdsens.run import load_run
        from mdsens.sensitivity import expand_parameters, parameter_names

        system, relaxed, run_dir = load_run(run)
        names = expand_parameters(system, param or parameter_names(system))
        with err.status("relaxing at θ ± h and solving"):
            checks = check_run(system, relaxed, names, tol, tuple(h) if h else STEPS, None if unroll else ())
        for result in checks:
            table = Table(title=f"dx*/d{result.name}", title_justify="left")
            for column in COLUMNS:
                table.add_column(column)
            for row in result.rows:
                table.add_row(
                    escape(row.method),
                    "" if row.h is None else f"{row.h:g}",
                    "reference" if row.method.startswith("implicit") else f"{row.error:.2e}",
                    "" if row.error_unchanged is None else f"{row.error_unchanged:.2e}",
                    "" if row.contact_changes is None else str(row.contact_changes),
                    f"{row.wall_time:.2f}",
                    "" if row.peak_memory is None else f"{row.peak_memory / 2**20:.1f} MiB",
                )
            out.print(table)
            verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
            out.print(f"{verdict} {escape(result.reason)}")
        atomic.write_text(run_dir / "check.json", json.dumps(to_json(checks, tol), indent=2) + "\n")
        out.print(str(run_dir / "check.json"), markup=False)
        if not all(c.passed for c in checks):
            raise typer.Exit(1)

    guarded(action)
