"""The ``mdsens`` command line: a thin shell over the Python API that parses and prints.

Exit codes: 0 success; 1 the computation failed (relaxation not converged, linear solve failed);
2 bad input (unknown system or parameter, bad ``--set``, missing run, unreadable file), reported
as one line without a traceback, with nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from mdsens.errors import NotConvergedError, UserError

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
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# Above this many degrees of freedom the Lanczos spectrum can cost more than the sensitivities
# themselves; `--spectrum` still asks for it.
SPECTRUM_AUTO_LIMIT = 20_000


@app.callback()
def _compilation_cache() -> None:
    """Keep compiled functions on disk, so a second run of the same system shape starts fast.

    On by default on GPU and TPU. Off on CPU: jaxlib 0.10 rejects its own CPU cache entries on
    reload and logs an error for each (jax issue 38445), so the cache would only cost time.
    MDSENS_COMPILATION_CACHE=DIR turns it on anywhere, MDSENS_COMPILATION_CACHE="" off.
    """
    import os

    import jax

    directory = os.environ.get("MDSENS_COMPILATION_CACHE")
    if directory is None and jax.default_backend() != "cpu":
        directory = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mdsens" / "jax")
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


RunOption = Annotated[
    Path | None,
    typer.Option(
        "--run",
        help="Run directory written by `mdsens relax` (default: the latest run under results/).",
        show_default=False,
    ),
]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _guarded(action):
    """Run ``action()`` and turn the library's errors into one-line messages and exit codes."""
    try:
        return action()
    except UserError as error:
        raise _fail(str(error), 2) from None
    except (NotConvergedError, FloatingPointError) as error:
        raise _fail(str(error), 1) from None


@app.command()
def relax(
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            "-s",
            help="Shipped recipe name (see `mdsens systems`) or path to a recipe .toml, "
            "e.g. a previous run's RUN/system.toml to reproduce it. Default: binary-packing, "
            "or none with --structure.",
            show_default=False,
        ),
    ] = None,
    structure: Annotated[
        Path | None,
        typer.Option(
            "--structure",
            help="Structure file in any format ase.io.read reads (extxyz, xyz, CIF, POSCAR, "
            "LAMMPS data, ...): positions, cell, periodicity and species come from it. Give the "
            "potential with --potential and its parameters with --set, e.g. "
            "--set potential.sigma=3.4 --set species.Ar.epsilon=0.0104.",
            show_default=False,
        ),
    ] = None,
    index: Annotated[
        int | None,
        typer.Option(
            "--index", help="Frame of a multi-frame structure file (default: the last).", show_default=False
        ),
    ] = None,
    potential: Annotated[
        str | None,
        typer.Option(
            "--potential",
            help="Potential: soft_sphere, lennard_jones or morse (see docs/potentials.md).",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a recipe field, KEY=VALUE with a dotted key and a TOML value; "
            "repeatable. E.g. --set n_particles=256 --set species.B.diameter=0.7 "
            "--set minimizer.fmax=1e-10 --set box.packing_fraction=0.9.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the random initial positions (overrides the recipe's).",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run directory to write (default: results/<system name>).",
            show_default=False,
        ),
    ] = None,
    allow_unconverged: Annotated[
        bool,
        typer.Option(
            "--allow-unconverged",
            help="Write the result even if max|F| did not reach minimizer.fmax (marked converged=false); "
            "without it such a run exits 1 and writes nothing.",
        ),
    ] = False,
) -> None:
    """Relax a system (FIRE or gradient descent, float64) until max|F| <= minimizer.fmax.

    Writes RUN/system.toml (the resolved recipe), RUN/relaxed.npz (full-precision positions) and
    RUN/relaxed.extxyz, and prints the run directory on the last line.
    """

    def action():
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from mdsens.relaxation import Relaxer
        from mdsens.run import default_run_dir, mark_latest, save_relaxation
        from mdsens.system import load_system

        loaded = load_system(
            system, overrides=set_ or (), seed=seed, structure=structure, index=index, potential=potential
        )
        target = default_run_dir(loaded) if out_dir is None else out_dir
        if target.exists() and not target.is_dir():
            raise UserError(f"--out {target} exists and is not a directory")
        relaxer = Relaxer(loaded)
        out.print(
            f"Relaxing {escape(loaded.name)}: {loaded.n_particles} particles, {loaded.dimension}-D, "
            f"{relaxer.name} to max|F| <= {relaxer.fmax:g} (seed {loaded.recipe['seed']})"
        )
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("compiling", total=None)

            def report(steps: int, force: float) -> None:
                progress.update(task, description=f"step {steps:>7d}  max|F| = {force:.3e}")

            result = relaxer.relax(progress=report)
        out.print(
            f"{'converged' if result.converged else '[bold red]NOT converged[/]'} after "
            f"{result.steps} steps in {result.wall_time:.2f} s: E = {result.energy:.12g}, "
            f"max|F| = {result.max_force:.3e}"
        )
        if result.energy_increased or (not result.converged and not allow_unconverged):
            result.require_converged()
        run = save_relaxation(target, loaded, result)
        mark_latest(run)
        out.print(str(run), markup=False)

    _guarded(action)


