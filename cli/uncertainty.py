"""``mdsens uncertainty``: first-order uncertainty of a relaxed run from uncertain parameters, with
an optional Monte Carlo check; printed and written beside the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mdsens.errors import UserError

from .console import err, guarded, out
from .options import RunOption
from .runs import chosen_run

Std = Annotated[
    list[str] | None,
    typer.Option(
        "--std",
        metavar="NAME=VALUE",
        help="Standard deviation of a parameter, absolute (diameter.B=0.01, in the parameter's "
        "units) or relative to its value with a % sign (diameter.B=1%); repeatable, all "
        "independent. A bare per-species name gives each species its own, independent one "
        "(diameter=1%: diameter.A and diameter.B). Names as for `mdsens sensitivity --param`.",
        show_default=False,
    ),
]
Cov = Annotated[
    Path | None,
    typer.Option(
        "--cov",
        metavar="FILE",
        help="Covariance matrix of parameters, in their units squared: a .json file "
        '{"names": ["diameter.A", "diameter.B"], "matrix": [[1e-4, 2e-5], [2e-5, 4e-5]]}, or a '
        ".csv file with a header row of names and one row of numbers per name. It must be "
        "symmetric positive semi-definite over scalar parameter names, each once; with --std, "
        "the two sets of parameters must differ and are independent of each other.",
        show_default=False,
    ),
]
Observables = Annotated[
    list[str] | None,
    typer.Option(
        "--observable",
        metavar="NAME",
        help="Observable whose σ to report; repeatable: energy, pressure, stress:xy, "
        "distance:I,J, gap:I,J (0-based atom indices) or FILE.py:FUNCTION (a function "
        "(positions, system, params) -> scalar).",
        show_default=False,
    ),
]
Samples = Annotated[
    int,
    typer.Option(
        "--samples",
        metavar="K",
        help="Monte Carlo check: relax the system again at K parameter sets drawn from the "
        "normal distribution of the given covariance (each from the relaxed state) and report "
        "the sample standard deviations beside the first-order ones, and how many samples "
        "changed the contact network. 0: first order only.",
    ),
]
Seed = Annotated[
    int,
    typer.Option("--seed", metavar="N", help="Seed of the Monte Carlo draws (NumPy's default generator)."),
]


def uncertainty(
    std: Std = None,
    cov: Cov = None,
    observable: Observables = None,
    samples: Samples = 0,
    seed: Seed = 0,
    run: RunOption = None,
) -> None:
    """Propagate parameter uncertainty to the relaxed structure and observables (first order),
    with an optional Monte Carlo check.

    To first order x*(θ + δ) ≈ x* + J δ with J = dx*/dθ, so atom i's positional covariance is
    the d × d block C_i = J_i Σθ J_iᵀ (σ_i = √tr C_i) and an observable's σ_q² = g Σθ gᵀ with g
    = dq/dθ its total derivative. Rattlers' positions are not determined: they have no
    uncertainty (masked). Writes RUN/uncertainty.json (inputs, Σθ, σ of every observable, the
    positional summary, Monte Carlo results, timings, versions), RUN/uncertainty.npz (per-atom
    covariance blocks (N, d, d), σ, Jacobian, samples) and RUN/uncertainty.png (1-σ ellipses on
    the configuration), with --samples also RUN/uncertainty-samples.png.
    """

    def action():
        from mdsens.run_lock import run_lock
        from mdsens.uncertainty import parse_std
        from mdsens.uncertainty_files import read_covariance

        # What can be checked without the run's system first: building it takes seconds.
        if samples < 0:
            raise UserError(f"--samples must be 0 or more, not {samples}")
        if not std and cov is None:
            raise UserError("give the parameters' uncertainty: --std NAME=VALUE (repeatable) or --cov FILE")
        for spec in std or []:
            parse_std(spec)
        matrix = None if cov is None else read_covariance(cov)
        run_dir, note = chosen_run(run)
        with run_lock(run_dir, "uncertainty"):
            _compute_and_save(run_dir, note, matrix)
        out.print(str(run_dir), markup=False)

    def _compute_and_save(run_dir, note, matrix):
        from mdsens.observables import parse_observable
        from mdsens.relaxation import Relaxer
        from mdsens.run import load_run
        from mdsens.uncertainty import (
            block_diagonal,
            compare,
            covariance_from_matrix,
            covariance_from_std,
            propagate,
        )
        from mdsens.uncertainty_files import save_uncertainty

        system, relaxed, run_dir = load_run(run_dir)
        parts = [covariance_from_std(system, std or [])]
        if matrix is not None:
            parts.append(covariance_from_matrix(system, *matrix))
        covariance = block_diagonal(parts)
        for spec in observable or []:
            parse_observable(system, spec)  # refused now, not after the solves
        if not relaxed.converged:
            raise UserError(
                f"{run_dir} holds an unconverged relaxation (max|F| {relaxed.max_force:.3g}): relax it again"
            )
        if note is not None:
            out.print(escape(note))
        out.print(f"Uncertainty of {escape(str(run_dir))}")
        for name, value, sigma in zip(covariance.names, covariance.values, covariance.std, strict=True):
            out.print(f"  {escape(name):<14} = {value:<10g} σ = {sigma:.4g}")
        with err.status("compiling and solving dx*/dθ"):
            linear = propagate(system, relaxed, covariance, observable or [])
        mc = None
        if samples:
            mc = _monte_carlo(system, relaxed, linear, Relaxer(system))
        _report(linear, mc, None if mc is None else compare(linear, mc))
        for warning in linear.warnings:
            err.print(f"[bold yellow]Warning:[/] {escape(warning)}")
        inputs = {
            "std": list(std or []),
            "covariance_file": None if cov is None else str(cov),
            "observables": list(observable or []),
            "samples": samples,
            "seed": seed,
        }
        save_uncertainty(run_dir, system, relaxed, linear, mc, inputs)

    def _monte_carlo(system, relaxed, linear, relaxer):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from mdsens.uncertainty import monte_carlo

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("relaxing samples (compiling)", total=samples)

            def report(done: int, converged: int) -> None:
                progress.update(task, completed=done, description=f"relaxing samples ({converged} converged)")

            return monte_carlo(system, relaxed, linear, samples, seed, relaxer=relaxer, progress=report)

    guarded(action)


def _ratio(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # NaN: nothing to compare


def _report(linear, mc, comparison) -> None:
    """What a user reads: positional σ, each observable's σ, and the Monte Carlo check."""
    atoms = ~linear.rattlers
    sigma = linear.sigma[atoms]
    masked = f" ({int(linear.rattlers.sum())} rattlers masked)" if linear.rattlers.any() else ""
    if sigma.size:
        worst = int(linear.sigma.argmax())
        out.print(
            f"  positions (first order){masked}: RMS σ_i = {float((sigma**2).mean() ** 0.5):.4e}, "
            f"max σ_i = {float(linear.sigma[worst]):.4e} (atom {worst})"
        )
    for name, entry in linear.observables.items():
        line = f"  {escape(name):<14} = {entry.value:<.10g} σ = {entry.sigma:.4e} (first order)"
        if mc is not None:
            sampled = float(mc.observable_sigma[mc.observable_names.index(name)])
            line += (
                f", σ_MC = {sampled:.4e}, ratio {_ratio(comparison.nominal.observables[name])}"
                f" (drawn δ: {_ratio(comparison.drawn.observables[name])})"
            )
        out.print(line)
    if mc is None:
        return
    out.print(
        f"  Monte Carlo: {mc.used} of {len(mc.converged)} samples converged (seed {mc.seed}), "
        f"{mc.changed} changed the contact network"
    )
    for label, ratios in (("σ_linear", comparison.nominal), ("σ_linear of the δ drawn", comparison.drawn)):
        p = ratios.percentiles
        out.print(
            f"  σ_MC / {label} per atom: median {_ratio(p[50.0])}, 5-95 % {_ratio(p[5.0])} to "
            f"{_ratio(p[95.0])}; total RMS ratio {_ratio(ratios.rms_ratio)}"
        )
    out.print(
        f"  sampling error of one σ from {mc.used} samples: ±{_ratio(comparison.sampling_error)} (none"
        " in the ratio to the δ drawn, which is 1 where x* responds linearly)"
    )
    if mc.changed:
        out.print(
            f"  {mc.changed} sample(s) changed contacts: there the structure is not a smooth function"
            " of θ and the first-order σ need not hold"
        )
    for k, reason in enumerate(mc.reasons):
        if reason:
            err.print(f"[bold yellow]Warning:[/] sample {k} left out: {escape(reason)}")
