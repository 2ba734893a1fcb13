"""Figures of a finished run, drawn from its files alone (no physics is run here).

:func:`plot_run` reads a run directory with :func:`mdsens.run_files.read_run` and writes PNG files:

* ``sensitivity-<param>.png`` per parameter: the relaxed structure drawn in its cell, with the
  sensitivities dx*/dθ as arrows (the figure of Blondel et al. 2022 for the bubble raft);
  ``configuration.png`` instead, without arrows, when there is nothing to draw;
* ``sensitivity-histogram.png``: the distribution of |dx*/dθ| per species, one panel per
  parameter;
* ``sensitivity-distance.png``: |dx*/dθ| of each atom against its distance from a center (an
  atom, a point, the run's defect, or the middle of the cell), one panel per parameter.

Each figure is made by a function that returns it (:func:`configuration_figure`,
:func:`histogram_figure`, :func:`distance_figure`); :func:`plot_run` saves them. Atoms are drawn
as discs of their ``diameter`` where the run has one (soft spheres), otherwise all of one size,
half the median nearest-neighbour distance. 3-D runs are drawn as their x-y projection, or as a
slice of given width about the middle in z. Periodic images are drawn along the periodic x and y
axes of an orthorhombic cell; a triclinic cell is drawn as the projection of its edges, and its
atoms as they are, without images or wrapping. Where atoms are, and which are shown, is worked
out in :mod:`mdsens.plot_geometry`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import EllipseCollection, LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath
from matplotlib.ticker import MaxNLocator

from mdsens.atomic import write_with
from mdsens.errors import UserError
from mdsens.plot_geometry import (
    FIXED_SIZE,
    Center,
    RunGeometry,
    View,
    cell_edges,
    distances_from,
    find_center,
    periodic_images,
    select_view,
)
from mdsens.run_files import read_run

DPI = 150
# Values spanning more than this factor get a logarithmic axis.
LOG_SPAN = 100.0


def _file_safe(name: str) -> str:
    """``name`` with characters other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _colors(run: RunGeometry) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(len(run.species))]


