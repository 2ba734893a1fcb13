"""``mdsens sensitivity``: dx*/dθ and dE*/dθ of a relaxed run, and dq/dθ of observables q, printed
and written beside it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from mdsens.errors import UserError

from .console import err, guarded, out
from .options import RunOption, allow_unconverged_option, param_option
from .runs import chosen_run

# Above this many degrees of freedom ARPACK's four lowest modes can cost more than the
# sensitivities themselves (`mdsens predict` follows them only below it; `--spectrum` here asks
# for them at any size, the default computes only the lowest).
SPECTRUM_AUTO_LIMIT = 20_000

Params = param_option(
    "Parameter to differentiate by; repeatable. A name (`diameter`, `sigma`, `epsilon`: "
    "every species and set pair), a species (`diameter.B`), or a pair (`sigma.Ar-Kr`); "
    "see docs/potentials.md. Default: every parameter."
)
AllowUnconverged = allow_unconverged_option(
    "Compute even if the stored state is not relaxed to fmax (the result is marked)."
)
Observables = Annotated[
    list[str] | None,
    typer.Option(
        "--observable",
        metavar="NAME",
        help="Observable q(x*, θ) whose total derivative dq/dθ to every selected parameter is "
        "written to RUN/observables.json; repeatable. `energy`, `pressure`, `stress:xy` (periodic "
        "cells), `distance:I,J`, `gap:I,J` (0-based atom indices), or `FILE.py:FUNCTION` with "
        "FUNCTION(positions, system, params) -> scalar, a JAX function (docs/file-formats.md).",
        show_default=False,
    ),
]
PerParticle = Annotated[
    bool,
    typer.Option(
        "--per-particle",
        help="Make each particle's own value of the selected per-species parameters (`diameter`) "
        "a parameter of its own, and write each observable's gradient by all N of them "
        "(RUN/observables.npz and a column of RUN/sensitivity.extxyz): one adjoint solve per "
        "observable. Needs --observable.",
    ),
]
Mode = Annotated[
    str,
    typer.Option(
        "--mode",
        metavar="auto|forward|reverse",
        help="How observables are differentiated: `reverse` (one adjoint solve per observable), "
        "`forward` (from the dx*/dθ this command solves anyway: no more solves, but one per "
        "particle with --per-particle), or `auto`, the fewer solves.",
    ),
]


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
    observable: Observables = None,
    per_particle: PerParticle = False,
    mode: Mode = "auto",
    spectrum: Annotated[
        bool | None,
        typer.Option(
            "--spectrum/--no-spectrum",
            help="Report the four lowest Hessian eigenvalues (dense up to 1024 degrees of freedom, "
            "ARPACK's Lanczos beyond: can cost more than the relaxation for 10^4 particles). "
            "Default: the same up to 1024 degrees of freedom, beyond it only the lowest eigenvalue "
            "(plain Lanczos, about two linear solves' worth): a stability verdict. "
            "--no-spectrum: none, and no Hessian-mode limit on the validity radius.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Compute dx*/dθ (implicit differentiation) and dE*/dθ (envelope theorem) of a relaxed run.

    Writes RUN/sensitivity.npz (one (N, d) array per parameter), RUN/sensitivity.json (energy
    sensitivities, solver diagnostics, timings, versions) and RUN/sensitivity.extxyz; with
    --observable, RUN/observables.json (each observable's value and total derivative
    dq/dθ = ∂q/∂θ + ∂q/∂x · dx*/dθ) and, with --per-particle, RUN/observables.npz.
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
        from mdsens.observable_gradients import MODES
        from mdsens.parameters import expand_parameters, parameter_names, per_particle_keys
        from mdsens.run import load_run, per_atom_columns, save_sensitivity
        from mdsens.sensitivity import Sensitivity

        system, relaxed, run_dir = load_run(run_dir)
        names = expand_parameters(system, param or parameter_names(system))
        if solver is not None and solver not in ("cg", "dense"):
            raise UserError(f"unknown solver {solver!r}; known: cg, dense")
        if mode not in MODES:
            raise UserError(f"unknown --mode {mode!r}; known: {', '.join(MODES)}")
        if per_particle and not observable:
            raise UserError(
                f"--per-particle needs an --observable: dx*/dθ for each particle's own value would take"
                f" {system.n_particles} forward solves per parameter, while the gradient of an observable"
                " by all of them takes one adjoint solve"
            )
        # Every observable is checked (and a user's file loaded) before anything is computed.
        observables = _parse_observables(system, observable or [])
        keys = per_particle_keys(system, names) if per_particle else []
        per_atom_columns([o.name for o in observables], keys)
        if not relaxed.converged and not allow_unconverged:
            raise UserError(
                f"{run_dir} holds an unconverged relaxation (max|F| {relaxed.max_force:.3g}); "
                "pass --allow-unconverged to differentiate it anyway"
            )
        if note is not None:
            out.print(escape(note))
        out.print(f"Sensitivity of {escape(str(run_dir))} to {', '.join(names)}")
        with_spectrum = "lowest" if spectrum is None else spectrum
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
            if name in result.validity:
                out.print(f"  {'':<25} {escape(_validity(result.validity[name]))}")
        if result.spectrum is not None:
            hessian = result.spectrum
            lowest = ", ".join(f"{v:.3g}" for v in hessian.lowest[:3])
            verdict = "a saddle point" if hessian.negative else "positive off the removed modes"
            if hessian.extra_zero_modes:
                verdict = "an extra zero mode"
            plural = "s" if len(hessian.lowest) > 1 else ""
            removed = ", ".join(result.removed_modes)
            out.print(
                f"  Hessian ({hessian.method}): {verdict}; lowest eigenvalue{plural} {lowest};"
                f" condition number {hessian.condition_number:.3g}; removed: {removed}"
            )
        for warning in result.warnings:
            err.print(f"[bold yellow]Warning:[/] {escape(warning)}")
        gradients = None
        if observables:
            gradients = _observable_gradients(system, relaxed, result, observables, names, keys)
        save_sensitivity(run_dir, system, result, relaxed=relaxed, observables=gradients)

    def _observable_gradients(system, relaxed, result, observables, names, keys):
        from mdsens.observable_gradients import observable_gradients
        from mdsens.parameters import with_per_particle

        params = with_per_particle(system, system.params, keys) if keys else system.params
        dx = {name: entry.dx for name, entry in result.parameters.items()}
        with err.status("differentiating the observables"):
            gradients = observable_gradients(
                system.for_params(params, relaxed.positions),
                relaxed.positions,
                params,
                observables,
                names,
                dx=dx,
                solver=solver,
                mode=mode,
            )
        _print_observables(system, gradients)
        return gradients

    guarded(action)


def _parse_observables(system, specs: list[str]) -> list:
    """The observables named, each once, in order."""
    from mdsens.observables import parse_observable

    out = {}
    for spec in specs:
        parsed = parse_observable(system, spec)
        out.setdefault(parsed.name, parsed)
    return list(out.values())


def _print_observables(system, gradients) -> None:
    """Each observable's value and dq/dθ, how they were computed, and the particles whose own
    value moves it most."""
    import numpy as np

    from mdsens.run import LARGEST_PARTICLES

    out.print(
        f"Observables by {escape(gradients.reason)} ({gradients.solves} new solve(s),"
        f" {gradients.wall_time:.2f} s)"
    )
    for name, entry in gradients.observables.items():
        out.print(f"  {escape(name)} = {entry.value:.10g} ({escape(entry.units)})")
        for parameter, value in entry.gradient.items():
            explicit = entry.explicit[parameter]
            label = f"dq/d({parameter})"
            out.print(f"    {escape(label):<20} = {value:+.10e}  (explicit ∂q/∂θ {explicit:+.4e})")
        for key, values in entry.per_particle.items():
            order = np.argsort(-np.abs(values), kind="stable")[:LARGEST_PARTICLES]
            largest = ", ".join(f"i={i} ({system.species[system.types[i]]}) {values[i]:+.3e}" for i in order)
            out.print(f"    dq/d({escape(key)}[i]), largest: {largest}")
        for warning in entry.warnings:
            err.print(f"[bold yellow]Warning:[/] {escape(warning)}")


def _validity(validity) -> str:
    """How far the parameter may move, each way, before the linear response stops holding."""

    def side(sign: str, limit) -> str:
        if limit.kind == "none":
            return f"{sign}∞"
        return f"{sign}{limit.distance:.3g} ({limit.describe()})"

    return f"linear while Δθ in [{side('−', validity.down)}, {side('+', validity.up)}]"


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
