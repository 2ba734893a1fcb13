"""What the paper experiment writes: its summary (``paper.json``), CSV tables and figures.

The measurements are :mod:`mdsens.experiments.paper`'s, the drawings
:mod:`mdsens.experiments.paper_figures`'; everything here is bookkeeping of their numbers.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from mdsens import atomic
from mdsens.experiments.paper_figures import costs_figure, finite_differences_figure, unrolled_figure
from mdsens.relaxation import RelaxResult
from mdsens.run import versions
from mdsens.system import System

DPI = 120
UNROLLED_COLUMNS = ("steps", "error", "max_force", "wall_time_s", "reverse_peak_memory_bytes")
TRACE_COLUMNS = ("steps", "error", "max_force")
FD_COLUMNS = ("h", "error", "wall_time_s", "contact_changes", "converged", "steps_plus", "steps_minus")
COST_COLUMNS = ("method", "wall_time_s", "peak_memory_bytes", "error", "note")
RUN_FILES = [
    "system.toml",
    "relaxed.npz",
    "relaxed.extxyz",
    "sensitivity.npz",
    "sensitivity.json",
    "sensitivity.extxyz",
]


def best_finite_difference(rows: list[dict]) -> dict:
    """The most accurate step h among those whose re-relaxations converged (all, if none did)."""
    trusted = [r for r in rows if r["converged"]] or rows
    return min(trusted, key=lambda r: r["error"])


def costs(relaxed: RelaxResult, relax_time: float, implicit: dict, unrolled: dict, fd: dict) -> list[dict]:
    """Wall time, peak memory and error per method (``costs.csv``)."""
    converged_steps = relaxed.steps
    at_converged = next(r for r in unrolled["rows"] if r["steps"] == converged_steps)
    best = fd["best"]
    return [
        {
            "method": "relaxation",
            "wall_time_s": relax_time,
            "peak_memory_bytes": fd["peak_memory_bytes"],
            "error": None,
            "note": f"FIRE from the random start to max|F| <= {relaxed.fmax:g}, {converged_steps} steps;"
            " needed before the implicit solve",
        },
        {
            "method": "implicit forward",
            "wall_time_s": implicit["forward_wall_time_s"],
            "peak_memory_bytes": implicit["forward_peak_memory_bytes"],
            "error": implicit["error"],
            "note": f"one CG solve (Hessian-vector products), {implicit['iterations']}"
            " iterations; after the relaxation",
        },
        {
            "method": "implicit reverse",
            "wall_time_s": implicit["reverse_wall_time_s"],
            "peak_memory_bytes": implicit["reverse_peak_memory_bytes"],
            "error": implicit["reverse_error"],
            "note": "one CG solve for the gradient of c.x* w.r.t. all parameters; error of its"
            " diameter.B component vs c.dx_ref",
        },
        {
            "method": f"unrolled forward (K={converged_steps})",
            "wall_time_s": at_converged["wall_time_s"],
            "peak_memory_bytes": unrolled["forward_peak_memory_bytes"],
            "error": at_converged["error"],
            "note": "jax.jvp through K FIRE steps from the random start (includes the relaxation);"
            " memory independent of K",
        },
        {
            "method": f"unrolled reverse (K={converged_steps})",
            "wall_time_s": None,
            "peak_memory_bytes": at_converged["reverse_peak_memory_bytes"],
            "error": None,
            "note": "jax.vjp through lax.scan of K FIRE steps; compiled for its memory, not run",
        },
        {
            "method": f"finite differences (h={best['h']:g})",
            "wall_time_s": best["wall_time_s"],
            "peak_memory_bytes": fd["peak_memory_bytes"],
            "error": best["error"],
            "note": "two FIRE relaxations warm-started from x* (central difference); after the relaxation",
        },
    ]


def summarise(
    *,
    quick: bool,
    system: System,
    relaxed: RelaxResult,
    relax_time: float,
    sensitivity,
    reference: np.ndarray,
    implicit_result: dict,
    unrolled: dict,
    fd_rows: list[dict],
    fd_memory: int | None,
) -> dict:
    """Every number of the experiment, with what it was measured on: ``paper.json``."""
    parameter, entry = next(iter(sensitivity.parameters.items()))
    implicit = {
        "solver": entry.solver,
        "error": implicit_result["error"],
        "saved_error": implicit_result["saved_error"],
        "iterations": implicit_result["forward_iterations"],
        "residual": implicit_result["forward_residual"],
        **{
            key: implicit_result[key]
            for key in (
                "forward_wall_time_s",
                "forward_peak_memory_bytes",
                "reverse_wall_time_s",
                "reverse_peak_memory_bytes",
                "reverse_error",
            )
        },
    }
    unrolled = {"start": "the relaxation's random initial positions", **unrolled}
    fd = {
        "start": "x* (warm start), both sides relaxed to fmax",
        "peak_memory_bytes": fd_memory,
        "best": best_finite_difference(fd_rows),
        "rows": fd_rows,
    }
    lowest = sensitivity.spectrum.lowest[0] if sensitivity.spectrum is not None else None
    return {
        "experiment": "Blondel et al. 2022 (Efficient and Modular Implicit Differentiation), molecular"
        " dynamics: dx*/dθ of a relaxed bidisperse soft-sphere packing",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "system": {
            "name": system.name,
            "n_particles": system.n_particles,
            "dimension": system.dimension,
            "box": system.box.tolist(),
            "packing_fraction": system.recipe["box"].get("packing_fraction"),
            "rattlers": int(np.sum(sensitivity.rattlers)),
            "lowest_hessian_eigenvalue": lowest,
        },
        "parameter": {"name": parameter, "value": entry.value, "denergy": entry.denergy},
        "relaxation": {
            "steps": relaxed.steps,
            "max_force": relaxed.max_force,
            "fmax": relaxed.fmax,
            "energy": relaxed.energy,
            "wall_time_s": relax_time,
            "wall_time_with_compilation_s": relaxed.wall_time,
        },
        "reference": {
            "method": "dense direct solve (Hessian diagonalised, pseudo-inverse)",
            "norm": float(np.linalg.norm(reference)),
            "max_abs": float(np.max(np.abs(reference))),
        },
        "implicit": implicit,
        "unrolled": unrolled,
        "finite_differences": fd,
        "costs": costs(relaxed, relax_time, implicit, unrolled, fd),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
        },
        "versions": versions(),
        "recipe": system.recipe,
        "files": [],
    }


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """``rows`` as CSV with exactly ``columns`` (missing values empty, floats at full precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else _format(row.get(k))) for k in columns})
    return buffer.getvalue()


