"""Geometry of a run for its figures: atom sizes, wrapping, periodic images, slices, rattlers and
what each sensitivity holds.

Everything here is NumPy on the arrays that :func:`mdsens.run_files.read_run` reads; nothing is
drawn (that is :mod:`mdsens.plot`) and no physics is run. Where distances are measured from is
:mod:`mdsens.plot_centers`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase.geometry import get_distances
from scipy.spatial import ConvexHull, QhullError

from mdsens.errors import UserError
from mdsens.plot_units import units_of
from mdsens.run_files import RunFiles

# Without per-atom diameters, atoms are drawn this fraction of the nearest-neighbour distance wide.
FIXED_SIZE = 0.5
# At most this many atoms are sampled to estimate the nearest-neighbour distance.
SPACING_SAMPLE = 50


@dataclass(frozen=True)
class ParameterFacts:
    """What a sensitivity dx*/dθ holds, as ``sensitivity.json`` records it (else from dx alone)."""

    exactly_zero: bool  # dx*/dθ = 0 exactly: ∂²E/∂x∂θ vanishes and no solve ran
    resolved: bool  # False: below what the linear solve resolves, numerical noise
    max_particle_dx: float  # max over particles of the vector norm |dx_i*/dθ|: "max|dx*/dθ|"

    @property
    def drawable(self) -> bool:
        return self.resolved and not self.exactly_zero

    def note(self) -> str:
        """Why nothing is drawn for the parameter; empty when it is drawn."""
        if self.exactly_zero:
            return "dx*/dθ = 0 exactly"
        if not self.resolved:
            largest = f"max|dx*/dθ| = {self.max_particle_dx:.2g}"
            return f"dx*/dθ below the solve's resolution\n({largest}, noise): not drawn"
        return ""


def parameter_facts(files: RunFiles, name: str, dx: np.ndarray) -> ParameterFacts:
    """``exactly_zero``, ``resolved`` and ``max_particle_dx`` of parameter ``name`` from the
    run's records; without them, from ``dx`` (N, d): zero when every component is 0, and taken
    as resolved, since only the solve knows its resolution."""
    entry = files.parameters.get(name, {})
    largest = float(np.max(np.linalg.norm(dx, axis=1))) if len(dx) else 0.0
    exactly_zero = bool(entry.get("exactly_zero", largest == 0.0))
    return ParameterFacts(
        exactly_zero=exactly_zero,
        resolved=bool(entry.get("resolved", True)),
        max_particle_dx=float(entry.get("max_particle_dx", largest)),
    )


def find_rattlers(files: RunFiles, facts: dict[str, ParameterFacts]) -> np.ndarray:
    """(N,) mask of the rattlers: those ``sensitivity.json`` lists, else the particles of a
    soft-sphere run whose dx*/dθ is exactly zero in every parameter that moves some particle
    (mdsens zeroes every degree of freedom of a rattler, see docs/file-formats.md); none
    otherwise."""
    if files.rattlers is not None:
        return np.asarray(files.rattlers, dtype=bool)
    mask = np.zeros(len(files.positions), dtype=bool)
    moving = [name for name, fact in facts.items() if fact.drawable]
    if files.structure.diameters is None or not moving:
        return mask
    return np.all([~np.any(files.sensitivities[name] != 0, axis=1) for name in moving], axis=0)


class RunGeometry:
    """A run's atoms as the figures place them: 3-D positions, cell, sizes, species, rattlers,
    sensitivities and their facts, per-particle gradients of observables, units."""

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
        # Periodic images are drawn along these of the x and y axes.
        self.wrap = self.pbc[:2] & (self.box > 0) & self.orthorhombic
        self.types = structure.types
        self.species = structure.species
        # Soft spheres have a diameter; other potentials (Lennard-Jones, Morse) do not.
        self.sized = structure.diameters is not None
        self.spacing = None  # the nearest-neighbour distance, measured where atoms have no size
        if structure.diameters is not None:
            self.diameters = structure.diameters
        else:
            self.spacing = nearest_neighbor_distance(self.positions3, self.cell, self.pbc)
            self.diameters = np.full(len(self.positions), FIXED_SIZE * self.spacing)
        self.defect = structure.defect
        self.sensitivities = files.sensitivities
        self.values = files.values
        self.facts = {name: parameter_facts(files, name, dx) for name, dx in files.sensitivities.items()}
        self.rattlers = find_rattlers(files, self.facts)
        self.units = units_of(files.recipe)
        self.per_atom = files.per_atom  # per-particle gradients of observables, from observables.npz

    @property
    def periodic(self) -> bool:
        """Periodic along some axis, with a cell to measure minimum-image distances in."""
        return bool(self.pbc.any() and np.any(self.cell[self.pbc]))

    def _lattice(self) -> np.ndarray | None:
        """The run's d × d lattice where it is periodic and invertible, else None."""
        lattice = self.cell[: self.dim, : self.dim]
        if not self.pbc[: self.dim].any() or abs(np.linalg.det(lattice)) < 1e-12:
            return None
        return lattice

    def wrapped(self, points: np.ndarray) -> np.ndarray:
        """``points`` (M, 3) moved into the cell along its periodic axes (any cell shape)."""
        out = points.copy()
        lattice = self._lattice()
        if lattice is None:
            return out
        fractional = points[:, : self.dim] @ np.linalg.inv(lattice)
        periodic = self.pbc[: self.dim]
        fractional[:, periodic] -= np.floor(fractional[:, periodic])
        # A point a rounding error below a cell face is on the opposite face, where it starts.
        fractional[fractional > 1 - 1e-12] = 0.0
        out[:, : self.dim] = fractional @ lattice
        return out

    def wrapped_xy(self, points: np.ndarray) -> np.ndarray:
        """x and y of ``points`` (M, 3), moved into the cell along its periodic axes."""
        return self.wrapped(points)[:, :2]

    def outline(self) -> np.ndarray | None:
        """Corners (K, 2) of the x-y projection of a periodic cell, in order around it; None
        where there is no periodic cell with an area to draw in."""
        if not self.periodic:
            return None
        corners = np.unique(np.round(cell_edges(self.cell)[:, :, :2].reshape(-1, 2), 12), axis=0)
        try:
            hull = ConvexHull(corners)
        except (QhullError, ValueError):
            return None
        return corners[hull.vertices]


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


