"""A 10^5-particle 2-D packing, end to end through the command line: relax, then one sensitivity.

What a user runs, timed from the shell (imports, compilation and file writing included):

    mdsens relax --set n_particles=100000 --out RUN
    mdsens sensitivity --run RUN --param diameter.B

with each command's peak resident memory. The run directory is a temporary one (its files are
large); the numbers go to ``results/benchmarks/large.json``.

    python benchmarks/large.py            # N = 100000
    python benchmarks/large.py --smoke    # N = 256, into a temporary folder
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def _run(command: list[str], cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of this command's own process, stdout) of one command run
    in ``cwd``; raises on failure.

    The peak comes from the rusage of this one child, reaped with ``os.wait4``:
    ``getrusage(RUSAGE_CHILDREN)`` would give the largest over every child reaped so far.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024, stdout  # ru_maxrss is in KiB on Linux


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    n = 256 if args.smoke else 100_000
    mdsens = str(Path(sys.executable).parent / "mdsens")
    run = Path(tempfile.mkdtemp(prefix="mdsens-large-")) / "run"
    try:
        relax_s, relax_rss, relax_out = _run(
            [mdsens, "relax", "--set", f"n_particles={n}", "--out", str(run)], run.parent
        )
        sens_s, sens_rss, sens_out = _run(
            [mdsens, "sensitivity", "--run", str(run), "--param", "diameter.B"], run.parent
        )
        sensitivity = json.loads((run / "sensitivity.json").read_text())
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)
    entry = sensitivity["parameters"]["diameter.B"]
    row = {
        "N": n,
        "relax_s": relax_s,
        "sensitivity_s": sens_s,
        "total_s": relax_s + sens_s,
        "total_min": (relax_s + sens_s) / 60,
        "relax_peak_rss_MiB": common.mib(relax_rss),
        "sensitivity_peak_rss_MiB": common.mib(sens_rss),
        "cg_iterations": entry.get("iterations"),
        "cg_residual": entry.get("residual"),
    }
    print(relax_out.strip().splitlines()[-2] if relax_out.strip() else "")
    print(common.table([row], list(row)))
    common.write(
        args.out,
        "large",
        {"row": row, "relax_stdout": relax_out, "sensitivity_stdout": sens_out},
    )
    plot(row, args.out / "large.png")


def plot(row: dict, path) -> None:
    """The two commands' wall times against the 10-minute budget."""

    def draw(ax):
        ax.barh(["mdsens relax", "mdsens sensitivity"], [row["relax_s"] / 60, row["sensitivity_s"] / 60])
        ax.axvline(10, color="k", ls="--", label="10 minutes")
        ax.set(xlabel="wall time (min), from the shell", title=f"N = {row['N']:,} (2-D packing)")

    common.figure(path, draw, size=(6, 2.6))


if __name__ == "__main__":
    main()
