"""All pairs against a neighbour list: where the crossover lies (sets ``AUTO_MIN_PARTICLES``).

The same 2-D packing (binary-packing, φ = 0.98, same seed) relaxed and differentiated with
``neighbors.mode = never`` and ``always``, timed after compilation, with XLA's planned memory of
the relaxation loop. The two must agree: the table shows the relaxed energies' difference too.

    python benchmarks/neighbors.py            # N = 64 … 1024 (all pairs: 25 ms a step at 1024)
    python benchmarks/neighbors.py --smoke    # N = 64, into a temporary folder
"""

from __future__ import annotations

import common

SIZES = (64, 128, 256, 512, 1024)
COLUMNS = (
    "N",
    "all_pairs_relax_s",
    "list_relax_s",
    "speedup",
    "all_pairs_sens_s",
    "list_sens_s",
    "all_pairs_MiB",
    "list_MiB",
    "energy_difference",
)


def timed(n: int, mode: str, fmax: float | None = None) -> dict:
    """Relax and one sensitivity with ``neighbors.mode = mode``, each after compilation."""
    import jax.numpy as jnp

    from mdsens.relaxation import Relaxer
    from mdsens.sensitivity import Sensitivity
    from mdsens.system import load_system

    overrides = [f"n_particles={n}", f'neighbors.mode="{mode}"'] + (
        [f"minimizer.fmax={fmax}"] if fmax else []
    )
    system = load_system("binary-packing", overrides)
    relaxer = Relaxer(system)
    relaxer.relax(max_steps=2)  # compiles the loop
    relaxed = relaxer.relax()
    # The engine for the relaxed state (its list must hold the state's pairs), built once so that
    # the timed call below reuses the first one's compilation.
    sensitivity = Sensitivity(system).for_params(system.params, relaxed.positions)
    sensitivity.compute(relaxed, ["diameter.B"], spectrum=False)
    entry = sensitivity.compute(relaxed, ["diameter.B"], spectrum=False).parameters["diameter.B"]
    x = jnp.asarray(relaxed.positions)
    pair_list = system.pair_list
    neighbors = None if pair_list is None else pair_list.allocate(x)
    state, neighbors = relaxer._start(x, neighbors, system.params)
    memory = common.peak_memory(relaxer._run, state, neighbors, 0, 10, relaxer.fmax, system.params)
    return {
        "relax_s": relaxed.wall_time,
        "steps": relaxed.steps,
        "energy": relaxed.energy,
        "sensitivity_s": entry.wall_time,
        "MiB": common.mib(memory),
    }


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    sizes, fmax = ((64,), 1e-8) if args.smoke else (SIZES, None)
    rows = []
    for n in sizes:
        dense = common.in_child("neighbors", "timed", {"n": n, "mode": "never", "fmax": fmax}, None, 1800)
        listed = common.in_child("neighbors", "timed", {"n": n, "mode": "always", "fmax": fmax}, None, 1800)
        row = {"N": n, "all_pairs": dense, "list": listed}
        if "failed" not in dense and "failed" not in listed:
            row.update(
                {
                    "all_pairs_relax_s": dense["relax_s"],
                    "list_relax_s": listed["relax_s"],
                    "speedup": dense["relax_s"] / listed["relax_s"],
                    "all_pairs_sens_s": dense["sensitivity_s"],
                    "list_sens_s": listed["sensitivity_s"],
                    "all_pairs_MiB": dense["MiB"],
                    "list_MiB": listed["MiB"],
                    "energy_difference": abs(dense["energy"] - listed["energy"]),
                }
            )
        rows.append(row)
        print(common.table(rows[-1:], COLUMNS), flush=True)
    print()
    print(common.table(rows, COLUMNS))
    common.write(args.out, "neighbors", {"rows": rows})
    plot(rows, args.out / "neighbors.png")


def plot(rows: list[dict], path) -> None:
    """Relaxation time against N, all pairs and neighbour list."""
    ok = [r for r in rows if "speedup" in r]

    def draw(ax):
        n = [r["N"] for r in ok]
        ax.loglog(n, [r["all_pairs_relax_s"] for r in ok], "o-", label="all pairs")
        ax.loglog(n, [r["list_relax_s"] for r in ok], "s-", label="neighbour list")
        ax.set(xlabel="N", ylabel="relaxation after compilation (s)", title="2-D packing, φ = 0.98")

    common.figure(path, draw)


if __name__ == "__main__":
    main()
