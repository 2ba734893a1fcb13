"""The pressure's gradient by every particle's diameter from one adjoint solve, against one forward
sensitivity, on the 2-D paper packing (binary-packing, φ = 0.98) at N = 128, 1024 and 8192.

On one relaxed packing (the relaxation is not part of any ratio), timed after compilation (the
best of a few calls, taken in turns so that every ratio compares calls that saw the same load;
the first call's time, compilation included, is reported beside it):

* (a) one forward sensitivity dx*/dθ for the small species' diameter, the paper's θ:
  ``Sensitivity.compute(..., spectrum=False)``;
* (b) dP*/dθ for the N per-particle diameters and the species diameters together, from ONE adjoint
  solve: ``observable_gradients(..., mode="reverse")`` with θ from ``with_per_particle``;
* (c) for reference, the same per-particle derivative in forward mode for 5 random particles: one
  solve each for dx*/d(diameter[i]) (the engine's solve), then dP = ∂P/∂x · dx* + ∂P/∂θ · t by
  ``jax.jvp`` of the pressure.

The table gives the cost ratio (b)/(a) (the issue's bar: ≤ 2 at N = 8192) in wall time and in
this process's CPU time (which other processes on a shared machine do not inflate), the largest
relative disagreement of (b) with (c) on those particles (bar: ≤ 1e-8), the CG iterations of each
solve, and how far the per-species sums of (b) are from (b)'s own species gradients (a species
diameter moves every particle's diameter of that species at once, so they must agree). A second
table times the two linear solves alone and the null space both calls find besides: where (a)
and (b) spend their time. The machine's load average is recorded with each size.

    python benchmarks/observables.py            # N = 128, 1024, 8192
    python benchmarks/observables.py --smoke    # N = 128, into a temporary folder
"""

from __future__ import annotations

import functools
import os
import time

import common
import jax
import numpy as np

SIZES = [128, 1024, 8192]
SMOKE_SIZES = [128]
PARTICLES = 5
REPEATS = 5
COLUMNS = (
    "N",
    "forward_s",
    "adjoint_s",
    "ratio",
    "cpu_ratio",
    "forward_cg",
    "adjoint_cg",
    "per_particle_forward_cg",
    "max_disagreement",
    "species_sum_error",
)
# Where (b)'s time goes beyond its solve.
SOLVE_COLUMNS = (
    "N",
    "forward_solve_s",
    "adjoint_solve_s",
    "solve_ratio",
    "solve_cpu_ratio",
    "nullspace_s",
    "load_average",
)


