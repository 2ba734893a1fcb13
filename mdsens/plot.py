"""Figures of a finished run, drawn from its files alone (no physics is run here).

:func:`plot_run` reads ``relaxed.extxyz``, ``relaxed.npz`` and, when present,
``sensitivity.npz``/``sensitivity.json`` from a run directory and writes PNG files:

* ``sensitivity-<param>.png`` per parameter: the relaxed structure drawn in its cell, with the
  sensitivities dx*/dθ as arrows (the figure of Blondel et al. 2022 for the bubble raft);
  ``configuration.png`` instead, without arrows, when there is nothing to draw;
* ``sensitivity-histogram.png``: the distribution of |dx*/dθ| per species, one panel per
  parameter;
* ``sensitivity-distance.png``: |dx*/dθ| of each atom against its distance from a centre (an
  atom, a point, the run's defect, or the middle of the cell), one panel per parameter.

Atoms are drawn as discs of their ``diameter`` where the run has one (soft spheres), otherwise
all of one size, half the median nearest-neighbour distance. 3-D runs are drawn as their x-y
projection, or as a slice of given width about the middle in z. Periodic images are drawn along
the periodic x and y axes of an orthorhombic cell; a triclinic cell is drawn as the projection of
its edges, and its atoms as they are, without images or wrapping.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase.geometry import get_distances
from matplotlib import colormaps
from matplotlib.collections import EllipseCollection, LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath
from matplotlib.ticker import MaxNLocator

from mdsens.atomic import write_with
from mdsens.errors import READ_ERRORS, UserError

DPI = 150
# Values spanning more than this factor get a logarithmic axis.
LOG_SPAN = 100.0
# Without per-atom diameters, atoms are drawn this fraction of the nearest-neighbour distance wide.
FIXED_SIZE = 0.5
# At most this many atoms are sampled to estimate the nearest-neighbour distance.
SPACING_SAMPLE = 50


class _Run:
    """What the figures need from a run directory, in plain NumPy arrays."""

    def __init__(self, run_dir: Path) -> None:
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} does not exist")
        for name in ("relaxed.extxyz", "relaxed.npz"):
            if not (run_dir / name).is_file():
                raise UserError(f"run directory {run_dir} has no {name}")
        atoms = ase.io.read(run_dir / "relaxed.extxyz", format="extxyz")
        if "type" not in atoms.arrays:
            raise UserError(f"{run_dir / 'relaxed.extxyz'} has no per-atom array 'type'")
        with np.load(run_dir / "relaxed.npz") as npz:
            if "positions" not in npz.files:
                raise UserError(f"{run_dir / 'relaxed.npz'} has no array 'positions'")
            # The extxyz text is rounded; the npz keeps full precision.
            self.positions = np.asarray(npz["positions"], dtype=float)
        if self.positions.ndim != 2 or self.positions.shape[0] != len(atoms) or self.positions.shape[1] > 3:
            raise UserError(
                f"{run_dir / 'relaxed.npz'}: positions have shape {self.positions.shape}, "
                f"expected ({len(atoms)}, d) with d <= 3 to match relaxed.extxyz"
            )
        if not np.all(np.isfinite(self.positions)):
            raise UserError(f"{run_dir / 'relaxed.npz'}: positions have non-finite values")
        self.dim = self.positions.shape[1]
        self.positions3 = np.zeros((len(atoms), 3))
        self.positions3[:, : self.dim] = self.positions
        # One lattice vector per row; zeros for a free cluster.
        self.cell = np.asarray(atoms.cell.array, dtype=float)
        self.pbc = np.asarray(atoms.pbc, dtype=bool)
        self.orthorhombic = bool(np.allclose(self.cell, np.diag(np.diag(self.cell)), rtol=0, atol=1e-9))
        self.box = np.diag(self.cell)[:2].copy()
        # Positions are wrapped, and periodic images drawn, along these of the x and y axes.
        self.wrap = self.pbc[:2] & (self.box > 0) & self.orthorhombic
        self.types = np.asarray(atoms.arrays["type"], dtype=int)
        if self.types.size and self.types.min() < 0:
            raise UserError(f"{run_dir / 'relaxed.extxyz'}: per-atom array 'type' has negative values")
        self.species = _species_labels(
            atoms.info.get("species_names"), self.types, atoms.get_chemical_symbols()
        )
        # Soft spheres have a diameter; other potentials (Lennard-Jones, Morse) do not.
        self.sized = "diameter" in atoms.arrays
        if self.sized:
            self.diameters = np.asarray(atoms.arrays["diameter"], dtype=float)
        else:
            spacing = _nearest_neighbour_distance(self.positions3, self.cell, self.pbc)
            self.diameters = np.full(len(atoms), FIXED_SIZE * spacing)
        self.defect = atoms.info.get("defect_position")
        self.sensitivities = self._read_sensitivities(run_dir / "sensitivity.npz")
        self.values = _parameter_values(run_dir / "sensitivity.json")

    def _read_sensitivities(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            return {}
        with np.load(path) as npz:
            arrays = {name: np.asarray(npz[name], dtype=float) for name in npz.files}
        for name, array in arrays.items():
            if array.shape != self.positions.shape:
                raise UserError(
                    f"{path}: array {name!r} has shape {array.shape}, "
                    f"expected {self.positions.shape} like the positions"
                )
            if not np.all(np.isfinite(array)):
                raise UserError(f"{path}: array {name!r} has non-finite values")
        return arrays

    @property
    def periodic(self) -> bool:
        """Periodic along some axis, with a cell to measure minimum-image distances in."""
        return bool(self.pbc.any() and np.any(self.cell[self.pbc]))

    def wrapped_xy(self, points: np.ndarray) -> np.ndarray:
        """x and y of ``points`` (M, 3), wrapped into the box along the ``wrap`` axes."""
        xy = points[:, :2].copy()
        xy[:, self.wrap] = np.mod(xy[:, self.wrap], self.box[self.wrap])
        return xy


def _species_labels(names: object, types: np.ndarray, symbols: Sequence[str] | None = None) -> list[str]:
    """Label of each species index: from ``species_names``, else the one chemical symbol of the
    atoms of that type (unless it is the placeholder 'X'), else the index itself."""
    if isinstance(names, str):
        given = [name.strip() for name in names.split(",")]
    elif names is None:
        given = []
    else:
        # extxyz reads "1,2" back as an integer array and "T,F" as booleans.
        given = [
            ("T" if name else "F") if isinstance(name, bool) else str(name)
            for name in np.atleast_1d(names).tolist()
        ]
    count = max(len(given), int(types.max()) + 1 if types.size else 0)
    from_symbols = {}
    for t in range(len(given), count):
        mine = {symbols[i] for i in np.flatnonzero(types == t)} if symbols is not None else set()
        if len(mine) == 1 and mine != {"X"}:
            from_symbols[t] = mine.pop()
    labels = []
    for t in range(count):
        if t < len(given):
            labels.append(given[t])
        elif t in from_symbols:
            # Two species of one element are told apart by their index.
            shared = list(from_symbols.values()).count(from_symbols[t]) > 1
            labels.append(f"{from_symbols[t]} ({t})" if shared else from_symbols[t])
        else:
            labels.append(str(t))
    return labels


def _parameter_values(path: Path) -> dict[str, float]:
    """Parameter values from ``sensitivity.json`` for the titles; empty if it does not say."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    params = meta.get("parameters") if isinstance(meta, dict) else None
    if not isinstance(params, dict):
        return {}
    return {
        name: float(entry["value"])
        for name, entry in params.items()
        if isinstance(entry, dict) and isinstance(entry.get("value"), int | float)
    }