def _format(value):
    if isinstance(value, float):
        return repr(value)
    return value


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_outputs(out: Path, summary: dict, run_figures: list[str], started: float) -> None:
    """Write the tables, the figures and ``paper.json`` into ``out`` all at once (atomically),
    completing ``summary`` with the file list and the total wall time since ``started``."""
    unrolled = summary["unrolled"]
    trace = unrolled["trace"]
    figures = {
        out / "unrolled-error.png": unrolled_figure(summary),
        out / "finite-differences.png": finite_differences_figure(summary),
        out / "costs.png": costs_figure(summary),
    }
    tables = {
        out / "unrolled.csv": csv_text(unrolled["rows"], UNROLLED_COLUMNS),
        out / "unrolled_trace.csv": csv_text(
            [
                {"steps": int(k), "error": float(e), "max_force": float(f)}
                for k, e, f in zip(trace["steps"], trace["error"], trace["max_force"], strict=True)
            ],
            TRACE_COLUMNS,
        ),
        out / "finite_differences.csv": csv_text(summary["finite_differences"]["rows"], FD_COLUMNS),
        out / "costs.csv": csv_text(summary["costs"], COST_COLUMNS),
    }
    summary["files"] = sorted(
        [p.name for p in (*tables, *figures)] + run_figures + ["paper.json"] + RUN_FILES
    )
    summary["total_wall_time_s"] = time.perf_counter() - started
    text = json.dumps(summary, indent=2, default=_json_default, allow_nan=False) + "\n"
    writers = {
        path: (lambda tmp, content=content: tmp.write_text(content)) for path, content in tables.items()
    }
    writers.update({path: (lambda tmp, fig=fig: fig.savefig(tmp, dpi=DPI)) for path, fig in figures.items()})
    writers[out / "paper.json"] = lambda tmp: tmp.write_text(text)
    atomic.write_all(writers)
