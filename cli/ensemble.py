"""``mdsens ensemble``: relax and differentiate a recipe over many seeds and swept values."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .console import err, guarded, out
from .options import SetOption, SystemOption, out_option, param_option

Seeds = Annotated[
    str,
    typer.Option(
        "--seeds",
        metavar="RANGE",
        help="Seeds of the random initial positions: START:STOP (STOP excluded), START:STOP:STEP "
        "or a list 0,3,7.",
    ),
]
Sweep = Annotated[
    list[str] | None,
    typer.Option(
        "--sweep",
        metavar="KEY=VALUES",
        help="Sweep a recipe value over V1,V2,... or START:STOP:COUNT (both ends included), e.g. "
        "--sweep species.B.diameter=0.55,0.6,0.65 or --sweep box.packing_fraction=0.9:0.98:5; "
        "repeatable (their product). Every seed runs at every point.",
        show_default=False,
    ),
]
Params = param_option("Parameter to differentiate by (repeatable; default: diameter, every species).")
Observables = Annotated[
    list[str] | None,
    typer.Option(
        "--observable",
        metavar="NAME",
        help="Observable whose value and dq/dθ go into the table (repeatable): energy, pressure, "
        "stress:xy, distance:I,J, gap:I,J or FILE.py:FUNCTION.",
        show_default=False,
    ),
]
Batch = Annotated[
    int | None,
    typer.Option(
        "--batch",
        metavar="N",
        help="Members relaxed together (default: as many as fit in memory).",
        show_default=False,
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Finish an interrupted ensemble in --out: finished members are not recomputed."
    ),
]
Force = Annotated[
    bool, typer.Option("--force", help="Write into a directory that holds other files but no mdsens run.")
]
Plot = Annotated[bool, typer.Option("--plot/--no-plot", help="Draw the ensemble's figures into the run.")]
Distributed = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Run as one process of a jax.distributed job (one per host or GPU): the coordinator "
        "comes from --coordinator or the environment (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS). "
        "All processes must see --out.",
    ),
]
Coordinator = Annotated[
    str | None,
    typer.Option(
        "--coordinator", metavar="HOST:PORT", help="The coordinator (process 0).", show_default=False
    ),
]
Processes = Annotated[
    int | None,
    typer.Option("--num-processes", metavar="N", help="Processes in the job.", show_default=False),
]
ProcessId = Annotated[
    int | None,
    typer.Option("--process-id", metavar="I", help="This process's id, 0..N-1.", show_default=False),
]
RunDirOut = out_option(Path | None, "Run directory to write (default: results/<system name>-ensemble).")


def ensemble(
    system: SystemOption = None,
    set_: SetOption = None,
    seeds: Seeds = "0:8",
    sweep: Sweep = None,
    param: Params = None,
    observable: Observables = None,
    batch: Batch = None,
    out_dir: RunDirOut = None,
    resume: Resume = False,
    force: Force = False,
    plot: Plot = True,
    distributed: Distributed = False,
    coordinator: Coordinator = None,
    num_processes: Processes = None,
    process_id: ProcessId = None,
) -> None:
    """Relax a recipe over many seeds (and swept values) in batches, and differentiate every member.

    Members of one shape relax together in one compiled loop (one compilation), sharded over
    all devices; on CPU, one device per core. Writes RUN/members/ (one file per finished
    member: --resume skips them), RUN/ensemble.csv (one row per member: seed, swept values,
    energy, rattlers, dE/dθ, observables and dq/dθ, converged and why not), RUN/ensemble.npz
    (positions and dx*/dθ of every member) and RUN/ensemble.json (mean, standard deviation and
    standard error per sweep point over the converged members; unconverged ones counted, never
    averaged).
    """

    def action():
        from mdsens.ensemble import one_device_per_core

        # Before JAX's backend starts: on CPU the members spread over the cores.
        one_device_per_core()
        import jax

        from mdsens.ensemble import ensemble as run_ensemble
        from mdsens.ensemble import start_distributed

        if distributed or coordinator is not None:
            start_distributed(coordinator, num_processes, process_id)
        with err.status("compiling and relaxing the first batch") as status:

            def report(done: int, total: int) -> None:
                status.update(f"{done}/{total} members done")

            result = run_ensemble(
                system,
                set_ or (),
                seeds,
                sweep or (),
                param or ("diameter",),
                observable or (),
                batch=batch,
                run_dir=out_dir,
                resume=resume,
                force=force,
                progress=report,
            )
        if jax.process_index() != 0:
            return
        _summary(result)
        if plot:
            from mdsens.plot_ensemble import plot_ensemble

            plot_ensemble(result.run)
        out.print(str(result.run), markup=False)

    guarded(action)


def _summary(result) -> None:
    """Members, failures and the mean ± standard error of every derivative per sweep point."""
    good = sum(bool(row["converged"]) for row in result.rows)
    out.print(
        f"{len(result.rows)} members ({result.computed} computed now), {good} converged, "
        f"{len(result.failed)} failed, in {result.wall_time:.1f} s"
    )
    for failure in result.failed[:5]:
        out.print(f"  member {failure['member']} (seed {failure['seed']}): {escape(failure['reason'])}")
    for entry in result.statistics:
        point = ", ".join(f"{k} = {v:g}" for k, v in entry["point"].items())
        out.print(f"{point or 'all members'}: {entry['converged']} of {entry['members']} converged")
        for name, stats in entry["numbers"].items():
            if not (name.startswith("d") and "_d_" in name) or stats["mean"] is None:
                continue
            error = "" if stats["stderr"] is None else f" ± {stats['stderr']:.3g}"
            out.print(
                f"  {name} = {stats['mean']:.6g}{error}  (std {stats['std'] or 0:.3g}, n = {stats['n']})"
            )