def _nearest_neighbour_distance(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> float:
    """Median distance from an atom to its nearest neighbour (minimum image where periodic),
    over an evenly spaced sample of the atoms; 1 where there is no neighbour to measure."""
    if len(positions) < 2:
        return 1.0
    sample = positions[:: math.ceil(len(positions) / SPACING_SAMPLE)]
    if pbc.any() and np.any(cell[pbc]):
        # One atom at a time: in a general cell ASE tries 27 images of every pair at once.
        distances = np.vstack([get_distances(atom, positions, cell=cell, pbc=pbc)[1] for atom in sample])
    else:
        distances = np.linalg.norm(sample[:, None, :] - positions[None, :, :], axis=2)
    # Each sampled atom's distance to itself, and to any atom on top of it, is no neighbour's.
    distances[distances <= 1e-9 * max(float(distances.max()), 1.0)] = np.inf
    nearest = distances.min(axis=1)
    nearest = nearest[np.isfinite(nearest)]
    return float(np.median(nearest)) if nearest.size else 1.0


def _file_safe(name: str) -> str:
    """``name`` with characters other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _colours(run: _Run) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(len(run.species))]


def _cell_edges(cell: np.ndarray) -> np.ndarray:
    """The 12 edges of the cell with a corner at the origin, shape (12, 2, 3)."""
    edges = []
    for corner in itertools.product((0, 1), repeat=3):
        for axis in range(3):
            if corner[axis] == 0:
                end = list(corner)
                end[axis] = 1
                edges.append([np.asarray(corner) @ cell, np.asarray(end) @ cell])
    return np.asarray(edges, dtype=float)


def _periodic_images(run: _Run, xy: np.ndarray, diameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of every copy of each disc that reaches into the box along the ``wrap`` axes, and
    the index into ``xy`` of the disc each copy is of."""
    radius = diameters / 2
    centres, owners = [], []
    shifts = [(-1, 0, 1) if periodic else (0,) for periodic in run.wrap]
    for shift in itertools.product(*shifts):
        moved = xy + np.asarray(shift) * run.box
        if any(shift):
            reaches = (moved + radius[:, None] > 0) & (moved - radius[:, None] < run.box)
            # Along an axis without images a disc may lie outside the box; it counts as inside.
            inside = np.all(reaches | ~run.wrap, axis=1)
        else:
            inside = np.ones(len(xy), dtype=bool)
        centres.append(moved[inside])
        owners.append(np.nonzero(inside)[0])
    return np.concatenate(centres), np.concatenate(owners)


def _format_point(point: np.ndarray, dim: int) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in point[: max(dim, 2)]) + ")"


