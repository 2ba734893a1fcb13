"""Implicit differentiation against central finite differences, per parameter, at N = 8192.

Finite differences are what a user does without mdsens: relax at θ + h and θ − h, both warm-started
from x*, and take (x₊ − x₋) / 2h. Both are timed after compilation on the same relaxed packing
(2-D binary-packing, φ = 0.98), for one parameter (the small species' diameter) and for every
species diameter. Accuracy is measured against a reference solve of the same linear system with a
100× tighter tolerance and no absolute floor; finite differences are scanned over h, and the
table says how many particles changed contacts between θ ± h (where finite differences cannot be
right). Two speed ratios use the most accurate h: against the implicit answer at the recipe's CG
tolerance (1e-12: far more accurate), and at equal accuracy, against the cheapest looser CG
tolerance whose error is no larger than the finite differences'.

    python benchmarks/finite_differences.py            # N = 8192
    python benchmarks/finite_differences.py --smoke    # N = 128, into a temporary folder
"""

from __future__ import annotations

import time

import common
import numpy as np

STEPS = (1e-4, 1e-5, 1e-6, 1e-7)
# Looser CG tolerances: the implicit answer at the accuracy finite differences reach.
TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6, 1e-8)
COLUMNS = ("method", "parameter", "h", "wall_s", "error", "contact_changes", "steps")


