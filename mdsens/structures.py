"""Structure input: ASE atoms from a file or generated (lattice, random box), and their species.

:func:`read_structure` reads one frame of any file ``ase.io.read`` reads; :func:`generate` builds
the atoms of a recipe's ``[lattice]`` or ``[box]``; :func:`geometry` says which dimension, cell,
periodicity and space the atoms have; :func:`species_of` names the species of any atoms (mdsens's
own run files included), the one place where species names are parsed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import ase
import ase.io
import ase.io.formats
import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import READ_ERRORS, UserError
from mdsens.recipe import Recipe
from mdsens.validate import LARGEST, MAX_PARTICLES


def species_counts(fractions: list[float], n: int) -> list[int]:
    """Integer particle counts per species from fractions, summing to ``n`` (largest remainder)."""
    total = sum(fractions)
    exact = [f / total * n for f in fractions]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def particle_volume(diameter: float, dimension: int) -> float:
    """Area (2-D) or volume (3-D) of a sphere of the given diameter."""
    r = diameter / 2
    return math.pi * r**2 if dimension == 2 else 4.0 / 3.0 * math.pi * r**3


def read_structure(path: str | Path, index: int = -1) -> ase.Atoms:
    """Read one frame of any file ``ase.io.read`` reads; a bad or empty file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"structure file not found: {path}")
    try:
        atoms = ase.io.read(path, index=index)
    except (
        *READ_ERRORS,
        ase.io.formats.UnknownFileTypeError,
        StopIteration,
        AttributeError,
        TypeError,
        UnicodeDecodeError,
    ) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read structure {path}: {detail}") from None
    if not isinstance(atoms, ase.Atoms):
        raise UserError(f"cannot read structure {path}: not a single structure")
    if len(atoms) == 0:
        raise UserError(f"structure {path} has no atoms")
    if len(atoms) > MAX_PARTICLES:
        raise UserError(f"structure {path} has {len(atoms)} atoms, more than MAX_PARTICLES = {MAX_PARTICLES}")
    numbers = np.concatenate([atoms.positions.ravel(), atoms.cell[:].ravel()])
    if not np.all(np.abs(numbers) <= LARGEST):  # NaN fails too
        raise UserError(
            f"structure {path} has positions or cell vectors that are not finite numbers of at most"
            f" {LARGEST:g} in magnitude"
        )
    return atoms


def _given_names(value: object) -> list[str]:
    """The names in an ``info["species_names"]`` value as ASE reads it back: the comma-separated
    string itself, or (extxyz parses "1,2" as integers and "T,F" as booleans) a parsed value."""
    if value is None:
        return []
    if isinstance(value, str):
        return [name.strip() for name in value.split(",")]
    return [("T" if v else "F") if isinstance(v, bool) else str(v) for v in np.atleast_1d(value).tolist()]


def species_of(atoms: ase.Atoms) -> tuple[tuple[str, ...], np.ndarray]:
    """Species names and the species index of every atom, shape (N,).

    Without a per-atom ``type`` array, each chemical symbol is a species (in order of first
    appearance). With one, the distinct types in increasing order are the species, named by
    ``info["species_names"]`` (what mdsens writes) when it names types 0, 1, …, S − 1 exactly,
    else by their chemical symbols when each type has a symbol of its own, else ``T<type>``.

    Raises:
        UserError: a ``type`` array that does not hold non-negative integers.
    """
    symbols = np.array(atoms.get_chemical_symbols())
    if "type" not in atoms.arrays:
        names = tuple(dict.fromkeys(symbols.tolist()))
        return names, np.array([names.index(s) for s in symbols], dtype=int)
    raw = np.asarray(atoms.arrays["type"])
    if not np.issubdtype(raw.dtype, np.integer) or (raw.size and raw.min() < 0):
        raise UserError("per-atom array 'type' must hold non-negative integers")
    present, types = np.unique(raw, return_inverse=True)
    count = len(present)
    given = _given_names(atoms.info.get("species_names"))
    if len(given) == count and np.array_equal(present, np.arange(count)):
        return tuple(given), types
    per_type = [np.unique(symbols[types == t]) for t in range(count)]
    if all(p.size == 1 for p in per_type) and len({p[0] for p in per_type}) == count:
        return tuple(str(p[0]) for p in per_type), types
    return tuple(f"T{t}" for t in present), types


