"""Figures of an inverse design, drawn from its files alone (``history.csv``, ``design.extxyz``):
the loss and the parameter values against the outer step, and the final configuration with the
remaining displacement to the target."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle

FIXED = (
    "step",
    "attempt",
    "accepted",
    "loss",
    "grad_norm",
    "inner_steps",
    "converged",
    "contact_changes",
    "basin_jump",
)


def read_history(directory: str | Path) -> dict[str, np.ndarray]:
    """``history.csv`` as columns: numbers as float arrays, ``note`` as strings."""
    with open(Path(directory) / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        columns[key] = np.array(values, dtype=object if key == "note" else float)
    return columns


def loss_figure(history: dict[str, np.ndarray]) -> Figure:
    """Loss of every trial: accepted steps joined, rejected trials marked by why."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    accepted = history["accepted"] == 1
    loss = np.where(history["loss"] > 0, history["loss"], np.nan)
    ax.semilogy(history["step"][accepted], loss[accepted], "o-", ms=3, label="accepted")
    jump = history["basin_jump"] == 1
    failed = history["converged"] == 0
    other = ~accepted & ~jump & ~failed
    rejected_jump = jump & ~accepted
    ax.semilogy(history["step"][rejected_jump], loss[rejected_jump], "rx", label="basin jump (backtracked)")
    # Relaxed from fixed positions, a jump to a lower loss is accepted (mdsens.design).
    if (jump & accepted).any():
        taken = jump & accepted
        ax.semilogy(
            history["step"][taken], loss[taken], "o", mfc="none", mec="r", ms=7, label="basin jump (accepted)"
        )
    ax.semilogy(history["step"][other], loss[other], "k+", label="loss rose (backtracked)")
    for s in history["step"][failed]:
        ax.axvline(s, color="orange", lw=0.8, alpha=0.6)
    if failed.any():
        ax.plot([], [], color="orange", label="inner relaxation failed")
    ax.set(xlabel="outer step", ylabel="loss", title="design loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def parameters_figure(history: dict[str, np.ndarray]) -> Figure:
    """Every parameter value (per-particle: mean, min, max) of the accepted steps."""
    names = [k for k in history if k not in FIXED and k != "note"]
    fig = Figure(figsize=(6, 1.0 + 1.6 * len(names)))
    axes = np.atleast_1d(fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0])
    accepted = history["accepted"] == 1
    for ax, name in zip(axes, names, strict=True):
        ax.plot(history["step"][accepted], history[name][accepted], "o-", ms=3)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[-1].set_xlabel("outer step")
    axes[0].set_title("parameters of the accepted steps")
    fig.tight_layout()
    return fig


def structure_figure(directory: str | Path) -> Figure:
    """The final configuration (particles to scale where diameters are known, projected on x-y
    in 3-D), with arrows of the displacement to the target where the design had one."""
    atoms = ase.io.read(Path(directory) / "design.extxyz")
    xy = atoms.positions[:, :2]
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    types = atoms.arrays.get("type", np.zeros(len(atoms), dtype=int))
    if "diameter" in atoms.arrays:
        circles = [Circle(p, r) for p, r in zip(xy, atoms.arrays["diameter"] / 2, strict=True)]
        patches = PatchCollection(circles, cmap="Pastel1", edgecolor="0.3", linewidth=0.4)
        patches.set_array(types.astype(float))
        ax.add_collection(patches)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], c=types, cmap="Pastel1", edgecolor="0.3", s=30)
    title = "final configuration"
    if "target_displacement" in atoms.arrays:
        d = atoms.arrays["target_displacement"][:, :2]
        size = np.linalg.norm(atoms.arrays["target_displacement"], axis=1)
        ax.quiver(xy[:, 0], xy[:, 1], d[:, 0], d[:, 1], color="C3", angles="xy", scale_units="xy", scale=None)
        rms = float(np.sqrt((size**2).mean()))
        title += f"\narrows: displacement to the target (max {size.max():.2e}, rms {rms:.2e})"
    cell = atoms.cell.array
    if atoms.pbc[:2].all():
        corners = np.array([[0, 0], cell[0, :2], cell[0, :2] + cell[1, :2], cell[1, :2], [0, 0]])
        ax.plot(corners[:, 0], corners[:, 1], "k-", lw=0.6)
    ax.set_aspect("equal")
    ax.autoscale_view()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def design_figures(directory: str | Path) -> Iterator[tuple[str, Figure]]:
    """(file name, figure) of every design figure, one at a time."""
    history = read_history(directory)
    yield "design-loss.png", loss_figure(history)
    yield "design-parameters.png", parameters_figure(history)
    yield "design-structure.png", structure_figure(directory)
