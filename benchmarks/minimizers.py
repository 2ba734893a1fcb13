"""Minimisers side by side: force evaluations and wall time to max|F| ≤ 1e-12 for JAX-MD's FIRE,
FIRE 2.0 and FIRE 2.0 with a Newton–CG finish, from the same start.

Systems: the 2-D paper packing (binary-packing, φ = 0.98), the 3-D packing (soft-sphere-3d,
φ = 0.70), each at several N and seeds, and the Lennard-Jones fcc crystal with a vacancy
(lj-fcc-vacancy, 255 atoms, rattled by 0.02 σ so that there is something to relax). Methods:

* ``fire``: JAX-MD's FIRE with its default constants (dt_start 0.1, dt_max 0.4; for the LJ
  crystal the recipe's 0.005 and 0.02, without which it diverges);
* ``fire2``: FIRE 2.0 with mdsens's defaults for it (``MINIMIZER_DEFAULTS["fire2"]``), the same for
  every system;
* ``fire2+newton``: the same with ``newton_switch = 1e-6``.

Force evaluations count a Hessian-vector product as two (``RelaxResult.force_evaluations``).
Times exclude compilation: each engine relaxes two steps first, and its Newton finish is
compiled by a call that stops at once. ``wall_s`` is the relaxation's wall time, ``cpu_s`` the
process's CPU time over it (on a shared machine the wall time of one run depends on the others'
load; the CPU time less so). Ratios are against ``fire`` from the same start; a minimiser from a
random start may end in another minimum than ``fire`` (``energy`` tells): the ratio then compares
two paths, which is why every size runs several seeds and the summary gives geometric means.
``same_as_fire2`` says whether fire2+newton ended in fire2's minimum (relative energy difference
≤ 1e-10).

    python benchmarks/minimizers.py            # the committed run (about 10 minutes on two cores)
    python benchmarks/minimizers.py --smoke    # N = 64 and a small crystal, into a temporary folder
"""

from __future__ import annotations

import functools
import math
import time

import common

FMAX = 1e-12
NEWTON_SWITCH = 1e-6
METHODS = ("fire", "fire2", "fire2+newton")
# (case, recipe, overrides, sizes, seeds): sizes None means the recipe's own system.
CASES = (
    ("2-D packing", "binary-packing", [], (1024,), (0, 1)),
    ("2-D packing", "binary-packing", [], (4096,), (0,)),
    ("3-D packing", "soft-sphere-3d", [], (1024, 4096), (0,)),
    ("LJ fcc vacancy", "lj-fcc-vacancy", ["rattle=0.02"], (None,), (0,)),
)
SMALL_CRYSTAL = [
    "lattice.repeat=[2,2,2]",
    "potential.r_onset=1.2",
    "potential.r_cutoff=1.5",
    "rattle=0.02",
]
SMOKE_CASES = (
    ("2-D packing", "binary-packing", [], (64,), (0,)),
    ("3-D packing", "soft-sphere-3d", [], (64,), (0,)),
    ("LJ fcc vacancy", "lj-fcc-vacancy", SMALL_CRYSTAL, (None,), (0,)),
)
COLUMNS = (
    "case",
    "N",
    "seed",
    "method",
    "converged",
    "steps",
    "newton_iterations",
    "force_evaluations",
    "wall_s",
    "cpu_s",
    "evaluations_ratio",
    "wall_ratio",
    "cpu_ratio",
    "energy",
)


def overrides_for(method: str, base: list[str]) -> list[str]:
    """The recipe overrides that select ``method`` (fire keeps the recipe's FIRE steps)."""
    from mdsens.recipe import MINIMIZER_DEFAULTS

    out = [*base, f"minimizer.fmax={FMAX}", "minimizer.max_steps=1000000"]
    if method == "fire":
        return [*out, 'minimizer.name="fire"']
    settings = dict(MINIMIZER_DEFAULTS["fire2"])
    if method == "fire2+newton":
        settings["newton_switch"] = NEWTON_SWITCH
    fixed = [f"minimizer.{k}={v}" for k, v in settings.items() if k not in ("fmax", "max_steps")]
    return [*out, 'minimizer.name="fire2"', *fixed]