def measure(n: int, repeats: int = REPEATS, particles: int = PARTICLES, seed: int = 0) -> dict:
    """One size, in this process: relax, then (a), (b) and (c) of the module docstring."""
    import jax.numpy as jnp

    from mdsens import implicit
    from mdsens.observable_gradients import _cotangent_jit, observable_gradients
    from mdsens.observables import parse_observable
    from mdsens.parameters import expand_parameters, per_particle_name, unit_tangent, with_per_particle
    from mdsens.relaxation import Relaxer
    from mdsens.sensitivity import Sensitivity, linear_solve_from_recipe, optimality_fn
    from mdsens.system import load_system

    system = load_system("binary-packing", [f"n_particles={n}"])
    smaller = min(system.species, key=lambda s: float(system.params["diameter"][system.species.index(s)]))
    parameter = f"diameter.{smaller}"
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    x = jnp.asarray(relaxed.positions)
    # θ with zero per-particle offsets: the same energy, and diameter[i] a parameter. One system
    # whose neighbour list covers it and x*, for every call below (each compiles once for it).
    per_particle = with_per_particle(system, system.params, ["diameter"])
    system = system.for_params(per_particle, x)
    species = expand_parameters(system, ["diameter"])
    pressure = parse_observable(system, "pressure")
    pressure_grads = jax.jit(jax.value_and_grad(pressure.fn))

    # (a) One forward sensitivity, as Sensitivity.compute gives it.
    sensitivity = Sensitivity(system)

    def forward_call():
        return sensitivity.compute(relaxed, [parameter], spectrum=False)

    # (b) The pressure by all N diameters and the species diameters, one adjoint solve.
    def adjoint_call():
        return observable_gradients(system, x, per_particle, [pressure], species, mode="reverse")

    # Their linear solves alone, as the two engines compile them: what (a) and (b) cost beyond
    # their solves is the difference (both also find the null space, compiled, once per call).
    tangent = unit_tangent(system, parameter)
    _, q_x = pressure_grads(x, per_particle)
    nullspace_jit = jax.jit(system.nullspace)
    calls = {
        "forward": forward_call,
        "adjoint": adjoint_call,
        "forward_solve": lambda: sensitivity._tangent(x, system.params, tangent),
        "adjoint_solve": lambda: _cotangent_jit(system, None, x, per_particle, q_x),
        "nullspace": lambda: nullspace_jit(x, per_particle),
    }
    first = {}
    for key, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        first[key] = time.perf_counter() - start
    out, best, cpu = _interleaved_best(calls, repeats)
    load = os.getloadavg()[0]
    forward_entry = out["forward"].parameters[parameter]
    result = out["adjoint"].observables["pressure"]
    gradient = result.per_particle["diameter"]

    # (c) Forward mode, particle by particle: the engine's solve for dx*/d(diameter[i]), then the
    # pressure's total derivative along (dx*, t) by jax.jvp, independent of the adjoint code.
    solve = linear_solve_from_recipe(system)

    @jax.jit
    def forward_derivative(x, params, tangent):
        dx, info = implicit.root_jvp(optimality_fn(system), x, params, tangent, solve, system.nullspace)
        _, dp = jax.jvp(pressure.fn, (x, params), (dx, tangent))
        return dp, info

    chosen = np.sort(np.random.default_rng(seed).choice(n, size=particles, replace=False))
    checks = []
    for i in chosen:
        tangent = unit_tangent(system, per_particle_name("diameter", int(i)), per_particle)
        t0 = time.perf_counter()
        dp, info = jax.block_until_ready(forward_derivative(x, per_particle, tangent))
        wall = time.perf_counter() - t0
        dp, adjoint_value = float(dp), float(gradient[i])
        checks.append(
            {
                "particle": int(i),
                "species": system.species[int(system.types[i])],
                "forward": dp,
                "adjoint": adjoint_value,
                # Absolute where the forward value is exactly 0 (a particle without contacts).
                "relative_disagreement": abs(adjoint_value - dp) / abs(dp) if dp else abs(adjoint_value),
                "cg_iterations": int(info.iterations),
                "cg_residual": float(info.residual),
                "converged": bool(info.converged),
                # The first particle's call compiles.
                "wall_s": wall,
            }
        )
    per_particle_s = min(c["wall_s"] for c in checks[1:]) if len(checks) > 1 else None
    per_particle_first = checks[0]["wall_s"]

    # A species diameter moves all its particles' diameters: Σ_i∈s dP/dd_i = dP/dd_s.
    types = np.asarray(system.types)
    sums = []
    for name in species:
        s = name.partition(".")[2]
        total = float(np.sum(gradient[types == system.species.index(s)]))
        sums.append(
            {
                "parameter": name,
                "species_gradient": result.gradient[name],
                "sum_of_per_particle": total,
                "relative_difference": abs(total - result.gradient[name]) / abs(result.gradient[name]),
            }
        )
    return {
        "N": n,
        "parameter": parameter,
        "relax_s": relaxed.wall_time,
        "relax_steps": relaxed.steps,
        "rattlers": int(out["forward"].rattlers.sum()),
        "pressure": result.value,
        "forward_s": best["forward"],
        "forward_cpu_s": cpu["forward"],
        "forward_first_call_s": first["forward"],
        "forward_solve_s": best["forward_solve"],
        "forward_solve_cpu_s": cpu["forward_solve"],
        "forward_cg": forward_entry.iterations,
        "forward_residual": forward_entry.residual,
        "adjoint_s": best["adjoint"],
        "adjoint_cpu_s": cpu["adjoint"],
        "adjoint_first_call_s": first["adjoint"],
        "adjoint_cg": result.iterations,
        "adjoint_residual": result.residual,
        "adjoint_solve_s": best["adjoint_solve"],
        "adjoint_solve_cpu_s": cpu["adjoint_solve"],
        "solve_ratio": best["adjoint_solve"] / best["forward_solve"],
        "solve_cpu_ratio": cpu["adjoint_solve"] / cpu["forward_solve"],
        "nullspace_s": best["nullspace"],
        "adjoint_solves": out["adjoint"].solves,
        "adjoint_mode": out["adjoint"].mode,
        "ratio": best["adjoint"] / best["forward"],
        "cpu_ratio": cpu["adjoint"] / cpu["forward"],
        "per_particle_forward_s": per_particle_s,
        "per_particle_forward_first_call_s": per_particle_first,
        "per_particle_forward_cg": int(np.median([c["cg_iterations"] for c in checks])),
        "max_disagreement": max(c["relative_disagreement"] for c in checks),
        "species_sum_error": max(s["relative_difference"] for s in sums),
        "checks": checks,
        "species_sums": sums,
        "rss_MiB": common.mib(common.peak_rss()),
        # The machine is shared: how busy it was while the timings ran (1-minute average).
        "load_average": load,
    }


