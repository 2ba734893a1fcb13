"""Ensemble throughput: one batched ensemble against a Python loop and against sequential CLI runs.

The same members (seeds 0..M-1 of the 128-particle binary packing; dx*/dθ for both diameters and
dP/dθ) three ways, timed in one run:

* ``ensemble``: :func:`mdsens.ensemble.ensemble`, the members relaxed in batches (one compiled
  loop per batch shape) over one CPU device per core, as ``mdsens ensemble`` runs them;
* ``loop``: a Python loop over the members with one compilation (one Relaxer and one
  Sensitivity for the template system, ``Relaxer.relax`` + ``Sensitivity.compute`` +
  ``observable_gradients`` per member), what a user writes without the ensemble;
* ``cli``: ``mdsens relax --seed S`` + ``mdsens sensitivity`` per member as separate processes.
  These take tens of seconds each, so only the first ``--cli-members`` are run and the total is
  extrapolated linearly to M (said so in the JSON: ``cli_extrapolated``).

The ensemble and the loop are each timed twice: a first pass that includes their compilation
(``seconds``), and a second pass over the same members with everything compiled
(``seconds_compiled``: the throughput of a long ensemble, where compiling once is amortised).

    python benchmarks/ensemble.py            # M = 64, N = 128
    python benchmarks/ensemble.py --smoke    # M = 4, N = 32, into a temporary folder
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mdsens.ensemble import one_device_per_core

one_device_per_core()  # before anything starts JAX's backend, as `mdsens ensemble` does

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mdsens.ensemble import ensemble, member_positions  # noqa: E402
from mdsens.observable_gradients import observable_gradients  # noqa: E402
from mdsens.observables import parse_observable  # noqa: E402
from mdsens.relaxation import Relaxer  # noqa: E402
from mdsens.sensitivity import Sensitivity  # noqa: E402
from mdsens.system import load_system  # noqa: E402

COLUMNS = ["arm", "members_timed", "seconds", "seconds_compiled", "speedup_of_ensemble", "speedup_compiled"]


def loop(overrides: list[str], seeds: list[int]) -> tuple[float, float, list[dict]]:
    """The Python loop arm: seconds of a first pass (compilation included) and of a second pass,
    and per-member numbers."""
    start = time.perf_counter()
    system = load_system("binary-packing", overrides, seed=seeds[0])
    relaxer, sensitivity = Relaxer(system), Sensitivity(system)
    pressure = parse_observable(system, "pressure")

    def one_pass() -> list[dict]:
        rows = []
        for seed in seeds:
            relaxed = relaxer.relax(system.params, member_positions(system, seed))
            result = sensitivity.compute(relaxed, ["diameter"], spectrum=False)
            dx = {n: e.dx for n, e in result.parameters.items()}
            observed = observable_gradients(
                system, relaxed.positions, system.params, [pressure], list(dx), dx=dx
            )
            rows.append({"energy": relaxed.energy, **observed.observables["pressure"].gradient})
        return rows

    rows = one_pass()
    first = time.perf_counter() - start
    start = time.perf_counter()
    one_pass()
    return first, time.perf_counter() - start, rows


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

    def run_ensemble(folder: Path):
        start = time.perf_counter()
        result = ensemble(
            "binary-packing",
            overrides,
            seeds,
            params=["diameter"],
            observables=["pressure"],
            run_dir=folder,
        )
        return time.perf_counter() - start, result

    with tempfile.TemporaryDirectory() as tmp:
        # The second call reuses the compiled batch engines of the first.
        ensemble_s, batched = run_ensemble(Path(tmp) / "first")
        ensemble_warm_s, _ = run_ensemble(Path(tmp) / "second")
    print(f"ensemble: {ensemble_s:.1f} s, compiled {ensemble_warm_s:.1f} s", flush=True)
    loop_s, loop_warm_s, loop_rows = loop(overrides, seeds)
    print(f"loop: {loop_s:.1f} s, compiled {loop_warm_s:.1f} s", flush=True)
    cli_s = cli(overrides, seeds[:cli_members]) * members / cli_members
    print(f"cli (extrapolated from {cli_members}): {cli_s:.1f} s", flush=True)

    worst = 0.0
    for row, reference in zip(batched.rows, loop_rows, strict=True):
        for key, value in reference.items():
            column = "energy" if key == "energy" else f"d_pressure_d_{key}"
            worst = max(worst, abs(row[column] - value) / abs(value))
    devices = jax.local_device_count()
    rows = [
        {"arm": f"ensemble ({devices} devices)", "seconds": ensemble_s, "seconds_compiled": ensemble_warm_s},
        {"arm": "Python loop, one compilation", "seconds": loop_s, "seconds_compiled": loop_warm_s},
        # Every CLI run compiles again: it has no compiled pass.
        {"arm": "sequential CLI (extrapolated)", "seconds": cli_s, "seconds_compiled": cli_s},
    ]
    for row, timed in zip(rows, [members, members, cli_members], strict=True):
        row["members_timed"] = timed
        row["per_member_s"] = row["seconds"] / members
        row["speedup_of_ensemble"] = row["seconds"] / ensemble_s
        row["speedup_compiled"] = row["seconds_compiled"] / ensemble_warm_s
    print(common.table(rows, COLUMNS))
    common.write(
        args.out,
        "ensemble",
        {
            "members": members,
            "n_particles": n,
            "devices": devices,
            "converged": sum(bool(r["converged"]) for r in batched.rows),
            "rows": rows,
            "cli_extrapolated": f"{cli_members} of {members} CLI members timed, total scaled by"
            f" {members / cli_members:g}",
            "max_relative_difference_ensemble_vs_loop": worst,
        },
    )
    plot(rows, args.out / "ensemble.png", members, n)


def plot(rows: list[dict], path: Path, members: int, n: int) -> None:
    """Wall time of each arm for the whole ensemble, with and without its compilation."""

    def draw(ax):
        y = np.arange(len(rows))
        for offset, key, ratio, label in (
            (-0.2, "seconds", "speedup_of_ensemble", "compilation included"),
            (0.2, "seconds_compiled", "speedup_compiled", "compiled (second pass)"),
        ):
            ax.barh(y + offset, [r[key] for r in rows], height=0.4, label=label)
            for k, r in enumerate(rows):
                ax.text(r[key], k + offset, f" {r[key]:.1f} s ({r[ratio]:.1f}×)", va="center", fontsize=7)
        ax.set_yticks(y, [r["arm"] for r in rows], fontsize=8)
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="lower right")
        ax.set(xlabel="wall time (s)", title=f"{members} members, N = {n}: relax + dx*/dθ + dP/dθ")

    common.figure(path, draw, size=(7, 3.2))


if __name__ == "__main__":
    main()
