"""``mdsens design``: inverse design on a relaxed run, the parameters whose relaxed structure
hits a target; printed, and written into RUN/design/ (or --out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mdsens.errors import UserError

from .console import err, guarded, out
from .options import RunOption, out_option, param_option
from .runs import chosen_run

Param = param_option(
    "Parameter to design, any level: diameter (every species), diameter.B, sigma, epsilon, "
    "sigma.Ar-Kr; repeatable. Optimised as its logarithm (values stay positive)."
)
PerParticle = Annotated[
    list[str] | None,
    typer.Option(
        "--per-particle",
        metavar="NAME",
        help="Design every particle's own value of this per-species parameter (diameter, "
        "diameter.B: all particles of the parameter), from one adjoint solve per step; repeatable.",
        show_default=False,
    ),
]
Target = Annotated[
    Path | None,
    typer.Option(
        "--target",
        metavar="FILE",
        help="Target structure (any format ase.io.read reads, the same atoms in the same order): "
        "minimise the mean squared minimum-image displacement of x*(θ) from it, rigid "
        "translation (and a free cluster's rotation) removed, rattlers left out.",
        show_default=False,
    ),
]
TargetObservable = Annotated[
    list[str] | None,
    typer.Option(
        "--target-observable",
        metavar="NAME=VALUE",
        help="Observable target, e.g. pressure=0.05, stress:xy=0, distance:3,17=1.2, "
        "FILE.py:FUNCTION=1.0; repeatable; minimise the sum of squared relative misfits "
        "(q/VALUE - 1)^2 (VALUE nonzero).",
        show_default=False,
    ),
]
LossFile = Annotated[
    str | None,
    typer.Option(
        "--loss",
        metavar="FILE.py:FUNCTION",
        help="Your own loss: FUNCTION(positions, system, params) returning a JAX scalar. "
        "Objectives given together are added.",
        show_default=False,
    ),
]
Optimizer = Annotated[
    str, typer.Option("--optimizer", metavar="NAME", help="Outer optimiser: adam or lbfgs.")
]
LearningRate = Annotated[
    float | None,
    typer.Option(
        "--learning-rate",
        metavar="RATE",
        help="Adam: step per log-value (default 0.01); L-BFGS: scale of its quasi-Newton step "
        "(default 1, its natural length).",
        show_default=False,
    ),
]
Steps = Annotated[int, typer.Option("--steps", metavar="N", help="Most accepted outer steps.")]
Tol = Annotated[float, typer.Option("--tol", metavar="LOSS", help="Stop when the loss is at most this.")]
Gtol = Annotated[
    float, typer.Option("--gtol", metavar="NORM", help="Stop when |dL/d log θ| is at most this.")
]
Xtol = Annotated[
    float,
    typer.Option(
        "--xtol",
        metavar="DZ",
        help="Stop when the optimiser's step changes no log-value by more than this (for L-BFGS, "
        "whose step estimates the distance to the minimum: the parameters' relative precision), "
        "or when no larger step lowers the loss (its numerical floor).",
    ),
]
MaxStep = Annotated[
    float,
    typer.Option("--max-step", metavar="DZ", help="Largest change of any log-value per step (0.1: 10 %)."),
]
Start = Annotated[
    str | None,
    typer.Option(
        "--start",
        metavar="FROM",
        help="Where each inner relaxation starts: target (the --target structure; the default "
        "with --target: at the target's parameters it is already relaxed, so the target's basin "
        "in the parameters is wide), warm (the previous x*; the default otherwise) or initial "
        "(the run's initial positions: x*(θ) is then the map that relaxed the run).",
        show_default=False,
    ),
]
Out = out_option(Path | None, "Directory to write (default: RUN/design).", metavar="DIR")


def design(
    param: Param = None,
    per_particle: PerParticle = None,
    target: Target = None,
    target_observable: TargetObservable = None,
    loss: LossFile = None,
    optimizer: Optimizer = "lbfgs",
    learning_rate: LearningRate = None,
    steps: Steps = 50,
    tol: Tol = 0.0,
    gtol: Gtol = 0.0,
    xtol: Xtol = 1e-10,
    max_step: MaxStep = 0.1,
    start: Start = None,
    run: RunOption = None,
    out_dir: Out = None,
) -> None:
    """Inverse design: find the parameters whose relaxed structure hits a target.

    A bilevel optimisation: the outer optimiser (optax L-BFGS or Adam) moves the parameters;
    the inner relaxation gives x*(θ), started from the target structure with --target (the
    target is then a minimum at the parameters sought, and x*(θ) reaches it continuously), else
    from the previous x*; the gradient of the loss is the implicit reverse-mode one, one adjoint
    solve per step whatever the number of parameters. Every trial is recorded: loss, parameters,
    gradient norm, inner steps, convergence, contact changes. A trial whose inner relaxation
    fails, that jumps to another basin (contacts change, or for potentials without contacts the
    loss leaves its prediction from the gradients at both ends) or, for L-BFGS, raises the loss
    is rejected and the step halved. Stops on --tol, --gtol or --xtol (converged) or after
    --steps. Only the start's basin is reachable. Writes history.csv, design.json,
    design.extxyz, system.toml (`mdsens relax --system DIR/system.toml` reproduces the design)
    and three figures.
    """

    def action():
        if steps < 1:
            raise UserError(f"--steps must be a positive integer, not {steps}")
        if optimizer not in ("adam", "lbfgs"):
            raise UserError(f"unknown --optimizer {optimizer!r}; known: adam, lbfgs")
        if not (target or target_observable or loss):
            raise UserError(
                "give an objective: --target FILE, --target-observable NAME=VALUE or --loss FILE.py:FUNCTION"
            )
        if start not in (None, "target", "warm", "initial"):
            raise UserError(f"unknown --start {start!r}; known: target, warm, initial")
        if start == "target" and target is None:
            raise UserError("--start target needs --target FILE")
        run_dir, note = chosen_run(run)
        _design(run_dir, note)

    def _design(run_dir, note):
        from mdsens import design as engine
        from mdsens import design_losses as losses
        from mdsens.design_files import read_target, save_design
        from mdsens.relaxation import Relaxer
        from mdsens.run import load_run

        system, relaxed, run_dir = load_run(run_dir)
        if not relaxed.converged:
            raise UserError(f"{run_dir} holds an unconverged relaxation: relax it again")
        parts, target_positions = [], None
        if target is not None:
            target_positions = read_target(system, target)
            parts.append(losses.target_loss(system, target_positions))
        targets = [losses.parse_target_observable(system, spec) for spec in target_observable or []]
        if targets:
            parts.append(losses.observable_loss(targets))
        if loss is not None:
            parts.append(losses.user_loss(system, loss))
        names = list(param or [])
        begin = start or ("target" if target is not None else "warm")
        engine.variables(system, names, per_particle or [])  # refuse bad names before relaxing

        def objective(x, params):
            return sum(part(x, params) for part in parts)

        if note is not None:
            out.print(escape(note))
        out.print(f"Design on {escape(str(run_dir))}")
        with err.status("compiling x*(θ) and its gradient") as status:

            def report(entry):
                mark = "✓" if entry.accepted else "✗"
                status.update(
                    f"step {entry.step}.{entry.attempt} {mark} loss {entry.loss:.4g} "
                    f"|g| {entry.grad_norm:.3g} ({entry.inner_steps} inner steps)"
                )
                if not entry.accepted or entry.contact_changes:
                    err.print(f"  step {entry.step}.{entry.attempt}: {escape(entry.note)}")

            result = engine.design(
                system,
                objective,
                names,
                per_particle=per_particle or [],
                # From the target, the first relaxation starts there too: x*(θ) is one map.
                x0=None if begin == "target" else relaxed.positions,
                optimizer=optimizer,
                learning_rate=learning_rate,
                steps=steps,
                tol=tol,
                gtol=gtol,
                xtol=xtol,
                max_step=max_step,
                start=target_positions if begin == "target" else begin,
                relaxer=Relaxer(system),
                progress=report,
            )
        start_values = result.history[0].values
        for name, value in result.values.items():
            out.print(f"  {escape(name):<16} {start_values[name]:.10g} -> {value:.10g}")
        out.print(f"  loss {result.history[0].loss:.4g} -> {result.loss:.4g} in {result.steps} steps")
        out.print(f"  {escape(result.reason)}")
        inputs = {
            "run": str(run_dir),
            "params": names,
            "per_particle": list(per_particle or []),
            "target": None if target is None else str(target),
            "target_observables": list(target_observable or []),
            "loss": loss,
            "optimizer": optimizer,
            "learning_rate": learning_rate,
            "steps": steps,
            "tol": tol,
            "gtol": gtol,
            "xtol": xtol,
            "max_step": max_step,
            "start": begin,
        }
        directory = run_dir / "design" if out_dir is None else out_dir
        save_design(directory, system, result, inputs, target_positions)
        out.print(str(directory), markup=False)

    guarded(action)
