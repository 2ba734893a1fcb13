"""Figures of a finished run, drawn from its files alone (no physics is run here).

:func:`plot_run` reads a run directory with :func:`mdsens.run_files.read_run` and writes PNG files:

* ``sensitivity-<param>.png`` per parameter: the relaxed structure drawn in its cell, with the
  sensitivities dx*/dθ as arrows (the figure of Blondel et al. 2022 for the bubble raft);
  ``configuration.png`` instead, without arrows, when there is nothing to draw;
* ``sensitivity-histogram.png``: the distribution of |dx*/dθ| per species, one panel per
  parameter;
* ``sensitivity-distance.png``: |dx*/dθ| of each atom against its distance from a center (an
  atom, a point, the run's defect, or a vacancy found in a crystal), one panel per parameter;
  not drawn where there is no such center (see :mod:`mdsens.plot_centers`);
* ``observable-<q>-<param>.png`` per per-particle gradient in ``observables.npz``
  (``mdsens sensitivity --observable q --per-particle``): the structure with each particle
  coloured by dq/d(param[i]), the observable's derivative by that particle's own value, on a
  diverging scale centred at 0 (red: a larger value raises q; blue: lowers it).

Each figure is made by a function that returns it (:func:`configuration_figure`, and
:func:`~mdsens.plot_panels.histogram_figure`, :func:`~mdsens.plot_panels.distance_figure`);
:func:`plot_run` saves them. Atoms are drawn as discs of their ``diameter`` where the run has one
(soft spheres), otherwise all of one size, half the median nearest-neighbour distance; rattlers
are hatched. 3-D runs are drawn as their x-y projection, or as a slice of given width about the
middle in z, each atom as its cross-section with the middle plane. Atoms are wrapped into a
periodic cell, periodic images drawn along the periodic x and y axes of an orthorhombic cell,
and arrows clipped to the cell. Axes carry the run's units (:mod:`mdsens.plot_units`).
A parameter whose dx*/dθ is exactly zero, or below what the solve resolves, is drawn without
arrows, and its figure says why. "max|dx*/dθ|" is the largest per-particle vector norm.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import EllipseCollection, LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath

from mdsens.errors import UserError
from mdsens.manifest import write_stage
from mdsens.plot_centers import Center, find_center
from mdsens.plot_geometry import FIXED_SIZE, RunGeometry, View, cell_edges, periodic_images, select_view
from mdsens.plot_panels import (
    RATTLER_HATCH,
    distance_figure,
    histogram_figure,
    rattler_handle,
    species_colors,
    wrap,
)
from mdsens.plot_units import ENERGY_PARAMETERS, LENGTH_PARAMETERS, Units
from mdsens.run_files import PerAtomGradient, read_run

__all__ = ["configuration_figure", "distance_figure", "histogram_figure", "plot_run", "run_figures"]

DPI = 150
# Diverging, white at 0: the sign of a per-particle gradient is the point of its figure.
GRADIENT_CMAP = "RdBu_r"
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _file_safe(name: str) -> str:
    """``name`` with characters other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _title(fig: Figure, lines: list[str]) -> None:
    """``lines`` as the figure's title, each wrapped to the figure's width."""
    # Centred on the figure, not the axes: a long line may be wider than the axes.
    fig.suptitle(wrap("\n".join(lines), fig.get_figwidth()))


def _arrow_lines(
    run: RunGeometry, param: str, arrows: np.ndarray, size: float
) -> tuple[list[str], float | None]:
    """What the title says about the arrows of ``param``, and their gain (data units per unit of
    dx*/dθ; None: no arrows)."""
    facts = run.facts[param]
    note = facts.note().replace("\n", " ")
    if note:
        return [f"{note}: no arrows"], None
    longest = float(np.max(np.linalg.norm(arrows, axis=1))) if len(arrows) else 0.0
    unit = run.units.sensitivity_label(param)
    largest = f"max|dx*/dθ| = {facts.max_particle_dx:.3g} {unit} (largest per-particle norm)"
    if longest == 0:
        return ["dx*/dθ = 0 for every atom shown", largest], None
    # quiver draws |v| / scale data units: the longest arrow spans one (largest drawn) diameter.
    gain = size / longest
    arrow = "arrows: x-y components of" if run.dim == 3 else "arrow length ="
    return [f"{arrow} {gain:.3g} × dx*/dθ", largest], gain


