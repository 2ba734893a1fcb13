"""Start-up: where the time of a small command goes (`mdsens relax --system binary-packing`).

Every command runs in a fresh interpreter, as a user's shell starts it, side by side with
``python -c "import jax; jax.numpy.zeros(1)"`` (the floor: any JAX program pays it):

- whole commands, timed from outside: the first run with an empty compilation cache (``cold``),
  the runs after it (``warm``: what a user iterating on a recipe gets) and runs without the cache
  (``MDSENS_COMPILATION_CACHE=""``, what a CPU run got before the cache was on there);
- one instrumented run of each kind, split into phases (imports, backend start, building the
  system and its checks, building the relaxation engine, the relaxation, writing the run, the
  rest), each phase's time inside JAX's compilation pipeline (tracing, lowering, compiling or
  loading from the cache, from ``jax.monitoring``) shown apart, with the number of compiled
  functions and cache hits.

    python benchmarks/startup.py          # 5 runs of each
    python benchmarks/startup.py --smoke  # 2 runs of each, into a temporary folder
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

IMPORT_JAX = "import jax; jax.numpy.zeros(1)"
ARGS = ("relax", "--system", "binary-packing")
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    # Includes loading from the persistent cache when the function is there.
    "/jax/core/compile/backend_compile_duration": "compile",
}
PHASES = ("imports", "backend", "system", "engine", "relax", "write", "other")
COLUMNS = ("kind", "total_s", *PHASES, "compile_s", "compiled", "cache_hits", "vs_import_jax")

# The instrumented run: imports timed first (those the command itself makes later included, so
# that no phase after them pays for one), then the command through mdsens.cli.main with each
# phase's function wrapped. Prints one JSON line.
INSTRUMENTED = r"""
import json, sys, time
start = time.perf_counter()
import jax
from jax import monitoring
events = {name: [0.0, 0] for name in json.loads(sys.argv[2])}
counts = {}

def duration(name, seconds, **kwargs):
    if name in events:
        events[name][0] += seconds
        events[name][1] += 1

monitoring.register_event_duration_secs_listener(duration)
monitoring.register_event_listener(lambda name, **kwargs: counts.__setitem__(name, counts.get(name, 0) + 1))
import rich.progress
import mdsens.cli, mdsens.relaxation, mdsens.run, mdsens.run_lock, mdsens.system
from mdsens import jaxmd
for name in ("space", "smap", "partition", "minimize"):
    jaxmd.load(name)
phases = {"imports": [time.perf_counter() - start, 0.0]}

def compile_time():
    return sum(total for total, _ in events.values())

def timed(phase, function):
    def wrapper(*args, **kwargs):
        begin, compiled = time.perf_counter(), compile_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent = phases.setdefault(phase, [0.0, 0.0])
            spent[0] += time.perf_counter() - begin
            spent[1] += compile_time() - compiled
    return wrapper

begin = time.perf_counter()
jax.devices()
phases["backend"] = [time.perf_counter() - begin, 0.0]
mdsens.system.load_system = timed("system", mdsens.system.load_system)
Relaxer = mdsens.relaxation.Relaxer
Relaxer.__post_init__ = timed("engine", Relaxer.__post_init__)
Relaxer.relax = timed("relax", Relaxer.relax)
mdsens.run.save_relaxation = timed("write", mdsens.run.save_relaxation)
begin, compiled = time.perf_counter(), compile_time()
try:
    mdsens.cli.main(json.loads(sys.argv[1]))
except SystemExit as exit:
    if exit.code:
        raise