@dataclass
class _View:
    """Which atoms the configuration figures show, and how the title says so."""

    shown: np.ndarray  # bool (N,)
    text: str  # empty for 2-D runs
    inside: Callable[[np.ndarray], np.ndarray] | None = None  # z (M,) -> in the slice (M,); None: all


def _view(run: _Run, slice_width: float | None) -> _View:
    n = len(run.positions)
    if slice_width is None:
        text = f"x-y projection of all {n} atoms" if run.dim == 3 else ""
        return _View(np.ones(n, dtype=bool), text)
    if isinstance(slice_width, bool) or not isinstance(slice_width, int | float | np.number):
        raise UserError(f"slice width must be a number, not {slice_width!r}")
    if not (math.isfinite(slice_width) and slice_width > 0):
        raise UserError(f"slice width must be positive, not {slice_width}")
    if run.dim != 3:
        raise UserError(f"a slice needs a 3-D run; this one is {run.dim}-D (it is drawn whole)")
    z = run.positions3[:, 2]
    lz = run.cell[2, 2]
    if run.pbc[2] and np.any(run.cell[:, 2]):
        corners_z = _cell_edges(run.cell)[:, :, 2]
        middle, about = 0.5 * (corners_z.min() + corners_z.max()), "cell"
    else:
        middle, about = 0.5 * (z.min() + z.max()), "atoms' z-range"

    def inside(z: np.ndarray) -> np.ndarray:
        offset = z - middle
        if run.orthorhombic and run.pbc[2] and lz > 0:
            offset -= lz * np.round(offset / lz)
        return np.abs(offset) < slice_width / 2

    shown = inside(z)
    if not shown.any():
        raise UserError(
            f"no atom within the slice |z - {middle:.4g}| < {slice_width / 2:.4g}; "
            f"the atoms' z range from {z.min():.4g} to {z.max():.4g}"
        )
    text = (
        f"slice |z − {middle:.3g}| < {slice_width / 2:.3g} (middle of the {about}): "
        f"{int(shown.sum())} of {n} atoms"
    )
    return _View(shown, text, inside)


@dataclass
class _Centre:
    """The point distances are measured from."""

    point: np.ndarray  # (3,)
    text: str  # "atom 12 (Ar)", "defect at (x, y, z)", "cell centre (x, y, z)", ...
    label: str | None  # legend entry of its marker on the configuration figures; None: unmarked


def _coordinates(value: object, dim: int, what: str, shown: object = None) -> np.ndarray:
    """``value`` as a point (3,); it must have 3 finite coordinates (or 2 in a 2-D run).
    ``shown`` stands for ``value`` in the error message if given."""
    shown = value if shown is None else shown
    try:
        point = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        point = None
    if point is None or point.size not in (dim, 3) or not np.all(np.isfinite(point)):
        count = "3" if dim == 3 else "2 or 3"
        raise UserError(f"{what} must be an atom index or {count} finite coordinates, not {shown!r}")
    out = np.zeros(3)
    out[: point.size] = point
    return out


def _centre(run: _Run, center: int | Sequence[float] | None) -> _Centre:
    n = len(run.positions)
    if center is None:
        if run.defect is not None:
            try:
                point = _coordinates(run.defect, run.dim, "")
            except UserError:
                raise UserError(
                    f"atoms.info['defect_position'] of relaxed.extxyz is {run.defect!r}, not a point; "
                    "pass a centre (an atom index or coordinates)"
                ) from None
            return _Centre(point, f"defect at {_format_point(point, run.dim)}", "defect")
        if run.periodic:
            point = run.cell.sum(axis=0) / 2
            return _Centre(point, f"cell centre {_format_point(point, run.dim)}", None)
        point = run.positions3.mean(axis=0)
        return _Centre(point, f"centroid of the atoms {_format_point(point, run.dim)}", None)
    if isinstance(center, int | np.integer) and not isinstance(center, bool | np.bool_):
        if not 0 <= center < n:
            raise UserError(f"atom index {center} is out of range: the run has {n} atoms, 0 to {n - 1}")
        index = int(center)
        return _Centre(
            run.positions3[index], f"atom {index} ({run.species[run.types[index]]})", f"atom {index}"
        )
    # A string would pass for a number, or a sequence of them.
    point = _coordinates(
        None if isinstance(center, str | bytes | bool | np.bool_) else center, run.dim, "center", center
    )
    return _Centre(point, f"point {_format_point(point, run.dim)}", "centre")