def _dimensions(units: str) -> dict[str, int] | None:
    """Powers of energy and length in an observable's units as mdsens writes them
    (``energy / length^2``, ``length``); None for others (a user observable's)."""
    numerator, *denominators = (part.split() for part in units.split("/"))
    powers = {"energy": 0, "length": 0}
    for sign, terms in [(1, numerator)] + [(-1, terms) for terms in denominators]:
        for term in terms:
            name, _, power = term.partition("^")
            if name not in powers or not (power or "1").isdigit():
                return None
            powers[name] += sign * int(power or 1)
    return powers


def gradient_units(units: Units, observable: PerAtomGradient) -> str:
    """The units of dq/d(param[i]): the observable's over the parameter's, in the run's symbols
    (``ε / d_A³``) where known, else in words."""
    powers = _dimensions(observable.units)
    over = "length" if observable.parameter in LENGTH_PARAMETERS else None
    over = "energy" if observable.parameter in ENERGY_PARAMETERS else over
    if powers is None or over is None:
        return f"units of {observable.observable} per unit of {observable.parameter}"
    powers[over] -= 1
    symbols = {"energy": units.energy or "energy", "length": units.length or "length"}

    def power(name: str, p: int) -> str:
        return symbols[name] + ("" if abs(p) == 1 else str(abs(p)).translate(SUPERSCRIPTS))

    up = [power(name, p) for name, p in powers.items() if p > 0]
    down = [power(name, p) for name, p in powers.items() if p < 0]
    if not up and not down:
        return "dimensionless"
    return " / ".join([" ".join(up) or "1", *down])


def _colours(run: RunGeometry, gradient: PerAtomGradient, index: np.ndarray) -> tuple[np.ndarray, Normalize]:
    """Each shown atom's colour for ``gradient`` and the scale: symmetric about 0, to the largest
    |value| shown (a figure of zeros is all white)."""
    values = gradient.values[index]
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    norm = Normalize(-largest, largest) if largest > 0 else Normalize(-1.0, 1.0)
    return colormaps[GRADIENT_CMAP](norm(values)), norm


def _gradient_lines(run: RunGeometry, gradient: PerAtomGradient) -> tuple[str, list[str]]:
    """The title of a per-particle gradient figure and what it says below the title."""
    q, p = gradient.observable, gradient.parameter
    title = f"d({q})/d({p}[i]): the derivative of {q} by each particle's own {p}"
    summed = ", ".join(
        f"{run.species[t]} {gradient.values[run.types == t].sum():+.4g}" for t in np.unique(run.types)
    )
    lines = [
        f"red: a larger {p}[i] raises {q}; blue: lowers it; white: no effect",
        f"sum over each species = d({q})/d({p} of that species): {summed}",
    ]
    return title, lines


