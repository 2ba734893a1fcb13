"""``mdsens relax``: build a system, relax it with a progress line, write the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .console import err, guarded, out
from .options import (
    IndexOption,
    PotentialOption,
    SeedOption,
    SetOption,
    StructureOption,
    SystemOption,
    allow_unconverged_option,
    out_option,
)

RunDirOut = out_option(Path | None, "Run directory to write (default: results/<system name>).")
AllowUnconverged = allow_unconverged_option(
    "Write the result even if max|F| did not reach minimizer.fmax (marked converged=false); "
    "without it such a run exits 1 and writes nothing."
)
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Write the run into an existing directory that holds other files but no mdsens run "
        "(refused without it); mdsens removes none of the files already there.",
    ),
]


def relax(
    system: SystemOption = None,
    structure: StructureOption = None,
    index: IndexOption = None,
    potential: PotentialOption = None,
    set_: SetOption = None,
    seed: SeedOption = None,
    out_dir: RunDirOut = None,
    allow_unconverged: AllowUnconverged = False,
    force: Force = False,
) -> None:
    """Relax a system (FIRE or gradient descent, float64) until max|F| <= minimizer.fmax.

    Writes RUN/system.toml (the resolved recipe), RUN/relaxed.npz (full-precision positions) and
    RUN/relaxed.extxyz, and prints the run directory on the last line. The run directory is
    locked while the command runs, and the files are committed at the end, all together: an
    interrupted relax leaves an earlier run there as it was.
    """

    def action():

        from mdsens.relaxation import Relaxer
        from mdsens.run import check_target, default_run_dir, mark_latest, save_relaxation
        from mdsens.run_lock import run_lock
        from mdsens.system import load_system

        loaded = load_system(
            system, overrides=set_ or (), seed=seed, structure=structure, index=index, potential=potential
        )
        target = check_target(default_run_dir(loaded) if out_dir is None else out_dir, force)
        # Taken before relaxing: an unwritable --out, or a run another command is writing, is
        # reported now rather than after the relaxation.
        with run_lock(target, "relax", create=True):
            result = _relax(loaded, Relaxer(loaded))
            if result.diverged or result.energy_increased or (not result.converged and not allow_unconverged):
                result.require_converged()
            run = save_relaxation(target, loaded, result)
            mark_latest(run)
        out.print(str(run), markup=False)

    guarded(action)


def _relax(loaded, relaxer):
    """Relax with a progress line on stderr; print what the relaxation did."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # A structure file fixes the positions: its runs have no random seed to report.
    seed = "" if "structure" in loaded.recipe else f" (seed {loaded.recipe['seed']})"
    out.print(
        f"Relaxing {escape(loaded.name)}: {loaded.n_particles} particles, {loaded.dimension}-D, "
        f"{relaxer.name} to max|F| <= {relaxer.fmax:g}{seed}"
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True
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
    if result.converged and result.energy == 0.0 and loaded.potential.name == "soft_sphere":
        out.print(
            "  E = 0: no two particles overlap (no contacts), so the packing fraction is below "
            "jamming; raise box.packing_fraction or the diameters for a jammed packing"
        )
    return result