def configuration_figure(
    run: RunGeometry,
    view: View,
    center: Center,
    param: str | None = None,
    vectors: np.ndarray | None = None,
) -> Figure:
    """The atoms of ``view`` in the cell, with ``vectors`` (N, d), dx*/dθ for ``param``, as arrows
    if given; ``center`` is marked where it has a label."""
    index = np.flatnonzero(view.shown)
    xy = run.wrapped_xy(run.positions3[index])
    diameters = run.diameters[index]
    centers, owners = periodic_images(run, xy, diameters)
    images_only_in_box = run.wrap.all()

    # The projection of the cell's edges: the box, or a parallelogram (or more) for a triclinic cell.
    edges = cell_edges(run.cell)[:, :, :2]
    has_outline = bool(np.any(np.ptp(edges.reshape(-1, 2), axis=0) > 0))
    # Points spanning everything drawn, for the axis limits.
    extent = [edges.reshape(-1, 2)] if has_outline else []
    if not (images_only_in_box and has_outline):
        radius = diameters[owners, None] / 2
        extent += [centers - radius, centers + radius]

    lines = []
    if run.dim == 3:
        lines.append(view.text)
    if not run.sized:
        lines.append(f"atoms drawn {FIXED_SIZE:g} × the nearest-neighbour distance wide")
    if has_outline and not run.orthorhombic and run.pbc.any():
        lines.append("non-orthogonal cell: outline projected, no periodic images drawn")
    gain = None  # data units per unit of dx*/dθ, where there are arrows to draw
    if vectors is None:
        title = f"relaxed configuration, N = {len(run.positions)}"
    else:
        arrows = vectors[index, :2]
        longest = float(np.max(np.linalg.norm(arrows, axis=1)))
        value = run.values.get(param)
        title = f"dx*/dθ, θ = {param}" + (f" = {value:.4g}" if value is not None else "")
        if longest > 0:
            # quiver draws |v| / scale data units: the longest arrow spans one large diameter.
            gain = diameters.max() / longest
            extent.append(xy + gain * arrows)
            arrow = "arrows: x-y components of" if run.dim == 3 else "arrow length ="
            lines.append(f"{arrow} {gain:.3g} × dx*/dθ (longest |dx*/dθ| = {longest:.3g})")
        else:
            lines.append("dx*/dθ = 0 for every atom shown")
    marker = run.wrapped_xy(center.point[None])[0] if center.label is not None else None
    if marker is not None:
        extent.append(marker[None])
        marker_label = center.label
        if view.inside is not None and not view.inside(center.point[2:])[0]:
            marker_label += f"\n(z = {center.point[2]:.3g},\noutside the slice)"

    low, high = np.vstack(extent).min(axis=0), np.vstack(extent).max(axis=0)
    pad = 0.02 * max(float((high - low).max()), 1e-9)
    low, high = low - pad, high + pad
    width = 6.0
    aspect = min(max((high[1] - low[1]) / (high[0] - low[0]), 0.25), 4.0)
    fig = Figure(figsize=(width + 1.5, width * aspect + 0.5 + 0.25 * len(lines)), layout="constrained")
    ax = fig.add_subplot()
    if has_outline:
        ax.add_collection(
            LineCollection(
                edges, colors="black", linewidths=1.0, linestyles="-" if run.pbc.any() else "--", zorder=3
            )
        )

    colors = _colors(run)
    # Discs overlap in a 3-D projection; transparency keeps the hidden ones visible.
    alpha = 0.85 if run.dim == 2 else 0.5
    discs = EllipseCollection(
        diameters[owners],
        diameters[owners],
        np.zeros(len(owners)),
        units="xy",
        offsets=centers,
        offset_transform=ax.transData,
        facecolors=[colors[t] for t in run.types[index][owners]],
        edgecolors="black",
        linewidths=0.3,
        alpha=alpha,
        zorder=1,
    )
    if images_only_in_box:
        # Outside the box the images would only repeat what the box already shows. (A Rectangle
        # passed on its own would become a clip box, which does not clip this collection.)
        lx, ly = run.box
        discs.set_clip_path(MplPath([(0, 0), (lx, 0), (lx, ly), (0, ly), (0, 0)], closed=True), ax.transData)
    ax.add_collection(discs)
    if gain is not None:
        ax.quiver(
            xy[:, 0],
            xy[:, 1],
            arrows[:, 0],
            arrows[:, 1],
            angles="xy",
            scale_units="xy",
            scale=1 / gain,
            color="black",
            zorder=4,
        )
    handles = [
        Patch(facecolor=colors[t], edgecolor="black", alpha=alpha, label=run.species[t])
        for t in np.unique(run.types[index])
    ]
    if marker is not None:
        ax.plot(*marker, marker="X", markersize=12, color="red", markeredgecolor="white", zorder=5)
        handles.append(
            Line2D(
                [],
                [],
                marker="X",
                markersize=10,
                color="red",
                markeredgecolor="white",
                ls="",
                label=marker_label,
            )
        )

    # Centred on the figure, not the axes: a long line may be wider than the axes.
    fig.suptitle("\n".join([title, *lines]))
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(handles=handles, title="species", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _panels(count: int) -> tuple[Figure, list]:
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.5 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def _log_scale(norms: np.ndarray) -> bool | None:
    """Whether the positive values span decades; None where none is positive."""
    positive = norms[norms > 0]
    if positive.size == 0:
        return None
    return bool(positive.max() > LOG_SPAN * positive.min())


def histogram_figure(run: RunGeometry, params: list[str]) -> Figure:
    """Histogram of the per-atom |dx*/dθ| per species, one panel per parameter; a logarithmic
    |dx*/dθ| axis where the values span more than ``LOG_SPAN``."""
    fig, axes = _panels(len(params))
    colors = _colors(run)
    for ax, param in zip(axes, params, strict=True):
        norms = np.linalg.norm(run.sensitivities[param], axis=1)
        ax.set_title(f"θ = {param}")
        ax.set_xlabel("|dx*/dθ|")
        ax.set_ylabel("atoms")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        logarithmic = _log_scale(norms)
        if logarithmic is None:
            ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center")
            continue
        positive = norms[norms > 0]
        if logarithmic:
            # Zeros have no place on a log axis; the legend counts them instead.
            bins = np.geomspace(positive.min(), positive.max(), 31)
            ax.set_xscale("log")
        else:
            bins = np.linspace(0.0, positive.max(), 31)
        for t in np.unique(run.types):
            mine = norms[run.types == t]
            shown = mine[mine > 0] if logarithmic else mine
            hidden = len(mine) - len(shown)
            label = run.species[t] + (f" ({hidden} zero, not shown)" if hidden else "")
            ax.hist(shown, bins=bins, color=colors[t], alpha=0.5, label=label)
        ax.legend(title="species")
    return fig


def distance_figure(run: RunGeometry, params: list[str], center: Center) -> Figure:
    """|dx*/dθ| of each atom against its distance from ``center``, one panel per parameter; a
    logarithmic |dx*/dθ| axis where the values span more than ``LOG_SPAN``."""
    distances = distances_from(run, center.point)
    fig, axes = _panels(len(params))
    fig.suptitle(f"|dx*/dθ| against distance from {center.text}")
    colors = _colors(run)
    size = float(np.clip(3000 / max(len(distances), 1), 4, 30))
    for ax, param in zip(axes, params, strict=True):
        norms = np.linalg.norm(run.sensitivities[param], axis=1)
        ax.set_title(f"θ = {param}")
        ax.set_xlabel("distance" + (" (minimum image)" if run.periodic else ""))
        ax.set_ylabel("|dx*/dθ|")
        logarithmic = _log_scale(norms)
        if logarithmic:
            ax.set_yscale("log")
        for t in np.unique(run.types):
            mine = run.types == t
            shown = mine & (norms > 0) if logarithmic else mine
            hidden = int(mine.sum() - shown.sum())
            label = run.species[t] + (f" ({hidden} zero, not shown)" if hidden else "")
            ax.scatter(distances[shown], norms[shown], s=size, color=colors[t], alpha=0.7, label=label, lw=0)
        if logarithmic is None:
            ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlim(left=0)
        if not logarithmic:
            ax.set_ylim(bottom=0)
        ax.legend(title="species")
    return fig


def plot_run(
    run_dir: str | os.PathLike,
    params: list[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    center: int | Sequence[float] | None = None,
    slice_width: float | None = None,
) -> list[Path]:
    """Write the figures of a run directory as PNG files.

    Args:
        run_dir: Directory with ``relaxed.extxyz`` and ``relaxed.npz`` (required) and
            ``sensitivity.npz`` (optional; arrays of shape (N, d) named by parameter).
            ``sensitivity.json`` is used, if present, only for parameter values in titles.
        params: Names of the sensitivity arrays to draw; ``None`` draws all of them. An empty
            list, or a run without ``sensitivity.npz``, gives the configuration figure alone.
        out_dir: Where to write the figures; defaults to ``run_dir``. Created if missing.
        center: What ``sensitivity-distance.png`` measures distances from: an atom index, or
            a point (3 coordinates, or d). Default: ``atoms.info["defect_position"]`` of
            ``relaxed.extxyz`` if there is one, else the middle of a periodic cell, else the
            centroid of the atoms. Distances are minimum-image ones in a periodic cell. An
            atom index or point given here is also marked on the configuration figures.
        slice_width: 3-D runs only: draw, in the configuration figures, only the atoms with
            |z - z_mid| < slice_width / 2, where z_mid is the middle of the cell (periodic in z)
            or of the atoms' z range. ``None`` draws the x-y projection of all atoms. The
            histogram and distance figures always cover every atom.

    Returns:
        Paths of the files written: ``sensitivity-<param>.png`` per parameter (characters
        other than letters, digits, ".", "_" and "-" replaced by "_") followed by
        ``sensitivity-histogram.png`` and ``sensitivity-distance.png``, or
        ``configuration.png`` alone when nothing is drawn. Existing files of the same names
        are replaced atomically.

    Raises:
        UserError: A required file is missing or malformed, a name in ``params`` is not in
            ``sensitivity.npz``, ``center`` is an atom index out of range or not a point, or
            ``slice_width`` is not positive, leaves no atom, or is given for a 2-D run.
    """
    run = RunGeometry(read_run(run_dir))
    if params is None:
        params = list(run.sensitivities)
    unknown = [name for name in params if name not in run.sensitivities]
    if unknown:
        available = ", ".join(run.sensitivities) or "none, the run has no sensitivity.npz"
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}; available: {available}")
    shown = select_view(run, slice_width)
    marked = find_center(run, center)

    out = Path(run_dir) if out_dir is None else Path(out_dir)
    written = []
    # Each figure is saved before the next is drawn: a large run's figures are large.
    for name, fig in run_figures(run, params, shown, marked):
        write_with(out / name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=DPI))
        written.append(out / name)
    return written


def run_figures(
    run: RunGeometry, params: list[str], view: View, center: Center
) -> Iterator[tuple[str, Figure]]:
    """The figures :func:`plot_run` writes, by file name, drawn one at a time."""
    if not params:
        yield "configuration.png", configuration_figure(run, view, center)
        return
    for param in params:
        name = f"sensitivity-{_file_safe(param)}.png"
        yield name, configuration_figure(run, view, center, param, run.sensitivities[param])
    yield "sensitivity-histogram.png", histogram_figure(run, params)
    yield "sensitivity-distance.png", distance_figure(run, params, center)
