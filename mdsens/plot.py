"""Figures of a finished run, drawn from its files alone (no physics is run here).

:func:`plot_run` reads ``relaxed.extxyz``, ``relaxed.npz`` and, when present,
``sensitivity.npz``/``sensitivity.json`` from a run directory and writes PNG files:

* ``sensitivity-<param>.png`` per parameter: the relaxed packing drawn to scale in its periodic
  box, with the sensitivities dx*/dθ as arrows (the figure of Blondel et al. 2022 for the
  bubble raft); ``configuration.png`` instead, without arrows, when there is nothing to draw;
* ``sensitivity-histogram.png``: the distribution of |dx*/dθ| per species, one panel per
  parameter.

3-D runs are drawn as their x-y projection. Only orthorhombic cells with the origin at 0 are
supported, the convention of JAX-MD's periodic spaces.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import ase.io
import numpy as np
from matplotlib import colormaps
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from mdsens.atomic import write_with
from mdsens.errors import READ_ERRORS, UserError

DPI = 150
# Values spanning more than this factor get a logarithmic histogram axis.
LOG_SPAN = 100.0


class _Run:
    """What the figures need from a run directory, in plain NumPy arrays."""

    def __init__(self, run_dir: Path) -> None:
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} does not exist")
        for name in ("relaxed.extxyz", "relaxed.npz"):
            if not (run_dir / name).is_file():
                raise UserError(f"run directory {run_dir} has no {name}")
        atoms = ase.io.read(run_dir / "relaxed.extxyz", format="extxyz")
        for name in ("type", "diameter"):
            if name not in atoms.arrays:
                raise UserError(f"{run_dir / 'relaxed.extxyz'} has no per-atom array {name!r}")
        if not atoms.cell.orthorhombic:
            raise UserError(f"{run_dir / 'relaxed.extxyz'} has a non-orthorhombic cell")
        with np.load(run_dir / "relaxed.npz") as npz:
            if "positions" not in npz.files:
                raise UserError(f"{run_dir / 'relaxed.npz'} has no array 'positions'")
            # The extxyz text is rounded; the npz keeps full precision.
            self.positions = np.asarray(npz["positions"], dtype=float)
        if self.positions.ndim != 2 or self.positions.shape[0] != len(atoms):
            raise UserError(
                f"{run_dir / 'relaxed.npz'}: positions have shape {self.positions.shape}, "
                f"expected ({len(atoms)}, d) to match relaxed.extxyz"
            )
        self.dim = self.positions.shape[1]
        self.box = np.diag(atoms.cell.array)[:2].copy()
        if np.any(self.box <= 0):
            raise UserError(f"{run_dir / 'relaxed.extxyz'} has no cell extent along x or y")
        self.pbc = atoms.pbc[:2].copy()
        self.types = np.asarray(atoms.arrays["type"], dtype=int)
        self.diameters = np.asarray(atoms.arrays["diameter"], dtype=float)
        self.species = _species_labels(atoms.info.get("species_names"), self.types)
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


def _species_labels(names: object, types: np.ndarray) -> list[str]:
    """Label of each species index; the index itself where ``species_names`` does not say."""
    if isinstance(names, str):
        given = [name.strip() for name in names.split(",")]
    elif names is None:
        given = []
    else:
        # extxyz reads "1,2" back as an integer array.
        given = [str(name) for name in np.atleast_1d(names)]
    count = max(len(given), int(types.max()) + 1 if types.size else 0)
    return [given[t] if t < len(given) else str(t) for t in range(count)]


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


def _file_safe(name: str) -> str:
    """``name`` with characters other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _colours(run: _Run) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(len(run.species))]


