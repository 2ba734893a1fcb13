"""``mdsens predict``: the relaxed structure and energy at nearby parameters, from one implicit solve."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .console import err, guarded, out
from .options import RunOption, out_option
from .runs import chosen_run
from .sensitivity import SPECTRUM_AUTO_LIMIT

Set = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="A potential parameter at its new value, as in the recipe: species.B.diameter=0.62, "
        "potential.epsilon=1.1, pairs.A-B.diameter=0.8; repeatable (all change together). "
        "Positions, cell and species stay the run's.",
        show_default=False,
    ),
]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Also re-relax at the new parameters, from the prediction and from the run's state, "
        "and report the prediction's position and energy errors and the minimiser steps it saves.",
    ),
]
OutDir = out_option(Path | None, "Directory to write into instead of RUN/predict/.", metavar="DIR")

# Contacts named in the warning when a step exceeds the validity radius (predict.json has more).
SHOWN_CROSSINGS = 5


def predict(set_: Set = None, verify: Verify = False, run: RunOption = None, out_dir: OutDir = None) -> None:
    """Predict the relaxed structure and energy at new parameter values without relaxing.

    One linear solve along the step Δθ gives the first-order structure x* + (dx*/dθ)Δθ and the
    energy to first and second order (d²E*/dθ² = ∂²E/∂θ² + ∂²E/∂θ∂x · dx*/dθ). Prints them with
    the validity radius along the step (how far the parameters can move before a contact is
    predicted to open or close, or, up to 20000 degrees of freedom, the Hessian to go soft) and
    warns when the step exceeds it. Writes RUN/predict/predict.json and
    RUN/predict/predicted.extxyz (or into --out).
    """

    def action():
        from mdsens.errors import UserError
        from mdsens.parameters import unit_tangent
        from mdsens.prediction import parameter_step
        from mdsens.prediction import predict as predict_state
        from mdsens.prediction import verify as verify_state
        from mdsens.prediction_files import save_prediction
        from mdsens.run import load_run
        from mdsens.run_lock import run_lock
        from mdsens.validity import predicted_crossings, validity_along

        overrides = list(set_ or [])
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out {out_dir} exists and is not a directory")
        run_dir, note = chosen_run(run)
        system, relaxed, run_dir = load_run(run_dir)
        if not relaxed.converged:
            raise UserError(
                f"{run_dir} holds an unconverged relaxation (max|F| {relaxed.max_force:.3g}): relax it"
                " again before predicting from it"
            )
        step = parameter_step(system, overrides)
        if note is not None:
            out.print(escape(note))
        # Held until the files are written when they go into the run: a relax meanwhile is refused.
        with run_lock(run_dir, "predict") if out_dir is None else nullcontext():
            x, params = relaxed.positions, system.params
            tangents = {name: unit_tangent(system, name, params) for name in step.changes}
            with err.status("compiling and solving"):
                prediction = predict_state(system, x, params, step.delta, names=tangents)
                # As for `mdsens sensitivity`'s spectrum: Lanczos beyond this can cost more than
                # the prediction itself, and the contact criterion is the one that binds first.
                k = 4 if x.size <= SPECTRUM_AUTO_LIMIT else 0
                validity = validity_along(system, x, params, step.delta, prediction.dx, k=k)
                crossings = predicted_crossings(system, x, params, step.delta, prediction.dx)
            _print_prediction(run_dir, step, prediction)
            _print_validity(validity, crossings)
            if k == 0:
                out.print(f"  Hessian modes not followed above {SPECTRUM_AUTO_LIMIT} degrees of freedom")
            verification = None
            if verify:
                with err.status("re-relaxing at the new parameters"):
                    verification = verify_state(system, x, params, step.params, prediction)
                _print_verification(verification)
            paths = save_prediction(
                run_dir, system, x, overrides, step, prediction, validity, crossings, verification, out_dir
            )
        out.print(str(paths[0].parent), markup=False)

    guarded(action)


def _print_prediction(run_dir, step, prediction) -> None:
    changes = ", ".join(f"{name} {old:g} → {new:g}" for name, (old, new) in step.changes.items())
    out.print(f"Prediction for {escape(str(run_dir))} at {escape(changes)}")
    out.print(f"  E* now               = {prediction.energy:+.12e}")
    out.print(f"  E* new, first order  = {prediction.energy_first:+.12e}")
    out.print(f"  E* new, second order = {prediction.energy_second:+.12e}")
    size = max((float((row**2).sum()) ** 0.5 for row in prediction.dx), default=0.0)
    out.print(
        f"  max particle displacement {size:.4e}  ({prediction.iterations} solver iterations,"
        f" residual {prediction.residual:.1e})"
    )


def _print_validity(validity, crossings) -> None:
    radius = validity.radius_up
    limit = validity.up
    if radius >= 1.0:
        where = "no limit" if limit.kind == "none" else f"{radius:.3g} steps, {escape(limit.describe())}"
        out.print(f"  validity radius along the step: {where} (the step is within it)")
        return
    out.print(f"  validity radius along the step: {radius:.3g} steps ({escape(limit.describe())})")
    what = []
    if crossings:
        # Soft-sphere contacts by their pair; the ends of a Lennard-Jones or Morse switch named.
        pairs = ", ".join(
            f"{c.pair[0]}-{c.pair[1]}" + ("" if c.radius == "contact" else f" ({c.radius}·σ)")
            for c in crossings[:SHOWN_CROSSINGS]
        )
        more = f" and {len(crossings) - SHOWN_CROSSINGS} more" if len(crossings) > SHOWN_CROSSINGS else ""
        kind = "contacts" if all(c.radius == "contact" for c in crossings) else "pairs"
        what.append(f"{kind} {pairs}{more} predicted to change")
    if validity.mode_up.distance <= 1.0:
        what.append(f"{validity.mode_up.describe()} predicted to reach zero")
    factor = f"{1.0 / radius:.3g}×" if radius > 0 else "infinitely many times"
    err.print(f"[bold yellow]Warning:[/] the step is {factor} the validity radius; {escape('; '.join(what))}")


def _print_verification(verification) -> None:
    v = verification
    out.print(
        f"  verified: re-relaxed to E* = {v.relaxed.energy:+.12e} in {v.relaxed.steps} steps from the"
        f" prediction, {v.from_start.steps} from the run's state (saved {v.steps_saved})"
    )
    out.print(
        f"  position error: max {v.position_error_max:.3e}, rms {v.position_error_rms:.3e}"
        f" (without prediction: max {v.baseline_error_max:.3e}, rms {v.baseline_error_rms:.3e})"
    )
    out.print(
        f"  energy error: first order {v.energy_error_first:+.3e}, second order {v.energy_error_second:+.3e}"
    )
    network = "unchanged"
    if v.contact_changes or v.crossed:
        crossed = ", ".join(v.crossed) or "none"
        network = f"changed ({v.contact_changes} particles change contacts; crossed: {crossed})"
    out.print(f"  contact network: {network}")
    if not v.converged:
        err.print("[bold yellow]Warning:[/] a re-relaxation did not reach fmax: the errors are not reliable")
