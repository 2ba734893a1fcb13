"""An ensemble's figures, drawn from its files alone (``RUN/ensemble.csv`` and ``ensemble.json``).

* ``ensemble-hist-<column>.png``: the distribution of one derivative (dE/dθ or dq/dθ) over the
  converged members, one histogram per sweep point;
* ``ensemble-sweep-<key>.png`` (with a sweep): the mean ± standard error of every derivative
  against the swept value ``key`` (one line per value of the other swept keys).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mdsens.ensemble_files import read_summary, read_table
from mdsens.manifest import write_stage

DPI = 150


def derivative_columns(columns: list[str]) -> list[str]:
    """The table's derivative columns: ``dE_d_<param>`` and ``d_<q>_d_<param>``."""
    return [c for c in columns if c.startswith("dE_d_") or (c.startswith("d_") and "_d_" in c[2:])]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _histogram(column: str, rows: list[dict], sweep_keys: list[str]) -> Figure:
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row["converged"] == "true" and row[column] != "":
            groups.setdefault(tuple(row[k] for k in sweep_keys), []).append(float(row[column]))
    for point, values in groups.items():
        label = ", ".join(f"{k} = {float(v):g}" for k, v in zip(sweep_keys, point, strict=True)) or None
        ax.hist(values, bins=max(5, int(np.sqrt(len(values)))), alpha=0.6, label=label)
    ax.set_xlabel(column)
    ax.set_ylabel("members")
    total = sum(len(v) for v in groups.values())
    ax.set_title(f"{column} over {total} converged members", fontsize=9)
    if sweep_keys and groups:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _sweep(key: str, columns: list[str], summary: dict) -> Figure:
    n = len(columns)
    fig = Figure(figsize=(5.0, 2.6 * n))
    others = [k for k in summary["sweep"] if k != key]
    for i, column in enumerate(columns):
        ax = fig.add_subplot(n, 1, i + 1)
        lines: dict[tuple, list[tuple[float, float, float]]] = {}
        for entry in summary["statistics"]:
            stats = entry["numbers"].get(column)
            if stats is None or stats["mean"] is None:
                continue
            other = tuple(entry["point"][k] for k in others)
            lines.setdefault(other, []).append((entry["point"][key], stats["mean"], stats["stderr"] or 0.0))
        for other, points in lines.items():
            x, mean, error = np.asarray(sorted(points)).T
            label = ", ".join(f"{k} = {v:g}" for k, v in zip(others, other, strict=True)) or None
            ax.errorbar(x, mean, yerr=error, marker="o", capsize=3, label=label)
        ax.set_ylabel(column, fontsize=8)
        if others and lines:
            ax.legend(fontsize=7)
    fig.axes[-1].set_xlabel(key)
    fig.suptitle("mean ± standard error over converged members", fontsize=9)
    fig.tight_layout()
    return fig


def plot_ensemble(run_dir: str | Path) -> list[Path]:
    """Draw the figures of the ensemble in ``run_dir`` into it; return their paths.

    Raises:
        UserError: ``run_dir`` holds no ensemble.
    """
    run = Path(run_dir)
    columns, rows = read_table(run)
    summary = read_summary(run)
    derivatives = derivative_columns(columns)
    sweep_keys = list(summary["sweep"])

    def figures():
        for column in derivatives:
            yield f"ensemble-hist-{_safe(column)}.png", _histogram(column, rows, sweep_keys)
        if derivatives:
            for key in sweep_keys:
                yield f"ensemble-sweep-{_safe(key)}.png", _sweep(key, derivatives, summary)

    return write_stage(
        run,
        "figures",
        None,
        ((name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=DPI)) for name, fig in figures()),
    )
