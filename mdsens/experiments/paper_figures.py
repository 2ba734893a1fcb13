"""The paper experiment's figures, drawn from its summary (``paper.json``): they read numbers,
never re-run physics, and return their Matplotlib Figure (no pyplot state) for the caller to save.

* :func:`unrolled_figure`: error of unrolled forward mode and max|F| against the number of FIRE
  steps K, next to the implicit and finite-difference errors;
* :func:`finite_differences_figure`: error of central finite differences against h;
* :func:`costs_figure`: wall time and peak memory per method, and reverse-mode memory against K.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

MiB = 2.0**20


def _subtitle(summary: dict) -> str:
    s, p = summary["system"], summary["parameter"]
    return (
        f"{s['n_particles']} harmonic soft spheres, 2-D periodic box, φ = {s['packing_fraction']:g};"
        f" θ = diameter of species B = {p['value']:g}"
    )


def unrolled_figure(summary: dict) -> Figure:
    """Top: relative error of unrolled forward mode against K (log-log), with the implicit,
    best finite-difference and reference-floor lines. Bottom: max|F| after K steps."""
    unrolled, trace = summary["unrolled"], summary["unrolled"]["trace"]
    implicit_error = summary["implicit"]["error"]
    best = summary["finite_differences"]["best"]
    converged = summary["relaxation"]["steps"]
    rows = unrolled["rows"]
    fig = Figure(figsize=(7.5, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    ks = np.array(trace["steps"])
    if not summary["quick"]:  # the smoke version has no per-step trace
        top.plot(ks, trace["error"], color="0.6", lw=1, label="unrolled forward mode, every K")
        bottom.plot(ks, trace["max_force"], color="0.6", lw=1)
    top.plot(
        [r["steps"] for r in rows],
        [r["error"] for r in rows],
        "o",
        color="C0",
        label="unrolled forward mode, timed runs (unrolled.csv)",
    )
    top.axhline(
        implicit_error, color="C1", lw=2, label=f"implicit (CG, at the relaxed state): {implicit_error:.1e}"
    )
    top.axhline(
        best["error"],
        color="C2",
        ls="--",
        label=f"central finite differences, best h = {best['h']:g}: {best['error']:.1e}",
    )
    floor = unrolled["reference_at_last_state"]
    top.axhline(
        floor["reference_shift"],
        color="0.3",
        ls=":",
        label=f"dense reference at x_K, K = {floor['steps']} (max|F| {floor['max_force']:.0e}) vs at x*:"
        f" {floor['reference_shift']:.1e}\n(x* is relaxed to fmax only; unrolled vs that reference:"
        f" {floor['unrolled_error_vs_reference_at_that_state']:.1e})",
    )
    for ax in (top, bottom):
        ax.axvline(converged, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    top.text(
        converged,
        0.98,
        f" relaxation converged\n K = {converged}",
        transform=top.get_xaxis_transform(),
        va="top",
        fontsize=8,
    )
    top.set_ylabel("relative error of dx*/dθ\n‖dx − dx_ref‖ / ‖dx_ref‖")
    top.set_title("Error vs the dense direct solve (zero modes projected out)", fontsize=10)
    top.legend(fontsize=8, loc="lower left")
    bottom.plot([r["steps"] for r in rows], [r["max_force"] for r in rows], "o", color="C0")
    fmax = summary["relaxation"]["fmax"]
    bottom.axhline(fmax, color="k", ls="--", lw=1, label=f"fmax = {fmax:g}")
    bottom.set_ylabel("max |F_i| after K steps\n(ε / length)")
    bottom.set_xlabel("K: FIRE steps unrolled from the random start")
    bottom.legend(fontsize=8, loc="lower left")
    fig.suptitle("Unrolled FIRE vs implicit differentiation\n" + _subtitle(summary), fontsize=11)
    return fig


def finite_differences_figure(summary: dict) -> Figure:
    """Relative error of central finite differences against h (log-log); steps that change the
    contact network are marked apart, with the number of particles whose contacts changed."""
    rows = summary["finite_differences"]["rows"]
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    hs = np.array([r["h"] for r in rows])
    errors = np.array([r["error"] for r in rows])
    changed = np.array([r["contact_changes"] > 0 for r in rows])
    ax.plot(hs, errors, "-", color="C2", lw=1)
    ax.plot(hs[~changed], errors[~changed], "o", color="C2", label="contacts unchanged between θ ± h")
    if changed.any():
        ax.plot(hs[changed], errors[changed], "s", color="C3", label="contact network changes between θ ± h")
        for r in rows:
            if r["contact_changes"]:
                ax.annotate(
                    f"{r['contact_changes']}\nparticles",
                    (r["h"], r["error"]),
                    textcoords="offset points",
                    xytext=(0, -8),
                    ha="center",
                    va="top",
                    fontsize=7,
                )
    implicit_error = summary["implicit"]["error"]
    ax.axhline(implicit_error, color="C1", lw=2, label=f"implicit (CG): {implicit_error:.1e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("h: step in the diameter of species B (length)")
    ax.set_ylabel("relative error of dx*/dθ\n‖dx − dx_ref‖ / ‖dx_ref‖")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        "Central finite differences (warm-started from x*, relaxed to max|F| ≤ "
        f"{summary['relaxation']['fmax']:g})\n" + _subtitle(summary),
        fontsize=9,
    )
    return fig


def _bar_labels(ax, bars, values, fmt):
    for bar, value in zip(bars, values, strict=True):
        if value is None or not np.isfinite(value):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                ax.get_ylim()[0],
                " not run",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=8,
            )
        else:
            ax.text(
                bar.get_x() + bar.get_width() / 2, value, fmt(value), ha="center", va="bottom", fontsize=8
            )


def costs_figure(summary: dict) -> Figure:
    """Three panels: wall time per method, peak memory per method (log bars), and the peak
    memory of unrolled reverse mode against K next to the implicit and forward-mode lines."""
    costs = summary["costs"]
    fig = Figure(figsize=(14, 5.2), layout="constrained")
    time_ax, memory_ax, scaling_ax = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    labels = [c["method"].replace(" (", "\n(") for c in costs]
    colours = ["0.5", "C1", "C1", "C0", "C0", "C2"]
    x = np.arange(len(costs))

    times = [np.nan if c["wall_time_s"] is None else c["wall_time_s"] for c in costs]
    bars = time_ax.bar(x, np.nan_to_num(times, nan=0.0), color=colours)
    time_ax.set_yscale("log")
    time_ax.set_ylim(min(t for t in times if np.isfinite(t)) / 3, max(t for t in times if np.isfinite(t)) * 5)
    _bar_labels(time_ax, bars, times, lambda v: f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s")
    time_ax.set_ylabel("wall time (s), after compilation")
    time_ax.set_title(f"Wall time ({summary['machine']['cpu_count']} CPU cores)", fontsize=10)

    memory = [np.nan if c["peak_memory_bytes"] is None else c["peak_memory_bytes"] / MiB for c in costs]
    bars = memory_ax.bar(x, np.nan_to_num(memory, nan=0.0), color=colours)
    memory_ax.set_yscale("log")
    finite = [m for m in memory if np.isfinite(m)]
    if finite:
        memory_ax.set_ylim(min(finite) / 3, max(finite) * 5)
    _bar_labels(memory_ax, bars, memory, lambda v: f"{v / 1024:.3g} GiB" if v >= 1024 else f"{v:.3g} MiB")
    memory_ax.set_ylabel("peak memory (MiB)")
    memory_ax.set_title("Peak memory (XLA compiled memory analysis)", fontsize=10)
    for ax in (time_ax, memory_ax):
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)

    rows = [r for r in summary["unrolled"]["rows"] if r["reverse_peak_memory_bytes"] is not None]
    ks = [r["steps"] for r in rows]
    scaling_ax.plot(
        ks,
        [r["reverse_peak_memory_bytes"] / MiB for r in rows],
        "o-",
        color="C0",
        label="unrolled reverse mode (jax.vjp through K steps)",
    )
    per_step = summary["unrolled"]["reverse_bytes_per_step"]
    if per_step:
        scaling_ax.text(
            0.03,
            0.97,
            f"≈ {per_step / MiB:.2f} MiB per step",
            transform=scaling_ax.transAxes,
            va="top",
            fontsize=9,
            color="C0",
        )
    for value, style, label in (
        (summary["unrolled"]["forward_peak_memory_bytes"], ("C0", "--"), "unrolled forward mode (any K)"),
        (summary["implicit"]["reverse_peak_memory_bytes"], ("C1", "-"), "implicit reverse (CG)"),
        (summary["implicit"]["forward_peak_memory_bytes"], ("C1", ":"), "implicit forward (CG)"),
    ):
        if value is not None:
            scaling_ax.axhline(value / MiB, color=style[0], ls=style[1], label=label)
    scaling_ax.axvline(summary["relaxation"]["steps"], color="k", ls=":", lw=1)
    scaling_ax.set_xscale("log")
    scaling_ax.set_yscale("log")
    scaling_ax.set_xlabel("K: FIRE steps unrolled")
    scaling_ax.set_ylabel("peak memory (MiB)")
    scaling_ax.set_title("Memory vs number of minimiser steps\n(dotted: relaxation converged)", fontsize=10)
    scaling_ax.grid(True, which="major", alpha=0.3)
    scaling_ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.1))
    fig.suptitle("Cost of dx*/dθ per method — " + _subtitle(summary), fontsize=11)
    return fig