total = time.perf_counter() - begin
phases["other"] = [
    total - sum(phases[p][0] for p in ("system", "engine", "relax", "write")),
    compile_time() - compiled - sum(phases[p][1] for p in ("system", "engine", "relax", "write")),
]
print("@@" + json.dumps({
    "phases": phases,
    "compile": {COMPILE: events[name] for name, COMPILE in json.loads(sys.argv[3]).items()},
    "compiled": events["/jax/core/compile/backend_compile_duration"][1],
    "cache_hits": counts.get("/jax/compilation_cache/cache_hits", 0),
    "total_s": time.perf_counter() - start,
}))
"""


def command() -> list[str]:
    """The installed console script beside this Python, else ``python -m mdsens.cli``."""
    script = Path(sys.executable).parent / "mdsens"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mdsens.cli"]


def wall(argv: list[str], env: dict) -> float:
    """Seconds the process ``argv`` takes from start to exit (it must succeed)."""
    begin = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - begin
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def instrumented(argv: list[str], env: dict) -> dict:
    """The phases of one command (see INSTRUMENTED)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            INSTRUMENTED,
            json.dumps(argv),
            json.dumps(list(COMPILE_EVENTS)),
            json.dumps(COMPILE_EVENTS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
    if done.returncode or not lines:
        raise RuntimeError(f"instrumented run exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(lines[-1][2:])


def environment(cache: str | None, scratch: Path) -> dict:
    """The environment of a run: ``cache`` is MDSENS_COMPILATION_CACHE (None: the default
    folder, under a scratch XDG_CACHE_HOME so that the user's own cache plays no part)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(scratch / "xdg")}
    env.pop("MDSENS_COMPILATION_CACHE", None)
    if cache is not None:
        env["MDSENS_COMPILATION_CACHE"] = cache
    return env


def measure(repeats: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="mdsens-startup-"))
    try:
        run = [*command(), *ARGS, "--out", str(scratch / "run")]
        uncached, cached = environment("", scratch), environment(None, scratch)
        baseline = [wall([sys.executable, "-c", IMPORT_JAX], uncached) for _ in range(repeats)]
        # Breakdowns first: the instrumented cold run fills the cache the warm ones read.
        phases = {
            "no cache": instrumented([*ARGS, "--out", str(scratch / "run")], uncached),
            "cold": instrumented([*ARGS, "--out", str(scratch / "run")], cached),
            "warm": instrumented([*ARGS, "--out", str(scratch / "run")], cached),
        }
        warm = [wall(run, cached) for _ in range(repeats)]
        off = [wall(run, uncached) for _ in range(repeats)]
        # An empty cache for the cold run (no folder at all where the cache is off on CPU).
        shutil.rmtree(scratch / "xdg", ignore_errors=True)
        cold = wall(run, cached)
        return {
            "command": " ".join(["mdsens", *ARGS]),
            "import_jax_s": baseline,
            "whole_command_s": {"no cache": off, "cold": [cold], "warm": warm},
            "phases": phases,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def rows(data: dict) -> list[dict]:
    floor = statistics.median(data["import_jax_s"])
    out = [{"kind": "import jax", "total_s": floor, "vs_import_jax": 1.0}]
    for kind, parts in data["phases"].items():
        whole = statistics.median(data["whole_command_s"][kind])
        row = {"kind": kind, "total_s": whole, "vs_import_jax": whole / floor}
        row.update({phase: parts["phases"][phase][0] for phase in PHASES})
        row["compile_s"] = sum(total for total, _ in parts["compile"].values())
        row.update(compiled=parts["compiled"], cache_hits=parts["cache_hits"])
        out.append(row)
    return out


def draw(data: dict, ax) -> None:
    """Stacked bars of the phases of each kind of run, compilation hatched, import jax marked."""
    kinds = list(data["phases"])
    colors = dict(zip(PHASES, ("C0", "C7", "C2", "C4", "C3", "C1", "C8"), strict=True))
    for y, kind in enumerate(kinds):
        left = 0.0
        for phase in PHASES:
            seconds, compiling = data["phases"][kind]["phases"][phase]
            label = phase if y == 0 else None
            ax.barh(y, seconds - compiling, left=left, color=colors[phase], label=label)
            ax.barh(
                y, compiling, left=left + seconds - compiling, color=colors[phase], hatch="///", alpha=0.6
            )
            left += seconds
    floor = statistics.median(data["import_jax_s"])
    ax.axvline(floor, color="k", lw=1, label="import jax")
    ax.axvline(2 * floor, color="k", lw=1, ls="--", label="2 x import jax")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("seconds (hatched: tracing, lowering, compiling or loading)")
    ax.set_title(data["command"], fontsize=9)


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    data = measure(2 if args.smoke else 5)
    table = rows(data)
    print(common.table(table, COLUMNS))
    common.write(args.out, "startup", {**data, "rows": table})
    common.figure(args.out / "startup.png", lambda ax: draw(data, ax), size=(7, 3.5))


if __name__ == "__main__":
    main()