def _periodic_images(run: _Run, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of every copy of each disc that reaches into the box, and the particle index."""
    radius = run.diameters / 2
    centres, owners = [], []
    shifts = [(-1, 0, 1) if periodic else (0,) for periodic in run.pbc]
    for shift in itertools.product(*shifts):
        moved = xy + np.asarray(shift) * run.box
        if any(shift):
            inside = np.all((moved + radius[:, None] > 0) & (moved - radius[:, None] < run.box), 1)
        else:
            # Along a non-periodic axis a particle may lie outside the box; it is drawn anyway.
            inside = np.ones(len(xy), dtype=bool)
        centres.append(moved[inside])
        owners.append(np.nonzero(inside)[0])
    return np.concatenate(centres), np.concatenate(owners)


def _draw_configuration(
    run: _Run, path: Path, param: str | None = None, vectors: np.ndarray | None = None
) -> None:
    """Draw the packing to scale, with ``vectors`` (N, d) as arrows if given, to ``path``."""
    xy = run.positions[:, :2].copy()
    xy[:, run.pbc] = np.mod(xy[:, run.pbc], run.box[run.pbc])
    width = 6.0
    fig = Figure(figsize=(width + 1.5, width * run.box[1] / run.box[0] + 0.8), layout="constrained")
    ax = fig.add_subplot()
    box = Rectangle((0, 0), *run.box, fill=False, edgecolor="black", linewidth=1.0, zorder=3)
    ax.add_patch(box)

    centres, owners = _periodic_images(run, xy)
    colours = _colours(run)
    # Discs overlap in a 3-D projection; transparency keeps the hidden ones visible.
    alpha = 0.85 if run.dim == 2 else 0.5
    discs = EllipseCollection(
        run.diameters[owners],
        run.diameters[owners],
        np.zeros(len(owners)),
        units="xy",
        offsets=centres,
        offset_transform=ax.transData,
        facecolors=[colours[t] for t in run.types[owners]],
        edgecolors="black",
        linewidths=0.3,
        alpha=alpha,
        zorder=1,
    )
    # Points spanning everything drawn, for the axis limits.
    extent = [np.zeros(2), run.box]
    if run.pbc.all():
        # Outside the box the images would only repeat what the box already shows. Passed on
        # its own, the Rectangle would become a clip box, which does not clip this collection.
        discs.set_clip_path(box.get_path(), box.get_transform())
    else:
        radius = run.diameters[owners, None] / 2
        extent += [centres - radius, centres + radius]
    ax.add_collection(discs)

    projection = ", x-y projection" if run.dim == 3 else ""
    if vectors is None:
        ax.set_title(f"relaxed configuration, N = {len(xy)}{projection}")
    else:
        arrows = vectors[:, :2]
        longest = float(np.max(np.linalg.norm(arrows, axis=1)))
        value = run.values.get(param)
        theta = f"θ = {param}" + (f" = {value:.4g}" if value is not None else "")
        if longest > 0:
            # quiver draws |v| / scale data units: the longest arrow spans one large diameter.
            gain = run.diameters.max() / longest
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
            extent.append(xy + gain * arrows)
            scale = f"arrow length = {gain:.3g} × dx*/dθ (longest |dx*/dθ| = {longest:.3g})"
        else:
            scale = "dx*/dθ = 0 for every particle"
        ax.set_title(f"dx*/dθ, {theta}{projection}\n{scale}")

    pad = 0.02 * run.box.max()
    low = np.vstack(extent).min(axis=0) - pad
    high = np.vstack(extent).max(axis=0) + pad
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    present = np.unique(run.types)
    ax.legend(
        handles=[
            Patch(facecolor=colours[t], edgecolor="black", alpha=alpha, label=run.species[t]) for t in present
        ],
        title="species",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI))


def _draw_histograms(run: _Run, params: list[str], path: Path) -> None:
    """Histogram of the per-particle |dx*/dθ| per species, one panel per parameter."""
    ncols = min(len(params), 3)
    nrows = math.ceil(len(params) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = _colours(run)
    for ax, param in zip(axes, params, strict=False):
        norms = np.linalg.norm(run.sensitivities[param], axis=1)
        positive = norms[norms > 0]
        ax.set_title(f"θ = {param}")
        ax.set_xlabel("|dx*/dθ|")
        ax.set_ylabel("particles")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if positive.size == 0:
            ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center")
            continue
        low, high = positive.min(), positive.max()
        logarithmic = high > LOG_SPAN * low
        if logarithmic:
            # Zeros have no place on a log axis; the legend counts them instead.
            bins = np.geomspace(low, high, 31)
            ax.set_xscale("log")
        else:
            bins = np.linspace(0.0, high, 31)
        for t in np.unique(run.types):
            mine = norms[run.types == t]
            shown = mine[mine > 0] if logarithmic else mine
            hidden = len(mine) - len(shown)
            label = run.species[t] + (f" ({hidden} zero, not shown)" if hidden else "")
            ax.hist(shown, bins=bins, color=colours[t], alpha=0.5, label=label)
        ax.legend(title="species")
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=DPI))


def plot_run(
    run_dir: str | os.PathLike,
    params: list[str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the figures of a run directory as PNG files.

    Args:
        run_dir: Directory with ``relaxed.extxyz`` and ``relaxed.npz`` (required) and
            ``sensitivity.npz`` (optional; arrays of shape (N, d) named by parameter).
            ``sensitivity.json`` is used, if present, only for parameter values in titles.
        params: Names of the sensitivity arrays to draw; ``None`` draws all of them. An empty
            list, or a run without ``sensitivity.npz``, gives the configuration figure alone.
        out_dir: Where to write the figures; defaults to ``run_dir``. Created if missing.

    Returns:
        Paths of the files written: ``sensitivity-<param>.png`` per parameter (characters
        other than letters, digits, ".", "_" and "-" replaced by "_") followed by
        ``sensitivity-histogram.png``, or ``configuration.png`` alone when nothing is drawn.
        Existing files of the same names are replaced atomically.

    Raises:
        UserError: A required file is missing or malformed, the cell is not orthorhombic, or
            a name in ``params`` is not in ``sensitivity.npz``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    try:
        run = _Run(run_dir)
    except READ_ERRORS as error:
        raise UserError(f"cannot read run {run_dir}: {type(error).__name__} {error}") from None
    if params is None:
        params = list(run.sensitivities)
    unknown = [name for name in params if name not in run.sensitivities]
    if unknown:
        available = ", ".join(run.sensitivities) or "none, the run has no sensitivity.npz"
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}; available: {available}")

    if not params:
        path = out_dir / "configuration.png"
        _draw_configuration(run, path)
        return [path]
    written = []
    for param in params:
        path = out_dir / f"sensitivity-{_file_safe(param)}.png"
        _draw_configuration(run, path, param, run.sensitivities[param])
        written.append(path)
    path = out_dir / "sensitivity-histogram.png"
    _draw_histograms(run, params, path)
    return [*written, path]
