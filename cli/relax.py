"""``mdsens relax``: build a system, relax it with a progress line, write the run directory."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from mdsens.errors import UserError

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


def relax(
    system: SystemOption = None,
    structure: StructureOption = None,
    index: IndexOption = None,
    potential: PotentialOption = None,
    set_: SetOption = None,
    seed: SeedOption = None,
    out_dir: RunDirOut = None,
    allow_unconverged: AllowUnconverged = False,
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

    guarded(action)
