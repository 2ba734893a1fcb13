"""How relaxation and sensitivity scale with N: wall time, the sensitivity ÷ relaxation ratio and
peak memory, for 2-D (binary-packing, φ = 0.98) and 3-D (soft-sphere-3d, φ = 0.70) packings.

Each size runs in its own process (its peak resident memory is then its own). Times exclude
compilation: the relaxation is compiled by a two-step relaxation of the same shapes first, and
the sensitivity is timed on its second call. Memory is XLA's plan for one compiled call (inputs,
outputs and temporaries; nothing is run to measure it): the relaxation's loop of steps against
one forward-mode sensitivity solve. The parameter is the small species' diameter, the paper's θ.

    python benchmarks/scaling.py            # N = 10^3 … 6.6·10^4 (2-D), 10^3 … 1.6·10^4 (3-D)
    python benchmarks/scaling.py --smoke    # small sizes, into a temporary folder
"""

from __future__ import annotations

import functools
import time

import common

SIZES = {2: [1024, 4096, 16384, 65536], 3: [1024, 4096, 16384]}
SMOKE_SIZES = {2: [64], 3: [64]}
RECIPES = {2: "binary-packing", 3: "soft-sphere-3d"}
COLUMNS = (
    "d",
    "N",
    "neighbor_list",
    "relax_steps",
    "relax_s",
    "sensitivity_s",
    "ratio",
    "cg_iterations",
    "relax_MiB",
    "sensitivity_MiB",
    "memory_ratio",
    "rss_MiB",
)


def measure(dimension: int, n: int, fmax: float | None = None) -> dict:
    """One size, in this process: relax, then one sensitivity, each timed after compilation."""
    import jax.numpy as jnp

    from mdsens.parameters import unit_tangent
    from mdsens.relaxation import Relaxer
    from mdsens.sensitivity import Sensitivity
    from mdsens.system import load_system

    overrides = [f"n_particles={n}"] + ([f"minimizer.fmax={fmax}"] if fmax else [])
    system = load_system(RECIPES[dimension], overrides)
    smaller = min(system.species, key=lambda s: float(system.params["diameter"][system.species.index(s)]))
    parameter = f"diameter.{smaller}"

    relaxer = Relaxer(system)
    start = time.perf_counter()
    relaxer.relax(max_steps=2)
    compile_relax = time.perf_counter() - start
    relaxed = relaxer.relax()
    relaxed.require_converged()

    # The engine for the relaxed state (its list must hold the state's pairs), built once so that
    # the timed second call reuses the first one's compilation.
    sensitivity = Sensitivity(system).for_params(system.params, relaxed.positions)
    start = time.perf_counter()
    sensitivity.compute(relaxed, [parameter], spectrum=False)
    first = time.perf_counter() - start
    result = sensitivity.compute(relaxed, [parameter], spectrum=False)
    entry = result.parameters[parameter]

    # Memory: one call of the relaxation's loop, one sensitivity solve.
    x = jnp.asarray(relaxed.positions)
    params = system.params
    pair_list = system.pair_list
    neighbors = None if pair_list is None else pair_list.allocate(x)
    state, neighbors = relaxer._start(x, neighbors, params)
    relax_memory = common.peak_memory(relaxer._run, state, neighbors, 0, 10, relaxer.fmax, params)
    tangent = unit_tangent(system, parameter)
    sensitivity_memory = common.peak_memory(sensitivity._tangent, x, params, tangent)
    return {
        "d": dimension,
        "N": n,
        "parameter": parameter,
        "neighbor_list": pair_list is not None,
        "relax_steps": relaxed.steps,
        "relax_s": relaxed.wall_time,
        "relax_compile_s": compile_relax,
        "sensitivity_s": entry.wall_time,
        "sensitivity_first_call_s": first,
        "ratio": entry.wall_time / relaxed.wall_time,
        "cg_iterations": entry.iterations,
        "cg_residual": entry.residual,
        "rattlers": int(result.rattlers.sum()),
        "relax_MiB": common.mib(relax_memory),
        "sensitivity_MiB": common.mib(sensitivity_memory),
        "memory_ratio": None if not relax_memory else sensitivity_memory / relax_memory,
        "rss_MiB": common.mib(common.peak_rss()),
    }


def plot(rows: list[dict], path) -> None:
    common.figure(path, functools.partial(_draw, rows), size=(10, 4), panels=2)


def _draw(rows: list[dict], axes) -> None:
    ax_time, ax_memory = axes
    for d, marker in ((2, "o"), (3, "s")):
        ok = [r for r in rows if r["d"] == d and "failed" not in r]
        if not ok:
            continue
        n = [r["N"] for r in ok]
        ax_time.loglog(n, [r["relax_s"] for r in ok], marker + "-", label=f"{d}-D relaxation")
        ax_time.loglog(n, [r["sensitivity_s"] for r in ok], marker + "--", label=f"{d}-D sensitivity (1 θ)")
        ax_memory.loglog(n, [r["relax_MiB"] for r in ok], marker + "-", label=f"{d}-D relaxation (XLA)")
        ax_memory.loglog(
            n, [r["sensitivity_MiB"] for r in ok], marker + "--", label=f"{d}-D sensitivity (XLA)"
        )
        ax_memory.loglog(n, [r["rss_MiB"] for r in ok], marker + ":", label=f"{d}-D process peak RSS")
    ax_time.set(xlabel="N", ylabel="wall time after compilation (s)", title="time")
    ax_memory.set(xlabel="N", ylabel="peak memory (MiB)", title="memory")


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    sizes = SMOKE_SIZES if args.smoke else SIZES
    fmax = 1e-8 if args.smoke else None
    rows = []
    for d, ns in sizes.items():
        for n in ns:
            row = common.in_child("scaling", "measure", {"dimension": d, "n": n, "fmax": fmax}, None, 3600)
            rows.append({"d": d, "N": n, **row})
            print(
                common.table(rows[-1:], COLUMNS if "failed" not in row else ("d", "N", "failed")), flush=True
            )
    print()
    print(common.table([r for r in rows if "failed" not in r], COLUMNS))
    common.write(args.out, "scaling", {"rows": rows})
    plot(rows, args.out / "scaling.png")


if __name__ == "__main__":
    main()