def run(n: int, steps=STEPS, tolerances=TOLERANCES) -> dict:
    import jax
    import jax.numpy as jnp

    from mdsens import implicit
    from mdsens.parameters import expand_parameters, unit_tangent
    from mdsens.references import central_difference, relative_error
    from mdsens.relaxation import Relaxer
    from mdsens.sensitivity import Sensitivity, optimality_fn
    from mdsens.system import load_system

    system = load_system("binary-packing", [f"n_particles={n}"])
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    # One engine for every finite difference, its neighbour list with room for the pairs at x*.
    relaxer = relaxer.for_params(system.params, relaxed.positions)
    system = relaxer.system
    x = jnp.asarray(relaxed.positions)
    names = expand_parameters(system, ["diameter"])
    sensitivity = Sensitivity(system)
    sensitivity.compute(relaxed, names, spectrum=False)  # compile
    start = time.perf_counter()
    result = sensitivity.compute(relaxed, names, spectrum=False)
    implicit_all = time.perf_counter() - start

    tight = implicit.cg(tol=1e-2 * system.recipe["sensitivity"]["tol"], maxiter=100 * x.size)
    reference_fn = jax.jit(
        lambda x, p, t: implicit.root_jvp(optimality_fn(system), x, p, t, tight, system.nullspace)
    )
    atol = system.recipe["minimizer"]["fmax"] * np.sqrt(x.size)

    def tangent_fn(solve):
        return jax.jit(
            lambda x, p, t: implicit.root_jvp(optimality_fn(system), x, p, t, solve, system.nullspace)
        )

    loose = {tol: tangent_fn(implicit.cg(tol=tol, atol=atol)) for tol in tolerances}

    rows = []
    for name in names:
        tangent = unit_tangent(system, name)
        reference, info = reference_fn(x, system.params, tangent)
        reference = np.asarray(reference)
        entry = result.parameters[name]
        rows.append(
            {
                "method": "implicit",
                "parameter": name,
                "wall_s": entry.wall_time,
                "error": relative_error(entry.dx, reference),
                "steps": entry.iterations,
                "reference_residual": float(info.residual),
            }
        )
        for tol, solve in loose.items():
            jax.block_until_ready(solve(x, system.params, tangent))  # compile
            (dx, info), wall = common.best_time(lambda s=solve, t=tangent: s(x, system.params, t), 3)
            rows.append(
                {
                    "method": f"implicit, CG tol {tol:g}",
                    "parameter": name,
                    "wall_s": wall,
                    "error": relative_error(dx, reference),
                    "steps": int(info.iterations),
                }
            )
        for h in steps:
            fd = central_difference(relaxer, relaxed.positions, system.params, tangent, h)
            rows.append(
                {
                    "method": "finite differences",
                    "parameter": name,
                    "h": h,
                    "wall_s": fd.wall_time,
                    "error": relative_error(fd.dx, reference),
                    "contact_changes": int(fd.changed.sum()),
                    "steps": fd.plus.steps + fd.minus.steps,
                    "converged": fd.converged,
                }
            )
    summary = []
    for name in names:
        own = [r for r in rows if r["parameter"] == name]
        implicit_rows = [r for r in own if r["method"].startswith("implicit")]
        fd = min((r for r in own if "h" in r), key=lambda r: r["error"])
        # The cheapest implicit answer at least as accurate as the best finite difference.
        matched = min((r for r in implicit_rows if r["error"] <= fd["error"]), key=lambda r: r["wall_s"])
        summary.append(
            {
                "parameter": name,
                "implicit_s": implicit_rows[0]["wall_s"],
                "implicit_error": implicit_rows[0]["error"],
                "fd_best_h": fd["h"],
                "fd_s": fd["wall_s"],
                "fd_error": fd["error"],
                "speedup": fd["wall_s"] / implicit_rows[0]["wall_s"],
                "matched": matched["method"],
                "matched_s": matched["wall_s"],
                "matched_error": matched["error"],
                "speedup_at_equal_accuracy": fd["wall_s"] / matched["wall_s"],
            }
        )
    fd_all = sum(s["fd_s"] for s in summary)
    return {
        "N": n,
        "relax_s": relaxed.wall_time,
        "relax_steps": relaxed.steps,
        "rattlers": int(result.rattlers.sum()),
        "rows": rows,
        "summary": summary,
        "all_diameters": {"implicit_s": implicit_all, "fd_s": fd_all, "speedup": fd_all / implicit_all},
    }


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    n = 128 if args.smoke else 8192
    out = run(n, STEPS[:2] if args.smoke else STEPS, TOLERANCES[:1] if args.smoke else TOLERANCES)
    print(
        f"N = {n}: relaxation {out['relax_s']:.3g} s ({out['relax_steps']} steps), {out['rattlers']} rattlers"
    )
    print(common.table(out["rows"], COLUMNS))
    print()
    print(common.table(out["summary"], list(out["summary"][0])))
    every = out["all_diameters"]
    print(
        f"all species diameters: implicit {every['implicit_s']:.3g} s, finite differences"
        f" {every['fd_s']:.3g} s: {every['speedup']:.3g}x"
    )
    common.write(args.out, "finite_differences", out)
    plot(out, args.out / "finite_differences.png")


def plot(out: dict, path) -> None:
    """Error against wall time: implicit at several CG tolerances, finite differences at several h."""

    def draw(ax):
        for k, name in enumerate(dict.fromkeys(r["parameter"] for r in out["rows"])):
            own = [r for r in out["rows"] if r["parameter"] == name]
            implicit_rows = sorted((r for r in own if "h" not in r), key=lambda r: r["wall_s"])
            fd = [r for r in own if "h" in r]
            ax.loglog(
                [r["wall_s"] for r in implicit_rows],
                [r["error"] for r in implicit_rows],
                "o-",
                color=f"C{k}",
                label=f"implicit, CG tolerances ({name})",
            )
            ax.loglog(
                [r["wall_s"] for r in fd],
                [r["error"] for r in fd],
                "s--",
                color=f"C{k}",
                mfc="none",
                label=f"finite differences, h = 1e-4 … 1e-7 ({name})",
            )
        ax.set(
            xlabel="wall time per parameter (s)",
            ylabel="relative error",
            title=f"N = {out['N']}: implicit vs central differences",
        )

    common.figure(path, draw, size=(6.5, 4.5))


if __name__ == "__main__":
    main()