def _interleaved_best(calls: dict, repeats: int) -> tuple[dict, dict, dict]:
    """(last result, fastest wall seconds, fewest CPU seconds) of each call, timed in turns (one
    of each per round, for ``repeats`` rounds) so that the ratios compare calls that saw the same
    load, waiting for the device as :func:`common.best_time` does. The CPU time (this process's,
    all threads) is what other processes on a shared machine do not inflate."""
    out = {}
    wall = dict.fromkeys(calls, float("inf"))
    cpu = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for key, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            out[key] = jax.block_until_ready(call())
            wall[key] = min(wall[key], time.perf_counter() - start)
            cpu[key] = min(cpu[key], time.process_time() - start_cpu)
    return out, wall, cpu


def plot(rows: list[dict], path) -> None:
    """Wall time of (a), (b) and their solves against N, and the CG iterations of each solve."""
    common.figure(path, functools.partial(_draw, rows), size=(10, 4), panels=2)


def _draw(rows: list[dict], axes) -> None:
    ax_time, ax_cg = axes
    ok = [r for r in rows if "failed" not in r]
    n = [r["N"] for r in ok]
    ax_time.loglog(n, [r["forward_s"] for r in ok], "o-", label="(a) one forward sensitivity")
    ax_time.loglog(n, [r["adjoint_s"] for r in ok], "s-", label="(b) dP/d(N diameters), one adjoint solve")
    ax_time.loglog(n, [r["forward_solve_s"] for r in ok], "o:", color="C0", label="(a) its solve alone")
    ax_time.loglog(n, [r["adjoint_solve_s"] for r in ok], "s:", color="C1", label="(b) its solve alone")
    ax_time.loglog(
        n, [r["per_particle_forward_s"] for r in ok], "^--", label="(c) forward, one particle's diameter"
    )
    for r in ok:
        ax_time.annotate(
            f"{r['ratio']:.2g}× (CPU {r['cpu_ratio']:.2g}×)",
            (r["N"], r["adjoint_s"]),
            textcoords="offset points",
            xytext=(-40, 8),
            fontsize=8,
        )
    ax_time.set(
        xlabel="N", ylabel="wall time after compilation (s)", title="time ((b)/(a) marked: wall, CPU)"
    )
    ax_cg.semilogx(n, [r["forward_cg"] for r in ok], "o-", label="(a) forward solve")
    ax_cg.semilogx(n, [r["adjoint_cg"] for r in ok], "s-", label="(b) adjoint solve")
    ax_cg.semilogx(
        n, [r["per_particle_forward_cg"] for r in ok], "^--", label="(c) forward, per particle (median)"
    )
    ax_cg.set(xlabel="N", ylabel="CG iterations", title="linear solves")


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    rows = []
    for n in SMOKE_SIZES if args.smoke else SIZES:
        row = common.in_child("observables", "measure", {"n": n}, None, 3600)
        rows.append({"N": n, **row})
        print(common.table(rows[-1:], COLUMNS if "failed" not in row else ("N", "failed")), flush=True)
    ok = [r for r in rows if "failed" not in r]
    print()
    print(common.table(ok, COLUMNS))
    print()
    print(common.table(ok, SOLVE_COLUMNS))
    for r in ok:
        print(f"N = {r['N']}: per-particle checks")
        print(
            common.table(
                r["checks"],
                ("particle", "species", "forward", "adjoint", "relative_disagreement", "cg_iterations"),
            )
        )
        print(
            common.table(
                r["species_sums"],
                ("parameter", "species_gradient", "sum_of_per_particle", "relative_difference"),
            )
        )
    common.write(args.out, "observables", {"particles": PARTICLES, "repeats": REPEATS, "rows": rows})
    plot(rows, args.out / "observables.png")


if __name__ == "__main__":
    main()