def configuration_figure(
    run: RunGeometry,
    view: View,
    center: Center | None,
    param: str | None = None,
    vectors: np.ndarray | None = None,
    gradient: PerAtomGradient | None = None,
) -> Figure:
    """The atoms of ``view`` in the cell, with ``vectors`` (N, d), dx*/dθ for ``param``, as arrows
    if given and drawable, or coloured by a per-particle ``gradient`` of an observable (with a
    colour bar instead of the species legend); ``center`` is marked where it has a label."""
    index = np.flatnonzero(view.shown)
    xy = run.wrapped_xy(run.positions3[index])
    sizes = view.sizes[index]
    centers, owners = periodic_images(run, xy, sizes)
    images_only_in_box = run.wrap.all()
    outline = run.outline()

    # The projection of the cell's edges: the box, or a parallelogram (or more) for a triclinic cell.
    edges = cell_edges(run.cell)[:, :, :2]
    has_outline = bool(np.any(np.ptp(edges.reshape(-1, 2), axis=0) > 0))
    # Points spanning everything drawn, for the axis limits.
    extent = [edges.reshape(-1, 2)] if has_outline else []
    if not (images_only_in_box and has_outline):
        radius = sizes[owners, None] / 2
        extent += [centers - radius, centers + radius]

    lines = [view.text] if run.dim == 3 else []
    if run.units.note:
        lines.append(run.units.note)
    if not run.sized:
        lines.append(f"atoms drawn {FIXED_SIZE:g} × the nearest-neighbour distance wide")
    if has_outline and not run.orthorhombic and run.pbc.any():
        lines.append("non-orthogonal cell: outline projected, no periodic images drawn")
    gain = None
    if gradient is not None:
        title, said = _gradient_lines(run, gradient)
        lines += said
        facecolors, norm = _colours(run, gradient, index)
    elif vectors is None:
        title = f"relaxed configuration, N = {len(run.positions)}"
    else:
        arrows = vectors[index, :2]
        value = run.values.get(param)
        title = f"dx*/dθ, θ = {param}" + (f" = {value:.4g}" if value is not None else "")
        said, gain = _arrow_lines(run, param, arrows, float(run.diameters[index].max()))
        lines += said
        if gain is not None and outline is None:
            extent.append(xy + gain * arrows)
    marker = run.wrapped_xy(center.point[None])[0] if center is not None and center.label else None
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
    fig = Figure(figsize=(width + 2.0, width * aspect + 0.8 + 0.3 * len(lines)), layout="constrained")
    ax = fig.add_subplot()
    if has_outline:
        ax.add_collection(
            LineCollection(
                edges, colors="black", linewidths=1.0, linestyles="-" if run.pbc.any() else "--", zorder=3
            )
        )

    colors = species_colors(run)
    # Discs overlap in a 3-D projection; transparency keeps the hidden ones visible.
    alpha = 0.85 if run.dim == 2 or view.inside is not None else 0.5
    box_clip = None
    if images_only_in_box:
        # Outside the box the images would only repeat what the box already shows. (A Rectangle
        # passed on its own would become a clip box, which does not clip a collection.)
        lx, ly = run.box
        box_clip = MplPath([(0, 0), (lx, 0), (lx, ly), (0, ly), (0, 0)], closed=True)
    rattler = run.rattlers[index][owners]
    for mask, style in (
        (np.ones(len(owners), dtype=bool), {"edgecolors": "black", "linewidths": 0.3, "alpha": alpha}),
        (rattler, {"facecolors": "none", "edgecolors": "black", "linewidths": 0.6, "hatch": RATTLER_HATCH}),
    ):
        if not mask.any():
            continue
        if gradient is not None:
            style.setdefault("facecolors", facecolors[owners][mask])
        style.setdefault("facecolors", [colors[t] for t in run.types[index][owners][mask]])
        discs = EllipseCollection(
            sizes[owners][mask],
            sizes[owners][mask],
            np.zeros(int(mask.sum())),
            units="xy",
            offsets=centers[mask],
            offset_transform=ax.transData,
            zorder=1,
            **style,
        )
        if box_clip is not None:
            discs.set_clip_path(box_clip, ax.transData)
        ax.add_collection(discs)
    if gain is not None:
        quiver = ax.quiver(
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
        if outline is not None:
            # An arrow ends where the cell does; what lies beyond is the same cell again.
            quiver.set_clip_path(MplPath(np.vstack([outline, outline[:1]]), closed=True), ax.transData)
    # Colour means species, except where it means a gradient.
    handles = [
        Patch(facecolor=colors[t], edgecolor="black", alpha=alpha, label=run.species[t])
        for t in np.unique(run.types[index])
        if gradient is None
    ]
    if run.rattlers[index].any():
        handles.append(rattler_handle(int(run.rattlers[index].sum())))
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

    _title(fig, [title, *lines])
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    length = run.units.length_label()
    ax.set_xlabel(f"x ({length})")
    ax.set_ylabel(f"y ({length})")
    if gradient is not None:
        # Below the axes: the legend (rattlers, center) stands beside them.
        bar = fig.colorbar(
            ScalarMappable(norm=norm, cmap=GRADIENT_CMAP), ax=ax, location="bottom", shrink=0.8, aspect=40
        )
        label = f"d({gradient.observable})/d({gradient.parameter}[i])"
        bar.set_label(f"{label} ({gradient_units(run.units, gradient)})")
    if handles:
        # Beside the axes, where it covers no atom.
        title = "species" if gradient is None else None
        ax.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
            ``sensitivity.json`` is used, if present, for parameter values in titles and for
            what each sensitivity holds (exactly zero, resolved, max|dx*/dθ|); ``system.toml``
            for the units.
        params: Names of the sensitivity arrays to draw; ``None`` draws all of them. An empty
            list, or a run without ``sensitivity.npz``, gives the configuration figure alone.
        out_dir: Where to write the figures; defaults to ``run_dir``. Created if missing.
        center: What ``sensitivity-distance.png`` measures distances from: an atom index, or
            a point (3 coordinates, or d). Default: ``atoms.info["defect_position"]`` of
            ``relaxed.extxyz`` if there is one, else a vacancy found in a periodic crystal, else
            none, and no distance figure. Distances are minimum-image ones in a periodic cell.
            The center is also marked on the configuration figures.
        slice_width: 3-D runs only: draw, in the configuration figures, only the atoms with
            |z - z_mid| < slice_width / 2 that cut the plane z = z_mid, as their cross-sections
            with it; z_mid is the middle of the cell (periodic in z) or of the atoms' z range.
            ``None`` draws the x-y projection of all atoms. The histogram and distance figures
            always cover every atom.

    Returns:
        Paths of the files written: ``sensitivity-<param>.png`` per parameter (characters
        other than letters, digits, ".", "_" and "-" replaced by "_") followed by
        ``sensitivity-histogram.png`` and, where there is a center, ``sensitivity-distance.png``;
        or ``configuration.png`` when there is no sensitivity to draw; then
        ``observable-<q>-<param>.png`` for every per-particle gradient in ``observables.npz``
        (whatever ``params`` says). Existing files of the same names are replaced atomically.

    Raises:
        UserError: A required file is missing or malformed, a name in ``params`` is not in
            ``sensitivity.npz``, ``center`` is an atom index out of range or not a point, or
            ``slice_width`` is not positive, leaves no atom, or is given for a 2-D run.
    """
    files = read_run(run_dir)
    run = RunGeometry(files)
    if params is None:
        params = list(run.sensitivities)
    unknown = [name for name in params if name not in run.sensitivities]
    if unknown:
        available = ", ".join(run.sensitivities) or "none, the run has no sensitivity.npz"
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}; available: {available}")
    shown = select_view(run, slice_width)
    marked = find_center(run, center)

    out = Path(run_dir) if out_dir is None else Path(out_dir)
    # Each figure is saved before the next is drawn: a large run's figures are large. Figures
    # written into the run join its manifest, tied to the state they were drawn from.
    state = files.state if out.resolve() == files.path.resolve() else None
    figures = (
        (name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=DPI))
        for name, fig in run_figures(run, params, shown, marked)
    )
    return write_stage(out, "figures", state, figures)


def run_figures(
    run: RunGeometry, params: list[str], view: View, center: Center | None
) -> Iterator[tuple[str, Figure]]:
    """The figures :func:`plot_run` writes, by file name, drawn one at a time."""
    if not params:
        yield "configuration.png", configuration_figure(run, view, center)
    else:
        for param in params:
            name = f"sensitivity-{_file_safe(param)}.png"
            yield name, configuration_figure(run, view, center, param, run.sensitivities[param])
        yield "sensitivity-histogram.png", histogram_figure(run, params)
        if center is not None:
            yield "sensitivity-distance.png", distance_figure(run, params, center)
    for gradient in run.per_atom:
        name = f"observable-{_file_safe(gradient.observable)}-{_file_safe(gradient.parameter)}.png"
        yield name, configuration_figure(run, view, center, gradient=gradient)