def measure(recipe: str, base: list[str], n: int | None, seed: int) -> dict:
    """Every method from the same start, in this process; compilation excluded from the times."""
    import jax.numpy as jnp

    from mdsens.relaxation import Relaxer
    from mdsens.system import load_system

    size = [] if n is None else [f"n_particles={n}"]
    out = {}
    for method in METHODS:
        system = load_system(recipe, [*size, *overrides_for(method, base)], seed=seed)
        relaxer = Relaxer(system)
        relaxer.relax(max_steps=2)
        if relaxer._newton is not None:
            x0 = jnp.asarray(system.positions)
            relaxer._newton(x0, relaxer._neighbors0, system.params, math.inf)  # stops at once: compiles
            system.contact_changes(x0, system.params, x0, system.params)
        cpu = time.process_time()
        result = relaxer.relax()
        cpu = time.process_time() - cpu
        out[method] = {
            "N": system.n_particles,
            "converged": result.converged,
            "reason": result.reason,
            "steps": result.steps,
            "newton_iterations": result.newton_iterations,
            "newton": result.newton,
            "contact_changes": result.contact_changes,
            "force_evaluations": result.force_evaluations,
            "wall_s": result.wall_time,
            "cpu_s": cpu,
            "energy": result.energy,
            "max_force": result.max_force,
            "neighbor_list": system.pair_list is not None,
        }
    return out


def rows_of(case: str, n: int | None, seed: int, runs: dict) -> list[dict]:
    """One row per method, with its ratios to fire."""
    fire = runs["fire"]
    rows = []
    for method in METHODS:
        run = runs[method]
        row = {"case": case, "N": run["N"], "seed": seed, "method": method, **run}
        for key, column in (
            ("force_evaluations", "evaluations_ratio"),
            ("wall_s", "wall_ratio"),
            ("cpu_s", "cpu_ratio"),
        ):
            row[column] = run[key] / fire[key] if fire["converged"] and run["converged"] else None
        rows.append(row)
    a, b = runs["fire2"]["energy"], runs["fire2+newton"]["energy"]
    rows[-1]["same_as_fire2"] = abs(a - b) <= 1e-10 * max(abs(a), 1e-300)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Geometric means of the ratios to fire, per case and method."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for method in METHODS[1:]:
            picked = [r for r in rows if r["case"] == case and r["method"] == method]
            entry = {"case": case, "method": method, "runs": len(picked)}
            for column in ("evaluations_ratio", "wall_ratio", "cpu_ratio"):
                values = [r[column] for r in picked if r.get(column)]
                entry[column] = (
                    math.exp(sum(map(math.log, values)) / len(values)) if len(values) == len(picked) else None
                )
            out.append(entry)
    return out


def plot(rows: list[dict], path) -> None:
    common.figure(path, functools.partial(_draw, rows), size=(15, 4.5), panels=3, sharey=True)


def _draw(rows: list[dict], axes) -> None:
    ok = [r for r in rows if r.get("evaluations_ratio") and r["method"] != "fire"]
    labels = list(dict.fromkeys(f"{r['case']}\nN={r['N']} s{r['seed']}" for r in ok))
    for ax, column, target, title in (
        (axes[0], "evaluations_ratio", 0.5, "force evaluations ÷ FIRE's (HVP = 2)"),
        (axes[1], "wall_ratio", 0.6, "wall time ÷ FIRE's (after compilation)"),
        (axes[2], "cpu_ratio", 0.6, "CPU time ÷ FIRE's (less sensitive to the machine's load)"),
    ):
        for k, (method, marker) in enumerate((("fire2", "o"), ("fire2+newton", "s"))):
            mine = {f"{r['case']}\nN={r['N']} s{r['seed']}": r[column] for r in ok if r["method"] == method}
            xs = [i + 0.15 * (2 * k - 1) for i, label in enumerate(labels) if label in mine]
            ax.plot(xs, [mine[label] for label in labels if label in mine], marker, label=method)
        ax.axhline(1.0, color="0.4", lw=1, label="FIRE (JAX-MD)")
        ax.axhline(target, color="C3", lw=1, ls="--", label=f"target {target}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("ratio to FIRE from the same start")


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    cases = SMOKE_CASES if args.smoke else CASES
    rows = []
    for case, recipe, base, sizes, seeds in cases:
        for n in sizes:
            for seed in seeds:
                kwargs = {"recipe": recipe, "base": base, "n": n, "seed": seed}
                runs = common.in_child("minimizers", "measure", kwargs, None, 3600)
                if "failed" in runs:
                    rows.append({"case": case, "N": n, "seed": seed, "failed": runs["failed"]})
                    print(common.table(rows[-1:], ("case", "N", "seed", "failed")), flush=True)
                    continue
                rows += rows_of(case, n, seed, runs)
                print(common.table(rows[-len(METHODS) :], COLUMNS), flush=True)
    print()
    done = [r for r in rows if "failed" not in r]
    print(common.table(done, COLUMNS))
    means = summary(done)
    print()
    print(common.table(means, ("case", "method", "runs", "evaluations_ratio", "wall_ratio", "cpu_ratio")))
    common.write(
        args.out,
        "minimizers",
        {
            "description": __doc__.strip().splitlines()[0],
            "fmax": FMAX,
            "newton_switch": NEWTON_SWITCH,
            "rows": rows,
            "summary": means,
        },
    )
    plot(done, args.out / "minimizers.png")


if __name__ == "__main__":
    main()