@app.command()
def sensitivity(
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Parameter to differentiate by; repeatable. A name (`diameter`, `sigma`, `epsilon`: "
            "every species and set pair), a species (`diameter.B`), or a pair (`sigma.Ar-Kr`); "
            "see docs/potentials.md. Default: every parameter.",
            show_default=False,
        ),
    ] = None,
    run: RunOption = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="Linear solver: `cg` (matrix-free conjugate gradients on Hessian-vector products) "
            "or `dense` (eigendecomposition of the full Hessian; small systems). Default: the recipe's.",
            show_default=False,
        ),
    ] = None,
    allow_unconverged: Annotated[
        bool,
        typer.Option(
            "--allow-unconverged",
            help="Compute even if the stored state is not relaxed to fmax (the result is marked).",
        ),
    ] = False,
    spectrum: Annotated[
        bool | None,
        typer.Option(
            "--spectrum/--no-spectrum",
            help="Report the lowest Hessian eigenvalues (dense up to 1024 degrees of freedom, "
            "Lanczos beyond: seconds to a minute for 10^3-10^4 particles). Default: on up to "
            f"{SPECTRUM_AUTO_LIMIT} degrees of freedom.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Compute dx*/dθ (implicit differentiation) and dE*/dθ (envelope theorem) of a relaxed run.

    Writes RUN/sensitivity.npz (one (N, d) array per parameter), RUN/sensitivity.json (energy
    sensitivities, solver diagnostics, timings, versions) and RUN/sensitivity.extxyz.
    """

    def action():
        from mdsens.run import load_run, save_sensitivity
        from mdsens.sensitivity import Sensitivity, expand_parameters, parameter_names

        system, relaxed, run_dir = load_run(run)
        names = expand_parameters(system, param or parameter_names(system))
        if solver is not None and solver not in ("cg", "dense"):
            raise UserError(f"unknown solver {solver!r}; known: cg, dense")
        if not relaxed.converged and not allow_unconverged:
            raise UserError(
                f"{run_dir} holds an unconverged relaxation (max|F| {relaxed.max_force:.3g}); "
                "pass --allow-unconverged to differentiate it anyway"
            )
        out.print(f"Sensitivity of {escape(str(run_dir))} to {', '.join(names)}")
        with_spectrum = spectrum if spectrum is not None else relaxed.positions.size <= SPECTRUM_AUTO_LIMIT
        with err.status("compiling and solving") as status:
            result = Sensitivity(system, solver).compute(
                relaxed,
                names,
                allow_unconverged=allow_unconverged,
                spectrum=with_spectrum,
                progress=lambda name: status.update(f"solved {escape(name)}; solving the next"),
            )
        for name, entry in result.parameters.items():
            out.print(
                f"  {name:<14} = {entry.value:<8g} dE*/dθ = {entry.denergy:+.10e}  "
                f"max|dx*/dθ| = {abs(entry.dx).max():.4e}  {entry.solver}: {entry.iterations} it, "
                f"residual {entry.residual:.1e}"
            )
        if spectrum is None and not with_spectrum:
            out.print(
                f"  Hessian spectrum skipped above {SPECTRUM_AUTO_LIMIT} degrees of freedom (--spectrum)"
            )
        if result.spectrum is not None:
            hessian = result.spectrum
            lowest = ", ".join(f"{v:.3g}" for v in hessian.lowest[:3])
            out.print(
                f"  Hessian ({hessian.method}): lowest eigenvalues {lowest}; condition number"
                f" {hessian.condition_number:.3g}; removed: {', '.join(result.removed_modes)}"
            )
        for warning in result.warnings:
            err.print(f"[bold yellow]Warning:[/] {escape(warning)}")
        save_sensitivity(run_dir, system, result)
        out.print(str(run_dir), markup=False)

    _guarded(action)


@app.command()
def plot(
    run: RunOption = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Sensitivity to draw; repeatable (default: all computed).",
            show_default=False,
        ),
    ] = None,
    center: Annotated[
        str | None,
        typer.Option(
            "--center",
            help="What sensitivity-distance.png measures distances from: an atom index (e.g. 12) or "
            "coordinates x,y,z (e.g. 5.1,5.1,5.1). Default: the run's defect_position if it has one, "
            "else the middle of a periodic cell, else the centroid of the atoms.",
            metavar="INDEX|X,Y,Z",
            show_default=False,
        ),
    ] = None,
    slice_width: Annotated[
        float | None,
        typer.Option(
            "--slice",
            help="3-D runs: draw only a slice of this thickness in z, centred on the middle of the "
            "cell (or of the atoms' z range), instead of the x-y projection of all atoms.",
            metavar="WIDTH",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Draw PNG figures of a run: atoms coloured by species with dx*/dθ arrows (x-y projection
    or a z slice in 3-D), a histogram of |dx*/dθ| per species, and |dx*/dθ| against the distance
    from an atom, point or defect. Reads the run's files; runs no physics."""

    def parse_center(text: str) -> int | tuple[float, ...]:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return tuple(float(part) for part in text.split(","))
        except ValueError:
            raise UserError(
                f"--center {text!r} is neither an atom index (e.g. 12) nor coordinates x,y,z (e.g. 1.5,0,2)"
            ) from None

    def action():
        from mdsens.plot import plot_run
        from mdsens.run import latest_run

        where = None if center is None else parse_center(center)
        figures = plot_run(
            latest_run() if run is None else run, params=param, center=where, slice_width=slice_width
        )
        for path in figures:
            out.print(str(path), markup=False)

    _guarded(action)


@app.command()
def check(
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Parameter to check; repeatable (default: every parameter).",
            show_default=False,
        ),
    ] = None,
    run: RunOption = None,
    tol: Annotated[
        float,
        typer.Option("--tol", help="Largest relative disagreement with a trusted reference that passes."),
    ] = 1e-5,
    h: Annotated[
        list[float] | None,
        typer.Option(
            "--h", help="Finite-difference step; repeatable (default: 1e-4, 1e-5, 1e-6).", show_default=False
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
            for column in (
                "method",
                "h",
                "rel. error",
                "unchanged-contact error",
                "contact changes",
                "time (s)",
                "peak memory",
            ):
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

    _guarded(action)


@app.command()
def export(
    format_: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="Any format ase.io.write writes: vasp, cif, lammps-data, xyz, ..."
        ),
    ],
    run: RunOption = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File to write (default: RUN/export.<format>).", show_default=False),
    ] = None,
) -> None:
    """Write the relaxed structure of a run in another file format (through ASE).

    Atom order, symbols, tags and cell are those of the input; positions are the full-precision
    relaxed ones.
    """

    def action():
        from mdsens.run import export_structure

        out.print(str(export_structure(run, format_, out_file)), markup=False)

    _guarded(action)


@app.command()
def paper(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the figures and numbers.")
    ] = Path("results/paper"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A fast smoke version: fewer unroll lengths and steps h.")
    ] = False,
) -> None:
    """Reproduce the seed paper's experiment from nothing (Blondel et al. 2022, molecular dynamics).

    On the 128-particle packing at φ = 0.98, θ = diameter of species B: the configuration with
    dx*/dθ arrows; the error of autodiff through the unrolled FIRE minimiser against the number of
    steps, next to the implicit result; wall time and peak memory of implicit, unrolled and finite
    differences. Writes PNG, CSV and JSON into --out (about a minute on two cores).
    """

    def action():
        from mdsens.experiments.paper import run_paper

        with err.status("running the paper's experiment") as status:
            run_paper(out_dir, quick=quick, progress=lambda message: status.update(escape(message)))
        out.print(str(out_dir), markup=False)

    _guarded(action)


@app.command()
def systems() -> None:
    """List the shipped system recipes."""
    from mdsens.recipe import available_recipes, load_recipe

    for name in available_recipes():
        out.print(f"{name:<20} {load_recipe(name).get('description', '')}", markup=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
