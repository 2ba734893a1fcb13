"""Geometry of a run for its figures: atom sizes, periodic images, slices, centers and distances.

Everything here is NumPy on the arrays that :func:`mdsens.run_files.read_run` reads; nothing is
drawn (that is :mod:`mdsens.plot`) and no physics is run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from ase.geometry import get_distances

from mdsens.errors import UserError
from mdsens.run_files import RunFiles

# Without per-atom diameters, atoms are drawn this fraction of the nearest-neighbour distance wide.
FIXED_SIZE = 0.5
# At most this many atoms are sampled to estimate the nearest-neighbour distance.
SPACING_SAMPLE = 50


class RunGeometry:
    """A run's atoms as the figures place them: 3-D positions, cell, sizes, species, sensitivities."""

    def __init__(self, files: RunFiles) -> None:
        structure = files.structure
        self.positions = files.positions
        self.dim = files.positions.shape[1]
        self.positions3 = np.zeros((len(files.positions), 3))
        self.positions3[:, : self.dim] = files.positions
        self.cell = structure.cell
        self.pbc = structure.pbc
        self.orthorhombic = bool(np.allclose(self.cell, np.diag(np.diag(self.cell)), rtol=0, atol=1e-9))
        self.box = np.diag(self.cell)[:2].copy()
        # Positions are wrapped, and periodic images drawn, along these of the x and y axes.
        self.wrap = self.pbc[:2] & (self.box > 0) & self.orthorhombic
        self.types = structure.types
        self.species = structure.species
        # Soft spheres have a diameter; other potentials (Lennard-Jones, Morse) do not.
        self.sized = structure.diameters is not None
        if structure.diameters is not None:
            self.diameters = structure.diameters
        else:
            spacing = nearest_neighbor_distance(self.positions3, self.cell, self.pbc)
            self.diameters = np.full(len(self.positions), FIXED_SIZE * spacing)
        self.defect = structure.defect
        self.sensitivities = files.sensitivities
        self.values = files.values

    @property
    def periodic(self) -> bool:
        """Periodic along some axis, with a cell to measure minimum-image distances in."""
        return bool(self.pbc.any() and np.any(self.cell[self.pbc]))

    def wrapped_xy(self, points: np.ndarray) -> np.ndarray:
        """x and y of ``points`` (M, 3), wrapped into the box along the ``wrap`` axes."""
        xy = points[:, :2].copy()
        xy[:, self.wrap] = np.mod(xy[:, self.wrap], self.box[self.wrap])
        return xy


def nearest_neighbor_distance(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> float:
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


def cell_edges(cell: np.ndarray) -> np.ndarray:
    """The 12 edges of the cell with a corner at the origin, shape (12, 2, 3)."""
    edges = []
    for corner in itertools.product((0, 1), repeat=3):
        for axis in range(3):
            if corner[axis] == 0:
                end = list(corner)
                end[axis] = 1
                edges.append([np.asarray(corner) @ cell, np.asarray(end) @ cell])
    return np.asarray(edges, dtype=float)


def periodic_images(run: RunGeometry, xy: np.ndarray, diameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centers of every copy of each disc that reaches into the box along the ``wrap`` axes, and
    the index into ``xy`` of the disc each copy is of."""
    radius = diameters / 2
    centers, owners = [], []
    shifts = [(-1, 0, 1) if periodic else (0,) for periodic in run.wrap]
    for shift in itertools.product(*shifts):
        moved = xy + np.asarray(shift) * run.box
        if any(shift):
            reaches = (moved + radius[:, None] > 0) & (moved - radius[:, None] < run.box)
            # Along an axis without images a disc may lie outside the box; it counts as inside.
            inside = np.all(reaches | ~run.wrap, axis=1)
        else:
            inside = np.ones(len(xy), dtype=bool)
        centers.append(moved[inside])
        owners.append(np.nonzero(inside)[0])
    return np.concatenate(centers), np.concatenate(owners)


def format_point(point: np.ndarray, dim: int) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in point[: max(dim, 2)]) + ")"


@dataclass(frozen=True)
class View:
    """Which atoms the configuration figures show, and how the title says so."""

    shown: np.ndarray  # bool (N,)
    text: str  # empty for 2-D runs
    inside: Callable[[np.ndarray], np.ndarray] | None = None  # z (M,) -> in the slice (M,); None: all


def select_view(run: RunGeometry, slice_width: float | None) -> View:
    """All atoms (``slice_width`` None), or those of a 3-D run with |z − z_mid| < width / 2, z_mid
    the middle of the cell (periodic in z) or of the atoms' z range."""
    n = len(run.positions)
    if slice_width is None:
        text = f"x-y projection of all {n} atoms" if run.dim == 3 else ""
        return View(np.ones(n, dtype=bool), text)
    if isinstance(slice_width, bool) or not isinstance(slice_width, int | float | np.number):
        raise UserError(f"slice width must be a number, not {slice_width!r}")
    if not (math.isfinite(slice_width) and slice_width > 0):
        raise UserError(f"slice width must be positive, not {slice_width}")
    if run.dim != 3:
        raise UserError(f"a slice needs a 3-D run; this one is {run.dim}-D (it is drawn whole)")
    z = run.positions3[:, 2]
    lz = run.cell[2, 2]
    if run.pbc[2] and np.any(run.cell[:, 2]):
        corners_z = cell_edges(run.cell)[:, :, 2]
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
    return View(shown, text, inside)


@dataclass(frozen=True)
class Center:
    """The point distances are measured from."""

    point: np.ndarray  # (3,)
    text: str  # "atom 12 (Ar)", "defect at (x, y, z)", "cell center (x, y, z)", ...
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


def find_center(run: RunGeometry, center: int | Sequence[float] | None) -> Center:
    """The atom ``center`` indexes, or the point it gives; by default the run's defect, else the
    middle of a periodic cell, else the centroid of the atoms."""
    n = len(run.positions)
    if center is None:
        if run.defect is not None:
            try:
                point = _coordinates(run.defect, run.dim, "")
            except UserError:
                raise UserError(
                    f"atoms.info['defect_position'] of relaxed.extxyz is {run.defect!r}, not a point; "
                    "pass a center (an atom index or coordinates)"
                ) from None
            return Center(point, f"defect at {format_point(point, run.dim)}", "defect")
        if run.periodic:
            point = run.cell.sum(axis=0) / 2
            return Center(point, f"cell center {format_point(point, run.dim)}", None)
        point = run.positions3.mean(axis=0)
        return Center(point, f"centroid of the atoms {format_point(point, run.dim)}", None)
    if isinstance(center, int | np.integer) and not isinstance(center, bool | np.bool_):
        if not 0 <= center < n:
            raise UserError(f"atom index {center} is out of range: the run has {n} atoms, 0 to {n - 1}")
        index = int(center)
        return Center(
            run.positions3[index], f"atom {index} ({run.species[run.types[index]]})", f"atom {index}"
        )
    # A string would pass for a number, or a sequence of them.
    point = _coordinates(
        None if isinstance(center, str | bytes | bool | np.bool_) else center, run.dim, "center", center
    )
    return Center(point, f"point {format_point(point, run.dim)}", "center")


def distances_from(run: RunGeometry, point: np.ndarray) -> np.ndarray:
    """Distance of each atom from ``point`` (3,), the minimum-image one in a periodic cell."""
    if run.periodic:
        _, out = get_distances(run.positions3, point[None], cell=run.cell, pbc=run.pbc)
        return out[:, 0]
    return np.linalg.norm(run.positions3 - point, axis=1)
