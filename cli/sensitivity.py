"""``mdsens sensitivity``: dx*/dθ and dE*/dθ of a relaxed run, printed and written beside it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from mdsens.errors import UserError

from .console import err, guarded, out
from .options import RunOption, allow_unconverged_option, param_option
from .runs import chosen_run

# Above this many degrees of freedom the Lanczos spectrum can cost more than the sensitivities
# themselves; `--spectrum` still asks for it.
SPECTRUM_AUTO_LIMIT = 20_000

Params = param_option(
    "Parameter to differentiate by; repeatable. A name (`diameter`, `sigma`, `epsilon`: "
    "every species and set pair), a species (`diameter.B`), or a pair (`sigma.Ar-Kr`); "
    "see docs/potentials.md. Default: every parameter."
)
AllowUnconverged = allow_unconverged_option(
    "Compute even if the stored state is not relaxed to fmax (the result is marked)."
)


def sensitivity(
    param: Params = None,
    run: RunOption = None,
    solver: Annotated[
        str | None,
        typer.Option(
            metavar="cg|dense",
            help="Linear solver: `cg` (matrix-free conjugate gradients on Hessian-vector products) "
            "or `dense` (eigendecomposition of the full Hessian; small systems). Default: the recipe's.",
            show_default=False,
        ),
    ] = None,
    allow_unconverged: AllowUnconverged = False,
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
        from mdsens.run_lock import run_lock

        run_dir, note = chosen_run(run)
        # Held until the files are written: a relax into this run meanwhile is refused, so the
        # sensitivities are always written beside the state they were computed from.
        with run_lock(run_dir, "sensitivity"):
            _compute_and_save(run_dir, note)
        out.print(str(run_dir), markup=False)

    def _compute_and_save(run_dir, note):
        from mdsens.parameters import expand_parameters, parameter_names
        from mdsens.run import load_run, save_sensitivity
        from mdsens.sensitivity import Sensitivity

        system, relaxed, run_dir = load_run(run_dir)
        names = expand_parameters(system, param or parameter_names(system))
        if solver is not None and solver not in ("cg", "dense"):
            raise UserError(f"unknown solver {solver!r}; known: cg, dense")
        if not relaxed.converged and not allow_unconverged:
            raise UserError(
                f"{run_dir} holds an unconverged relaxation (max|F| {relaxed.max_force:.3g}); "
                "pass --allow-unconverged to differentiate it anyway"
            )
        if note is not None:
            out.print(escape(note))
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
            out.print(f"  {escape(name):<14} = {entry.value:<8g} {_describe(entry)}")
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
        save_sensitivity(run_dir, system, result, relaxed=relaxed)

    guarded(action)


def _describe(entry) -> str:
    """dE*/dθ and what dx*/dθ is: exactly zero (no solve ran), unresolved noise, or its largest
    per-particle length with the solve's diagnostics."""
    energy = f"dE*/dθ = {entry.denergy:+.10e}  "
    if entry.exactly_zero:
        return energy + "dx*/dθ = 0 exactly (∂²E/∂x∂θ = 0: no solve needed)"
    size = f"max|dx*/dθ| = {entry.max_displacement:.4e}"
    solve = f"{entry.solver}: {entry.iterations} it, residual {entry.residual:.1e}"
    if not entry.resolved:
        return energy + f"{size}  unresolved: below the solve's resolution, numerical noise ({solve})"
    return energy + f"{size}  {solve}"