def _draw_configuration(
    run: _Run,
    path: Path,
    view: _View,
    centre: _Centre,
    param: str | None = None,
    vectors: np.ndarray | None = None,
) -> None:
    """Draw the atoms of ``view`` in the cell, with ``vectors`` (N, d) as arrows if given, to ``path``."""
    index = np.flatnonzero(view.shown)
    xy = run.wrapped_xy(run.positions3[index])
    diameters = run.diameters[index]
    centres, owners = _periodic_images(run, xy, diameters)
    images_only_in_box = run.wrap.all()

    # The projection of the cell's edges: the box, or a parallelogram (or more) for a triclinic cell.
    edges = _cell_edges(run.cell)[:, :, :2]
    has_outline = bool(np.any(np.ptp(edges.reshape(-1, 2), axis=0) > 0))
    # Points spanning everything drawn, for the axis limits.
    extent = [edges.reshape(-1, 2)] if has_outline else []
    if not (images_only_in_box and has_outline):
        radius = diameters[owners, None] / 2
        extent += [centres - radius, centres + radius]

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
    marker = run.wrapped_xy(centre.point[None])[0] if centre.label is not None else None
    if marker is not None:
        extent.append(marker[None])
        marker_label = centre.label
        if view.inside is not None and not view.inside(centre.point[2:])[0]:
            marker_label += f"\n(z = {centre.point[2]:.3g},\noutside the slice)"

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

    colours = _colours(run)
    # Discs overlap in a 3-D projection; transparency keeps the hidden ones visible.
    alpha = 0.85 if run.dim == 2 else 0.5
    discs = EllipseCollection(
        diameters[owners],
        diameters[owners],
        np.zeros(len(owners)),
        units="xy",
        offsets=centres,
        offset_transform=ax.transData,
        facecolors=[colours[t] for t in run.types[index][owners]],
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
        Patch(facecolor=colours[t], edgecolor="black", alpha=alpha, label=run.species[t])
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
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI))


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


def _draw_histograms(run: _Run, params: list[str], path: Path) -> None:
    """Histogram of the per-atom |dx*/dθ| per species, one panel per parameter."""
    fig, axes = _panels(len(params))
    colours = _colours(run)
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
            ax.hist(shown, bins=bins, color=colours[t], alpha=0.5, label=label)
        ax.legend(title="species")
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI))


def _distances(run: _Run, point: np.ndarray) -> np.ndarray:
    """Distance of each atom from ``point`` (3,), the minimum-image one in a periodic cell."""
    if run.periodic:
        _, distances = get_distances(run.positions3, point[None], cell=run.cell, pbc=run.pbc)
        return distances[:, 0]
    return np.linalg.norm(run.positions3 - point, axis=1)


def _draw_distances(run: _Run, params: list[str], centre: _Centre, path: Path) -> None:
    """|dx*/dθ| of each atom against its distance from ``centre``, one panel per parameter."""
    distances = _distances(run, centre.point)
    fig, axes = _panels(len(params))
    fig.suptitle(f"|dx*/dθ| against distance from {centre.text}")
    colours = _colours(run)
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
            ax.scatter(distances[shown], norms[shown], s=size, color=colours[t], alpha=0.7, label=label, lw=0)
        if logarithmic is None:
            ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlim(left=0)
        if not logarithmic:
            ax.set_ylim(bottom=0)
        ax.legend(title="species")
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI))


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
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    try:
        run = _Run(run_dir)
    except READ_ERRORS as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"cannot read run {run_dir}: {type(error).__name__} {error}") from None
    if params is None:
        params = list(run.sensitivities)
    unknown = [name for name in params if name not in run.sensitivities]
    if unknown:
        available = ", ".join(run.sensitivities) or "none, the run has no sensitivity.npz"
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}; available: {available}")
    view = _view(run, slice_width)
    centre = _centre(run, center)

    if not params:
        path = out_dir / "configuration.png"
        _draw_configuration(run, path, view, centre)
        return [path]
    written = []
    for param in params:
        path = out_dir / f"sensitivity-{_file_safe(param)}.png"
        _draw_configuration(run, path, view, centre, param, run.sensitivities[param])
        written.append(path)
    for name, draw in (
        ("sensitivity-histogram.png", lambda p: _draw_histograms(run, params, p)),
        ("sensitivity-distance.png", lambda p: _draw_distances(run, params, centre, p)),
    ):
        draw(out_dir / name)
        written.append(out_dir / name)
    return written