@dataclass(frozen=True)
class View:
    """Which atoms the configuration figures show, how wide each is drawn, and how the title
    says so."""

    shown: np.ndarray  # bool (N,)
    sizes: np.ndarray  # (N,) drawn diameter: the atom's, or that of its cross-section with a plane
    text: str  # empty for 2-D runs
    inside: Callable[[np.ndarray], np.ndarray] | None = None  # z (M,) -> in the slice (M,); None: all


def select_view(run: RunGeometry, slice_width: float | None) -> View:
    """All atoms (``slice_width`` None), or a slice of a 3-D run: the atoms with
    |z − z_mid| < width / 2 whose sphere cuts the plane z = z_mid, drawn as their cross-section
    with it (a disc of radius √(r² − (z − z_mid)²)); z_mid is the middle of the cell (periodic
    in z) or of the atoms' z range."""
    n = len(run.positions)
    if slice_width is None:
        text = f"x-y projection of all {n} atoms" if run.dim == 3 else ""
        return View(np.ones(n, dtype=bool), run.diameters, text)
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

    def offset(z: np.ndarray) -> np.ndarray:
        out = z - middle
        if run.orthorhombic and run.pbc[2] and lz > 0:
            out -= lz * np.round(out / lz)
        return out

    def inside(z: np.ndarray) -> np.ndarray:
        return np.abs(offset(z)) < slice_width / 2

    radius = run.diameters / 2
    dz = offset(z)
    # A sphere that does not reach the plane has no cross-section to draw.
    shown = inside(z) & (np.abs(dz) < radius)
    if not shown.any():
        raise UserError(
            f"no atom within the slice |z - {middle:.4g}| < {slice_width / 2:.4g} cuts the plane "
            f"z = {middle:.4g}; the atoms' z range from {z.min():.4g} to {z.max():.4g}"
        )
    sizes = 2 * np.sqrt(np.clip(radius**2 - dz**2, 0.0, None))
    text = (
        f"slice |z − {middle:.3g}| < {slice_width / 2:.3g} (middle of the {about}): "
        f"{int(shown.sum())} of {n} atoms, drawn as their cross-sections with z = {middle:.3g}"
    )
    return View(shown, sizes, text, inside)
