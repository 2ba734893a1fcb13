"""What every benchmark shares: timing, XLA memory accounting, child processes with a memory cap,
tables on stdout and JSON under ``results/benchmarks/``.

Benchmarks are scripts, not tests: each prints a table of ratios measured side by side in one
run and writes its numbers (with the machine they came from) for the docs and the closing note.
Run one with ``python benchmarks/NAME.py``; ``--out DIR`` writes somewhere else than
``results/benchmarks``. ``--smoke`` runs a small version (CI) into a fresh temporary folder unless
``--out`` is given, and never into ``results/benchmarks``: a smoke run's numbers must not replace
the committed full-size ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from mdsens.measure import best_time, peak_memory  # noqa: F401 - shared with mdsens check and paper

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "benchmarks"


def arguments(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--smoke`` and ``--out`` for every benchmark (``argv``: instead of ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="small sizes, for CI (about a minute or more each on two cores: compilation dominates); "
        "written to a temporary folder unless --out is given",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the JSON and plot go (default: results/benchmarks; with --smoke a new temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="mdsens-smoke-")) if args.smoke else RESULTS
    elif args.smoke and args.out.resolve() == RESULTS.resolve():
        parser.error("--smoke never writes results/benchmarks (the committed full-size numbers)")
    return args


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(module: str, function: str, kwargs: dict, memory_cap: int | None, timeout: float) -> dict:
    """Run ``module.function(**kwargs)`` in a fresh Python, under an address-space cap.

    Returns its JSON-able dict, or ``{"failed": reason}`` when it ran out of memory, was killed
    or timed out: a failure to fit is a data point, and it cannot take this process down.
    """
    code = (
        "import json, resource, sys\n"
        f"cap = {memory_cap!r}\n"
        "if cap: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"import {module} as m\n"
        f"out = m.{function}(**json.loads(sys.argv[1]))\n"
        "print('@@RESULT@@' + json.dumps(out))\n"
    )
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line.removeprefix("@@RESULT@@"))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if "RESOURCE_EXHAUSTED" in done.stderr or "MemoryError" in done.stderr or "bad_alloc" in done.stderr:
        return {"failed": f"out of memory under the {memory_cap / 2**30:.0f} GiB cap"}
    return {"failed": f"exit {done.returncode}: {tail[:200]}"}


def machine() -> dict:
    """Where the numbers come from."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write(out: Path, name: str, data: dict) -> Path:
    """``out/name.json`` with the machine description added."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=_plain) + "\n")
    print(f"wrote {path}")
    return path


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (missing values shown as '-')."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def figure(path: Path, draw: Callable, size=(5.5, 4), panels: int = 1, **subplots) -> None:
    """Draw with ``draw(ax)`` on one Matplotlib axis, or ``draw(axes)`` on ``panels`` side by side
    (``subplots``: e.g. ``sharey=True``), and save a PNG (Agg, no display). Every axis gets a grid
    and, where it has labelled artists, a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, panels, figsize=size, **subplots)
    draw(axes)
    for ax in np.atleast_1d(axes):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8 if panels == 1 else 7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
