"""mdsens relaxation vs ASE's FIRE driving a NumPy calculator of the same potential.

What it measures: the wall time to relax the default system (2-D bidisperse harmonic soft-sphere
packing, ``binary-packing``, φ = 0.98, uniform random start) to max_i |F_i| ≤ fmax (1e-12, the
recipe's tolerance), at N = 1000 and 10000, two ways:

* **mdsens**: :class:`mdsens.relaxation.Relaxer` (JAX-MD's FIRE inside a compiled
  ``lax.while_loop``); the first relax (compilation included) and a second identical one
  (compiled) are both timed.
* **ASE**: ``ase.optimize.FIRE`` with its default parameters driving :class:`SoftSphereCalculator`,
  a vectorised NumPy/SciPy calculator of the same potential (pairs from a periodic
  ``scipy.spatial.cKDTree`` every call): what a user of the ordinary Python stack would write.

Why: it puts the compiled, on-device loop against the usual host loop in which every step goes
through Python, ASE's bookkeeping and a fresh pair search. Both use the same convergence
criterion (ASE's fmax is the largest per-atom force norm too), but not the same FIRE constants
(ASE: dt = 0.1, dt_max = 1, maxstep = 0.2; mdsens: the recipe's dt_start = 0.1, dt_max = 0.4),
so they take different numbers of steps and may land in different minima: both energies are
reported, and ms per step compares the cost of one step independently of the step count.

Before timing ASE, the calculator's energy and forces at the initial positions are checked
against mdsens's ``energy_fn``/``force_fn`` (relative difference ≤ 1e-10, asserted).

Each (method, N) runs in a fresh process (:func:`common.in_child`), so the compilation time of
mdsens is measured cold and one run cannot take the others down (``--smoke`` runs in-process,
mdsens first). ASE runs under a step cap and a
wall-time cap and records whether it converged or hit a cap.

Run: ``python benchmarks/ase_fire.py`` (N = 1000 and 10000; the ASE run at 10^4 may take up to
the 900 s wall cap), ``--sizes 1000`` for some sizes only, ``--wall-cap S`` for another ASE cap,
``--smoke`` for N = 64 at fmax = 1e-6.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from common import arguments, in_child, table, write
from scipy.spatial import cKDTree

SIZES = (1000, 10000)
SMOKE_SIZES = (64,)
FMAX = 1e-12  # the recipe's minimizer.fmax
SMOKE_FMAX = 1e-6
STEP_CAP = 200_000  # for both: mdsens gets it as minimizer.max_steps
WALL_CAP = 900.0  # seconds, ASE only (mdsens runs in chunks but has no wall-time cap)
CHECK_TOLERANCE = 1e-10


class SoftSphereCalculator(Calculator):
    """Harmonic (any α) soft spheres in a 2-D periodic box, in NumPy/SciPy.

    U = Σ_{i<j} ε_ij/α_ij (1 − r_ij/σ_ij)^α_ij for r_ij < σ_ij (minimum image), with per-pair
    σ, ε, α taken from (S, S) species tables. Atoms live in the plane z = 0; the z forces are 0.
    Pairs are found afresh at every call with a periodic k-d tree (cutoff max σ).

    Args:
        types: species index of every atom, shape (N,).
        box: side lengths (Lx, Ly) of the periodic box.
        diameter, epsilon, alpha: (S, S) pair tables (``System.pair_values()``).
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, types, box, diameter, epsilon, alpha, **kwargs):
        super().__init__(**kwargs)
        self.types = np.asarray(types, dtype=np.intp)
        self.box = np.asarray(box, dtype=np.float64)
        self.sigma = np.asarray(diameter, dtype=np.float64)
        self.epsilon = np.asarray(epsilon, dtype=np.float64)
        self.alpha = np.asarray(alpha, dtype=np.float64)
        self.reach = float(self.sigma.max())

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, forces = self.energy_forces(self.atoms.positions[:, :2])
        forces3 = np.zeros((len(forces), 3))
        forces3[:, :2] = forces
        self.results = {"energy": energy, "forces": forces3}

    def energy_forces(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy and (N, 2) forces at positions ``x`` (N, 2), wrapped or not."""
        n = len(x)
        x = np.mod(x, self.box)
        x[x >= self.box] = 0.0  # np.mod rounds a tiny negative coordinate up to the side itself
        pairs = cKDTree(x, boxsize=self.box).query_pairs(self.reach, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        d = x[i] - x[j]
        d -= self.box * np.round(d / self.box)
        r = np.sqrt(np.einsum("pk,pk->p", d, d))
        ti, tj = self.types[i], self.types[j]
        sigma = self.sigma[ti, tj]
        touching = r < sigma
        i, j, d, r, sigma = i[touching], j[touching], d[touching], r[touching], sigma[touching]
        ti, tj = ti[touching], tj[touching]
        epsilon, alpha = self.epsilon[ti, tj], self.alpha[ti, tj]
        gap = 1.0 - r / sigma
        energy = float(np.sum(epsilon / alpha * gap**alpha))
        # F_i = −dU/dr · d/r with dU/dr = −ε/σ (1 − r/σ)^(α−1); F_j = −F_i.
        f = (epsilon / sigma * gap ** (alpha - 1.0) / r)[:, None] * d
        forces = np.stack(
            [np.bincount(i, f[:, k], minlength=n) - np.bincount(j, f[:, k], minlength=n) for k in range(2)],
            axis=1,
        )
        return energy, forces


def _system(n: int, fmax: float, step_cap: int):
    from mdsens.system import load_system

    return load_system(
        "binary-packing", [f"n_particles={n}", f"minimizer.fmax={fmax}", f"minimizer.max_steps={step_cap}"]
    )


def calculator_for(system) -> SoftSphereCalculator:
    """The NumPy calculator of a soft-sphere ``System`` (its species tables and box)."""
    tables = {k: np.asarray(v) for k, v in system.pair_values().items()}
    return SoftSphereCalculator(
        system.types, system.box, tables["diameter"], tables["epsilon"], tables["alpha"]
    )


def check_calculator(system, calculator: SoftSphereCalculator) -> dict:
    """Relative differences of the calculator's energy and forces from mdsens's at the initial
    positions (force difference relative to the largest force)."""
    import jax

    x = np.asarray(system.positions)
    energy, forces = calculator.energy_forces(x.copy())
    reference_energy = float(jax.jit(system.energy_fn)(x, system.params))
    reference_forces = np.asarray(jax.jit(system.force_fn)(x, system.params))
    return {
        "energy": energy,
        "energy_mdsens": reference_energy,
        "energy_rel_diff": abs(energy - reference_energy) / abs(reference_energy),
        "forces_rel_diff": float(np.abs(forces - reference_forces).max() / np.abs(reference_forces).max()),
    }


def run_ase(n: int, fmax: float, step_cap: int, wall_cap: float) -> dict:
    """Check the calculator, then relax with ASE's FIRE (defaults) to ``fmax`` under the caps."""
    from ase.optimize import FIRE

    system = _system(n, fmax, step_cap)
    calculator = calculator_for(system)
    check = check_calculator(system, calculator)
    xyz = np.zeros((n, 3))
    xyz[:, :2] = system.positions
    atoms = Atoms(["X"] * n, positions=xyz, cell=[system.box[0], system.box[1], 1.0], pbc=[True, True, False])
    atoms.calc = calculator
    optimizer = FIRE(atoms, logfile=None)
    stop = "step cap"
    start = time.perf_counter()
    for converged in optimizer.irun(fmax=fmax, steps=step_cap):
        if converged:
            stop = "converged"
            break
        if time.perf_counter() - start > wall_cap:
            stop = "wall cap"
            break
    wall = time.perf_counter() - start
    forces = atoms.get_forces()
    return {
        "check": check,
        "steps": int(optimizer.nsteps),
        "wall_s": wall,
        "energy": float(atoms.get_potential_energy()),
        "max_force": float(np.linalg.norm(forces, axis=1).max()),
        "converged": stop == "converged",
        "stop": stop,
    }


def run_mdsens(n: int, fmax: float, step_cap: int) -> dict:
    """Relax twice with one :class:`Relaxer`: cold (building it and compiling) and compiled."""
    from mdsens.relaxation import Relaxer

    system = _system(n, fmax, step_cap)
    start = time.perf_counter()
    relaxer = Relaxer(system)
    first = relaxer.relax()
    cold = time.perf_counter() - start
    second = relaxer.relax()
    return {
        "steps": second.steps,
        "wall_cold_s": cold,
        "wall_s": second.wall_time,
        "energy": second.energy,
        "max_force": second.max_force,
        "converged": second.converged,
        "same_as_first": bool(first.steps == second.steps and first.energy == second.energy),
    }


def measure(function, kwargs: dict, timeout: float, here: bool) -> dict:
    """``function(**kwargs)`` in a fresh process (no memory cap), or in this one when ``here``
    (``--smoke``: two more interpreters importing JAX would take longer than the runs)."""
    if here:
        return function(**kwargs)
    return in_child("ase_fire", function.__name__, kwargs, None, timeout)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _per_step_ms(result: dict, key: str = "wall_s"):
    if "failed" in result or not result.get("steps"):
        return None
    return 1e3 * result[key] / result["steps"]


def row(n: int, md: dict, ase: dict) -> dict:
    """One table row (missing numbers where a run failed)."""
    md_ok, ase_ok = "failed" not in md, "failed" not in ase
    md_wall = md["wall_s"] if md_ok else None
    md_cold = md["wall_cold_s"] if md_ok else None
    ase_wall = ase["wall_s"] if ase_ok else None
    return {
        "N": n,
        "ase_steps": ase.get("steps"),
        "ase_s": ase_wall,
        "ase_stop": ase.get("stop", ase.get("failed")),
        "md_steps": md.get("steps"),
        "md_s": md_wall,
        "md_cold_s": md_cold,
        "ase/md": _ratio(ase_wall, md_wall),
        "ase/md_cold": _ratio(ase_wall, md_cold),
        "ase_ms/step": _per_step_ms(ase),
        "md_ms/step": _per_step_ms(md),
        "ase_E": ase.get("energy"),
        "md_E": md.get("energy"),
    }


def plot(rows: list[dict], path) -> None:
    """Wall time per N (log scale): ASE, mdsens compiled, mdsens with compilation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("ase_s", "ASE FIRE + NumPy", "C0"), ("md_s", "mdsens (compiled)", "C1")]
    series.append(("md_cold_s", "mdsens (with compilation)", "C2"))
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(series)
    positions = np.arange(len(rows))
    for k, (key, label, colour) in enumerate(series):
        values = [r[key] if r[key] is not None else np.nan for r in rows]
        bars = ax.bar(positions + (k - 1) * width, values, width, label=label, color=colour)
        if key == "ase_s":
            for bar, r in zip(bars, rows, strict=True):
                if r["ase_stop"] != "converged":
                    ax.annotate(
                        str(r["ase_stop"]),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
    ax.set_xticks(positions, [f"N = {r['N']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("wall time to fmax (s)")
    ax.set_title("Relaxing the binary soft-sphere packing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    print(f"wrote {path}")


def parse() -> argparse.Namespace:
    """``common.arguments`` plus ``--sizes`` and ``--wall-cap`` (taken off the command line first)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--sizes", type=int, nargs="+", default=None)
    extra.add_argument("--wall-cap", type=float, default=WALL_CAP)
    own, rest = extra.parse_known_args()
    sys.argv[1:] = rest
    args = arguments(
        "mdsens relaxation vs ASE's FIRE with a NumPy calculator (also: --sizes N [N ...], "
        f"--wall-cap SECONDS for ASE, default {WALL_CAP:.0f})"
    )
    args.sizes = own.sizes or list(SMOKE_SIZES if args.smoke else SIZES)
    args.wall_cap = own.wall_cap
    return args


def main() -> None:
    args = parse()
    fmax = SMOKE_FMAX if args.smoke else FMAX
    rows, runs = [], []
    for n in args.sizes:
        print(f"N = {n}: mdsens ...", flush=True)
        md = measure(run_mdsens, {"n": n, "fmax": fmax, "step_cap": STEP_CAP}, 7200, args.smoke)
        print(f"N = {n}: ASE ...", flush=True)
        limits = {"n": n, "fmax": fmax, "step_cap": STEP_CAP, "wall_cap": args.wall_cap}
        ase = measure(run_ase, limits, args.wall_cap + 1800, args.smoke)
        for name, result in (("mdsens", md), ("ASE", ase)):
            if "failed" in result:
                print(f"  {name} failed: {result['failed']}")
        if "check" in ase:
            check = ase["check"]
            print(
                f"  calculator check at the initial positions: energy {check['energy']:.15g} "
                f"(mdsens {check['energy_mdsens']:.15g}), relative difference "
                f"{check['energy_rel_diff']:.2e}; forces {check['forces_rel_diff']:.2e}"
            )
            assert check["energy_rel_diff"] <= CHECK_TOLERANCE, check
            assert check["forces_rel_diff"] <= CHECK_TOLERANCE, check
        runs.append({"n": n, "mdsens": md, "ase": ase})
        rows.append(row(n, md, ase))
    columns = list(rows[0])
    print()
    print(table(rows, columns))
    write(
        args.out,
        "ase_fire",
        {
            "description": __doc__.strip().splitlines()[0],
            "system": "binary-packing",
            "fmax": fmax,
            "step_cap": STEP_CAP,
            "ase_wall_cap_s": args.wall_cap,
            "ase_fire": "ase.optimize.FIRE, default parameters",
            "rows": rows,
            "runs": runs,
        },
    )
    plot(rows, args.out / "ase_fire.png")


if __name__ == "__main__":
    main()
