"""Where the distance figure measures distances from: an atom, a point, the run's defect, or a
vacancy found in a crystal; and the distances themselves.

A global parameter (ε, α, a species' diameter) acts everywhere at once, so the middle of the cell
or the centroid of the atoms would be an arbitrary origin: without a given center, a recorded
defect or a vacancy, there is no distance figure. A vacancy is found as the largest empty sphere
of a periodic crystal whose atoms have no size: a lattice site without its atom is about one
nearest-neighbour distance from every atom, farther than any interstitial hole of fcc, bcc or
simple cubic crystals (at most √3/2 of it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase.geometry import get_distances
from scipy.spatial import cKDTree

from mdsens.errors import UserError
from mdsens.plot_geometry import RunGeometry

# An empty point at least this many nearest-neighbour distances from every atom is a vacancy.
VACANCY_HOLE = 0.93
# The grid searched for the largest empty sphere has points this many nearest-neighbour distances
# apart, and at most GRID_POINTS points along each axis.
GRID_SPACING = 0.25
GRID_POINTS = 40
# The hole's center is refined to the centroid of the atoms within this factor of its radius;
# neighbours are the atoms within this factor of the nearest-neighbour distance.
SHELL = 1.2
# At most this many neighbours of an atom are mirrored through it (fcc has 12).
NEIGHBORS = 14


@dataclass(frozen=True)
class Center:
    """The point distances are measured from."""

    point: np.ndarray  # (3,)
    text: str  # "atom 12 (Ar)", "defect at (x, y, z)", "vacancy found at (x, y, z)", ...
    label: str | None  # legend entry of its marker on the configuration figures; None: unmarked


def format_point(point: np.ndarray, dim: int) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in point[: max(dim, 2)]) + ")"


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


def find_vacancy(run: RunGeometry) -> np.ndarray | None:
    """The vacancy of a periodic crystal without atom sizes, as a point (3,) in the cell: the
    center of its largest empty sphere if that is at least ``VACANCY_HOLE`` nearest-neighbour
    distances wide; None otherwise, and for runs that are not such a crystal."""
    d = run.dim
    lattice = run.cell[:d, :d]
    if run.sized or len(run.positions) < 4 or not run.pbc[:d].all() or abs(np.linalg.det(lattice)) < 1e-12:
        return None
    spacing = run.spacing
    # The atoms and their images in the neighbouring cells, so that the nearest atom of a point
    # in the cell is among them.
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=d))) @ lattice
    atoms = run.wrapped(run.positions3)[:, :d]
    tree = cKDTree((atoms[None, :, :] + shifts[:, None, :]).reshape(-1, d))
    counts = [
        int(np.clip(math.ceil(np.linalg.norm(row) / (GRID_SPACING * spacing)), 2, GRID_POINTS))
        for row in lattice
    ]
    axes = [np.arange(count) / count for count in counts]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d) @ lattice
    # In a lattice with inversion symmetry (fcc, bcc, simple cubic) an atom's neighbour mirrored
    # through it is on a site: a vacancy's site is among these, exactly, beside the grid.
    distance, near = tree.query(atoms, k=min(NEIGHBORS + 1, len(tree.data)))
    pair = (distance > 0) & (distance < SHELL * spacing)
    mirrored = 2 * np.repeat(atoms[:, None, :], pair.shape[1], axis=1)[pair] - tree.data[near[pair]]
    candidates = np.vstack([grid, mirrored])
    empty, _ = tree.query(candidates)
    point = candidates[np.argmax(empty)]
    # On a grid the hole's center is missed by up to half a spacing: the centroid of the shell
    # of atoms around it is the empty site.
    for _ in range(5):
        radius, _ = tree.query(point)
        shell = tree.query_ball_point(point, SHELL * radius)
        point = tree.data[shell].mean(axis=0)
    hole, _ = tree.query(point)
    if hole < VACANCY_HOLE * spacing:
        return None
    out = np.zeros(3)
    out[:d] = point
    return run.wrapped(out[None])[0]


def find_center(run: RunGeometry, center: int | Sequence[float] | None) -> Center | None:
    """The atom ``center`` indexes, or the point it gives; by default the run's defect, else a
    vacancy found in it, else None: no distance figure."""
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
        vacancy = find_vacancy(run)
        if vacancy is None:
            return None
        return Center(vacancy, f"vacancy found at {format_point(vacancy, run.dim)}", "vacancy")
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