def generate(recipe: Recipe) -> ase.Atoms:
    """ASE atoms (symbols 'X', a per-atom ``type``) from a lattice or random positions in a box."""
    if "lattice" in recipe:
        lat = recipe["lattice"]
        # ase.build (and through it SciPy's sparse graphs) takes most of a second to import; only
        # lattices need it.
        from ase.build import bulk

        atoms = bulk("X", lat["kind"], a=lat["a"], cubic=True).repeat(lat["repeat"])
        sites = atoms.get_positions()
        vacancies = sorted(set(lat["vacancies"]))  # site indices, checked by resolve()
        del atoms[vacancies]
        atoms.arrays["type"] = np.zeros(len(atoms), dtype=int)
        atoms.info["species_names"] = lat["symbol"]
        if vacancies:
            atoms.info["defect_position"] = sites[vacancies[0]]
        return atoms
    d, n = recipe["dimension"], recipe["n_particles"]
    names = tuple(recipe["species"])
    counts = species_counts([recipe["species"][s]["fraction"] for s in names], n)
    if any(c == 0 for c in counts):
        raise UserError(f"species {names[counts.index(0)]!r} gets no particle out of {n}; raise n_particles")
    types = np.repeat(np.arange(len(names)), counts)
    if "side" in recipe["box"]:
        box = np.broadcast_to(np.asarray(recipe["box"]["side"], dtype=np.float64), (d,)).copy()
    else:
        diameters = []
        for s in names:
            if "diameter" not in recipe["species"][s]:
                raise UserError(f"box.packing_fraction needs species.{s}.diameter (or give box.side)")
            diameters.append(recipe["species"][s]["diameter"])
        occupied = sum(c * particle_volume(dia, d) for c, dia in zip(counts, diameters, strict=True))
        box = np.full(d, (occupied / recipe["box"]["packing_fraction"]) ** (1.0 / d))
    positions = np.asarray(_uniform(recipe["seed"], (n, d))) * box
    xyz, cell = np.zeros((n, 3)), np.zeros(3)
    xyz[:, :d], cell[:d] = positions, box
    atoms = ase.Atoms(["X"] * n, positions=xyz, cell=np.diag(cell), pbc=[True] * d + [False] * (3 - d))
    atoms.arrays["type"] = types
    atoms.info["species_names"] = ",".join(names)
    return atoms


def geometry(atoms: ase.Atoms) -> tuple[int, np.ndarray, np.ndarray, str]:
    """Dimension, cell (d × d), pbc (d,) and space kind of ASE atoms.

    The space kind is ``periodic`` (orthorhombic cell), ``periodic_general`` (triclinic) or
    ``free`` (no periodicity; the cell is then zeros).
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    z = atoms.positions[:, 2]
    planar = pbc[0] and pbc[1] and not pbc[2] and np.ptp(z) == 0 and not np.any(cell[2])
    if planar:
        d, cell, pbc = 2, cell[:2, :2], pbc[:2]
    elif pbc.all() or not pbc.any():
        d = 3
    else:
        raise UserError(
            f"mixed periodicity (pbc = {pbc.tolist()}) is not supported: use a fully periodic cell, "
            "a free cluster, or a 2-D system in the plane z = 0 periodic along x and y"
        )
    if not pbc.any():
        return d, np.zeros((d, d)), pbc, "free"
    if abs(np.linalg.det(cell)) < 1e-12:
        raise UserError("the periodic cell has zero volume")
    orthorhombic = np.allclose(cell, np.diag(np.diag(cell))) and np.all(np.diag(cell) > 0)
    return d, cell, pbc, "periodic" if orthorhombic else "periodic_general"


@functools.partial(jax.jit, static_argnums=1)
def _uniform(seed, shape):
    """Uniform numbers in [0, 1) from ``jax.random.PRNGKey(seed)``: compiled once per shape, where
    eager calls would dispatch (and, from the compilation cache, trace and lower) about ten
    operations one by one; the numbers are the same bits."""
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, dtype=jnp.float64)
