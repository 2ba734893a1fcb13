"""Ensemble throughput: one batched ensemble against a Python loop and against sequential CLI runs.

The same members (seeds 0..M-1 of the 128-particle binary packing; dx*/dθ for both diameters and
dP/dθ) three ways, timed in one run, compilation included in each:

* ``ensemble``: :func:`mdsens.ensemble.ensemble`, all members in one vmapped batch;
* ``loop``: a Python loop over the members with one compilation (one Relaxer and one
  Sensitivity for the template system, ``Relaxer.relax`` + ``Sensitivity.compute`` +
  ``observable_gradients`` per member);
* ``cli``: ``mdsens relax --seed S`` + ``mdsens sensitivity`` per member as separate processes.
  These take tens of seconds each, so only the first ``--cli-members`` are run and the total is
  extrapolated linearly to M (said so in the JSON: ``cli_extrapolated``).

    python benchmarks/ensemble.py            # M = 64, N = 128
    python benchmarks/ensemble.py --smoke    # M = 4, N = 32, into a temporary folder
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

from mdsens.ensemble import ensemble, member_positions
from mdsens.observable_gradients import observable_gradients
from mdsens.observables import parse_observable
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity
from mdsens.system import load_system

COLUMNS = ["arm", "members_timed", "seconds", "per_member_s", "speedup_of_ensemble"]


def loop(overrides: list[str], seeds: list[int]) -> tuple[float, list[dict]]:
    """The Python loop arm: seconds and per-member numbers."""
    start = time.perf_counter()
    system = load_system("binary-packing", overrides, seed=seeds[0])
    relaxer, sensitivity = Relaxer(system), Sensitivity(system)
    pressure = parse_observable(system, "pressure")
    rows = []
    for seed in seeds:
        relaxed = relaxer.relax(system.params, member_positions(system, seed))
        result = sensitivity.compute(relaxed, ["diameter"], spectrum=False)
        dx = {n: e.dx for n, e in result.parameters.items()}
        observed = observable_gradients(system, relaxed.positions, system.params, [pressure], list(dx), dx=dx)
        rows.append({"energy": relaxed.energy, **observed.observables["pressure"].gradient})
    return time.perf_counter() - start, rows


def cli(overrides: list[str], seeds: list[int]) -> float:
    """The sequential CLI arm: seconds for these seeds."""
    start = time.perf_counter()
    sets = [a for o in overrides for a in ("--set", o)]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            run = Path(tmp) / str(seed)
            base = [sys.executable, "-m", "mdsens.cli"]
            subprocess.run(
                [*base, "relax", "--seed", str(seed), *sets, "--out", str(run)],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [*base, "sensitivity", "--param", "diameter", "--observable", "pressure", "--run", str(run)],
                check=True,
                capture_output=True,
            )
    return time.perf_counter() - start


def main() -> None:
    parser_args = sys.argv[1:]
    cli_members = 4
    if "--cli-members" in parser_args:
        k = parser_args.index("--cli-members")
        cli_members = int(parser_args[k + 1])
        del parser_args[k : k + 2]
    args = common.arguments(__doc__.splitlines()[0], parser_args)
    members, n = (4, 32) if args.smoke else (64, 128)
    cli_members = min(cli_members, members)
    overrides = [f"n_particles={n}"]
    seeds = list(range(members))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        batched = ensemble(
            "binary-packing",
            overrides,
            seeds,
            params=["diameter"],
            observables=["pressure"],
            run_dir=Path(tmp) / "e",
        )
        ensemble_s = time.perf_counter() - start
    print(f"ensemble: {ensemble_s:.1f} s", flush=True)
    loop_s, loop_rows = loop(overrides, seeds)
    print(f"loop: {loop_s:.1f} s", flush=True)
    cli_s = cli(overrides, seeds[:cli_members]) * members / cli_members
    print(f"cli (extrapolated from {cli_members}): {cli_s:.1f} s", flush=True)

    worst = 0.0
    for row, reference in zip(batched.rows, loop_rows, strict=True):
        for key, value in reference.items():
            column = "energy" if key == "energy" else f"d_pressure_d_{key}"
            worst = max(worst, abs(row[column] - value) / abs(value))
    rows = [
        {"arm": "ensemble (vmap batch)", "members_timed": members, "seconds": ensemble_s},
        {"arm": "Python loop, one compilation", "members_timed": members, "seconds": loop_s},
        {"arm": "sequential CLI (extrapolated)", "members_timed": cli_members, "seconds": cli_s},
    ]
    for row in rows:
        row["per_member_s"] = row["seconds"] / members
        row["speedup_of_ensemble"] = row["seconds"] / ensemble_s
    print(common.table(rows, COLUMNS))
    common.write(
        args.out,
        "ensemble",
        {
            "members": members,
            "n_particles": n,
            "converged": sum(bool(r["converged"]) for r in batched.rows),
            "rows": rows,
            "cli_extrapolated": f"{cli_members} of {members} CLI members timed, total scaled by"
            f" {members / cli_members:g}",
            "max_relative_difference_ensemble_vs_loop": worst,
        },
    )
    plot(rows, args.out / "ensemble.png", members, n)


def plot(rows: list[dict], path: Path, members: int, n: int) -> None:
    """Wall time of each arm for the whole ensemble."""

    def draw(ax):
        y = np.arange(len(rows))
        ax.barh(y, [r["seconds"] for r in rows], color=["C0", "C1", "C2"])
        ax.set_yticks(y, [r["arm"] for r in rows], fontsize=8)
        ax.set_xscale("log")
        for k, r in enumerate(rows):
            ax.text(
                r["seconds"],
                k,
                f" {r['seconds']:.0f} s ({r['speedup_of_ensemble']:.1f}×)",
                va="center",
                fontsize=8,
            )
        ax.set(
            xlabel="wall time, compilation included (s)",
            title=f"{members} members, N = {n}: relax + dx*/dθ + dP/dθ",
        )

    common.figure(path, draw, size=(7, 3))


if __name__ == "__main__":
    main()
