"""A particle system built from a resolved recipe: positions, space, species, parameters, E(x, θ).

:func:`load_system` is the entry point: recipe name or path (or a structure file) → overrides →
defaults and checks → :class:`System`. Positions and species come from :mod:`mdsens.structures`
(a structure file, a lattice, or uniform random positions in a box). The space follows the
cell and periodicity: an orthorhombic periodic cell → ``space.periodic``, a triclinic one →
``space.periodic_general`` (Cartesian coordinates), no periodicity → ``space.free``. A system
knows nothing about files it writes or the command line. Its methods on relaxed states delegate
to :mod:`mdsens.contacts` (contacts, rattlers), :mod:`mdsens.zero_modes` (the null space) and
:mod:`mdsens.list_coverage` (a neighbour list for other parameters).

The cell is fixed when the system is built; derivatives are taken at that fixed cell."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase
import jax
import jax.numpy as jnp
import numpy as np

from mdsens import contacts, list_coverage, zero_modes
from mdsens import validate as check
from mdsens.errors import UserError
from mdsens.implicit import NullSpace
from mdsens.jaxmd import space
from mdsens.list_coverage import check_minimum_image, listed_energy
from mdsens.neighbors import PairList, build_pair_list, use_pair_list
from mdsens.potentials import (
    ATOM,
    PAIR,
    POTENTIALS,
    EnergyFn,
    Potential,
    bounding_tables,
    build_energy,
    build_pair_energy,
    metric_from,
)
from mdsens.recipe import Recipe, apply_overrides, load_recipe, resolve, scaled_time_steps
from mdsens.structures import generate, geometry, read_structure, species_of


@dataclass(frozen=True, eq=False)
class System:
    """Everything needed to relax a system and differentiate its relaxed state.

    Attributes:
        recipe: the resolved recipe (complete: it rebuilds this system exactly).
        positions: initial positions, shape (N, d), float64, Cartesian.
        types: species index of every particle, shape (N,).
        species: species names; ``types`` indexes this tuple.
        cell: the cell, shape (d, d), one lattice vector per row (ASE's convention); zeros for
            a free system.
        pbc: periodicity along each of the d directions.
        space_kind: ``periodic``, ``periodic_general`` or ``free``.
        potential: the potential's registry entry.
        params: the parameter pytree θ (see :mod:`mdsens.potentials`).
        overridden: per parameter, the (S, S) mask of explicitly set pair values.
        atoms: ASE atoms of the input (symbols, tags, cell, info), for writing results that
            line up with the user's file.
        energy_fn: ``energy_fn(x, params) -> E``, differentiable in both arguments; with a
            neighbour list it finds the pairs at ``x`` itself (NaN where the list cannot hold
            them or θ reaches beyond its cutoff: see :mod:`mdsens.list_coverage`).
        displacement, shift: JAX-MD space functions.
        pair_list: the neighbour-list functions, or ``None`` where all pairs are summed.
        pair_energy_fn: ``pair_energy_fn(x, params, pairs) -> E`` over a given (2, M) pair list
            (with a neighbour list only): what a relaxation loop calls with a list it keeps.
    """

    recipe: Recipe
    positions: np.ndarray
    types: np.ndarray
    species: tuple[str, ...]
    cell: np.ndarray
    pbc: np.ndarray
    space_kind: str
    potential: Potential
    params: dict[str, Any]
    overridden: dict[str, np.ndarray] = field(repr=False)
    atoms: ase.Atoms = field(repr=False)
    energy_fn: EnergyFn = field(repr=False)
    displacement: Any = field(repr=False)
    shift: Any = field(repr=False)
    pair_list: PairList | None = field(default=None, repr=False)
    pair_energy_fn: Callable | None = field(default=None, repr=False)

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.positions.shape[1])

    @property
    def name(self) -> str:
        return self.recipe["name"]

    @property
    def box(self) -> np.ndarray:
        """Side lengths of an orthorhombic cell, shape (d,) (the cell's diagonal)."""
        return np.diag(self.cell).copy()

    def force_fn(self, x, params):
        """-∇ₓE(x, params)."""
        return -jax.grad(self.energy_fn)(x, params)

    def pair_values(self, params=None) -> dict[str, jax.Array]:
        """The (S, S) pair value of every parameter, after mixing and overrides; with per-particle
        offsets in ``params``, the largest value any pair of particles of those species has
        (see :func:`mdsens.potentials.bounding_tables`)."""
        params = self.params if params is None else params
        return bounding_tables(self.potential, params, self.overridden, len(self.species))

    @property
    def zero_modes(self) -> list[str]:
        """Names of the rigid motions the energy is invariant under (removed from derivatives)."""
        return zero_modes.rigid_motion_names(self)

    def contact_numbers(self, x, params) -> jax.Array:
        """(N,) number of contacts of every particle (see :mod:`mdsens.contacts`)."""
        return contacts.contact_numbers(self, x, params)

    def contact_changes(self, x_a, params_a, x_b, params_b) -> np.ndarray:
        """(N,) mask of particles whose set of contacts differs between two states."""
        return contacts.contact_changes(self, x_a, params_a, x_b, params_b)

    def rattlers(self, x, params) -> jax.Array:
        """(N,) mask of rattlers (see :func:`mdsens.contacts.rattlers`)."""
        return contacts.rattlers(self, x, params)

    def nullspace(self, x, params) -> NullSpace:
        """The Hessian's zero modes at ``x`` (see :func:`mdsens.zero_modes.nullspace`)."""
        return zero_modes.nullspace(self, x, params)

    def with_positions(self, positions) -> System:
        """The same system started from other positions (used to re-relax warm-started)."""
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != self.positions.shape:
            raise UserError(
                f"positions of shape {positions.shape} do not fit a system of shape {self.positions.shape}"
            )
        return dataclasses.replace(self, positions=positions)

    def reach(self, params=None) -> float:
        """The interaction range at ``params`` (default θ): no pair interacts beyond it."""
        return float(self.potential.reach(self.pair_values(params), self.settings))

    @property
    def settings(self) -> dict:
        """The potential's fixed settings (cutoffs) from the recipe."""
        return {k: self.recipe["potential"][k] for k in self.potential.settings}

    def for_params(self, params, x=None) -> System:
        """This system, or one whose neighbour list covers the interaction range at ``params``
        and has room for the pairs at ``x`` (see :func:`mdsens.list_coverage.for_params`)."""
        return list_coverage.for_params(self, params, x)


def _space(kind: str, cell: np.ndarray):
    if kind == "free":
        return space.free()
    if kind == "periodic":
        return space.periodic(jnp.asarray(np.diag(cell)))
    # JAX-MD's box maps fractional to Cartesian coordinates as columns: the transpose of ASE's.
    return space.periodic_general(jnp.asarray(cell.T), fractional_coordinates=False)


def _parameters(
    recipe: Recipe, potential: Potential, species: tuple[str, ...], types: np.ndarray, atoms: ase.Atoms
):
    """The parameter pytree θ and the pair-override masks, with every value accounted for.

    A structure file's per-atom ``diameter`` array gives the diameters the recipe does not set:
    one per species where they agree, and otherwise the species' mean plus a per-particle offset
    for each atom (θ["atom"]["diameter"], see :mod:`mdsens.potentials`): a polydisperse system.
    """
    n_species = len(species)
    table = recipe["species"]
    unknown = sorted(set(table) - set(species))
    if unknown:
        raise UserError(
            f"recipe has [species.{unknown[0]}], but the system's species are {', '.join(species)}"
        )
    params: dict[str, Any] = {PAIR: {}}
    overridden = {}
    offsets = None
    for name, spec in potential.parameters.items():
        if spec.level == "species":
            values = []
            for t, s in enumerate(species):
                value = table.get(s, {}).get(name, recipe["potential"].get(name))
                if value is None and name == "diameter" and "diameter" in atoms.arrays:
                    members = types == t
                    value, deviations = _file_diameters(atoms, members, s)
                    if np.any(deviations != 0):
                        offsets = np.zeros(len(types)) if offsets is None else offsets
                        offsets[members] = deviations
                if value is None:
                    raise UserError(
                        f"species {s} has no {name}: set it with --set species.{s}.{name}=VALUE "
                        f"(or --set potential.{name}=VALUE for every species)"
                    )
                values.append(value)
            params[name] = jnp.asarray(values, dtype=jnp.float64)
        else:
            params[name] = jnp.asarray(recipe["potential"][name], dtype=jnp.float64)
        params[PAIR][name] = np.zeros((n_species, n_species))
        overridden[name] = np.zeros((n_species, n_species), dtype=bool)
    for pair, values in recipe["pairs"].items():
        a, b = pair.split("-")
        for s in (a, b):
            if s not in species:
                raise UserError(f"[pairs.{pair}] names species {s!r}, not one of {', '.join(species)}")
        i, j = species.index(a), species.index(b)
        for name, value in values.items():
            for u, v in ((i, j), (j, i)):
                params[PAIR][name][u, v] = value
                overridden[name][u, v] = True
    params[PAIR] = {k: jnp.asarray(v) for k, v in params[PAIR].items()}
    if offsets is not None:
        params[ATOM] = {"diameter": jnp.asarray(offsets, dtype=jnp.float64)}
    return params, overridden


def _file_diameters(atoms: ase.Atoms, members: np.ndarray, species: str) -> tuple[float, np.ndarray]:
    """The diameter of ``species`` from a structure file's per-atom ``diameter`` array (mdsens's
    own files have one), and each member atom's deviation from it: the species' mean diameter and
    zeros where all agree, per-particle offsets where they vary."""
    values = np.asarray(atoms.arrays["diameter"])[members]
    if not np.issubdtype(values.dtype, np.number):
        raise UserError(f"the structure's per-atom 'diameter' array holds {values.dtype}, not numbers")
    for value in (values.min(), values.max()):
        if not check.SMALLEST <= value <= check.LARGEST:  # NaN fails too
            raise UserError(
                f"a per-atom diameter of species {species} in the structure is {float(value)!r}: a"
                f" diameter must be a number in [{check.SMALLEST:g}, {check.LARGEST:g}]"
            )
    if np.all(values == values[0]):
        return float(values[0]), np.zeros(values.shape)
    mean = float(np.mean(values))
    return mean, values.astype(np.float64) - mean


def build_system(recipe: Recipe) -> System:
    """Build a :class:`System` from a recipe (resolved here if it is not already)."""
    given = set(recipe.get("minimizer", {})) if isinstance(recipe.get("minimizer"), dict) else set()
    recipe = resolve(recipe)
    if "structure" in recipe:
        recipe["structure"] = str(Path(recipe["structure"]).resolve())
        atoms = read_structure(recipe["structure"], recipe["structure_index"])
        atoms.info.pop("energy", None)
    else:
        atoms = generate(recipe)
    d, cell, pbc, kind = geometry(atoms)
    species, types = species_of(atoms)
    potential = POTENTIALS[recipe["potential"]["name"]]
    params, overridden = _parameters(recipe, potential, species, types, atoms)

    positions = np.array(atoms.positions[:, :d], dtype=np.float64)
    if recipe["rattle"] > 0:
        rng = np.random.default_rng(recipe["seed"])
        positions = positions + rng.normal(scale=recipe["rattle"], size=positions.shape)
    displacement, shift = _space(kind, cell)
    settings = {k: recipe["potential"][k] for k in potential.settings}
    tables = bounding_tables(potential, params, overridden, len(species))
    reach = float(potential.reach(tables, settings))
    if potential.stiffness is not None:
        omega = math.sqrt(float(np.max(potential.stiffness(tables))))
        recipe["minimizer"] = scaled_time_steps(recipe["minimizer"], given, omega)
    check_minimum_image(kind, cell, reach)
    neighbors = recipe["neighbors"]
    pair_list, pair_energy_fn = None, None
    if use_pair_list(neighbors, positions, kind, np.diag(cell), reach):
        cutoff = reach * (1 + neighbors["margin"])
        pair_list = build_pair_list(displacement, np.diag(cell), cutoff, neighbors, positions)
        pair_energy_fn = build_pair_energy(potential, displacement, types, overridden, settings)
        energy_fn = listed_energy(potential, overridden, len(species), settings, pair_list, pair_energy_fn)
    else:
        energy_fn = build_energy(potential, metric_from(displacement), types, overridden, settings)
    system = System(
        recipe=recipe,
        positions=positions,
        types=types,
        species=species,
        cell=cell,
        pbc=pbc,
        space_kind=kind,
        potential=potential,
        params=params,
        overridden=overridden,
        atoms=atoms,
        energy_fn=energy_fn,
        displacement=displacement,
        shift=shift,
        pair_list=pair_list,
        pair_energy_fn=pair_energy_fn,
    )
    _check_separated(system)
    return system


def _check_separated(system: System) -> None:
    """Atoms on top of each other are a user error that names the pair, raised before relaxing:
    there the energy is not finite (r⁻¹² at r = 0) or its forces have no direction. Closer than
    :data:`COINCIDENT` counts as on top (a pair function cannot tell such atoms from a particle
    paired with itself); farther apart, every potential's energy and forces are finite.

    In NumPy over the pairs the neighbour list holds (it was sized at these positions), else over
    all pairs: JAX would compile this check again for every system, however alike.
    """
    x = system.positions
    if system.pair_list is not None:
        i, j = system.pair_list.at_positions_pairs()
        if i.size == 0:
            return
        r = np.linalg.norm(_minimum_image(system, x[i] - x[j]), axis=-1)
        k = int(np.argmin(r))
        i, j, distance = int(i[k]), int(j[k]), float(r[k])
    else:
        i, j, distance = _closest_of_all_pairs(system, x)
    if distance > COINCIDENT:
        return
    raise UserError(
        f"the energy at the initial positions is not finite: atoms {min(i, j)} and {max(i, j)} "
        f"are {distance:.3g} apart"
    )


COINCIDENT = 1e-8
"""Atoms closer than this (in length units) are on top of each other: see :func:`_check_separated`."""


def _minimum_image(system: System, d: np.ndarray) -> np.ndarray:
    """Displacements ``d`` (…, d) to their nearest periodic image, as the system's metric takes them."""
    if system.space_kind == "free":
        return d
    if system.space_kind == "periodic":
        box = np.diag(system.cell)
        return d - box * np.round(d / box)
    fractional = d @ np.linalg.inv(system.cell)  # ASE's cell: rows are the lattice vectors
    return (fractional - np.round(fractional)) @ system.cell


def _closest_of_all_pairs(system: System, x: np.ndarray) -> tuple[int, int, float]:
    """The closest pair i < j and its distance, over all pairs in row blocks (bounded memory)."""
    n = x.shape[0]
    best = (0, 1, np.inf)
    block = max(1, 2**22 // max(n, 1))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        r = np.linalg.norm(_minimum_image(system, x[rows, None, :] - x[None, :, :]), axis=-1)
        r[rows[:, None] >= np.arange(n)[None, :]] = np.inf
        k = np.unravel_index(int(np.argmin(r)), r.shape)
        if r[k] < best[2]:
            best = (int(rows[k[0]]), int(k[1]), float(r[k]))
    return best


def load_system(
    system: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
    structure: str | Path | None = None,
    index: int | None = None,
    potential: str | None = None,
) -> System:
    """Load a recipe, apply a structure file, potential, ``KEY=VALUE`` overrides and seed; build.

    Args:
        system: shipped recipe name or path to a recipe; default ``binary-packing``, or an empty
            recipe when ``structure`` is given.
        overrides: ``KEY=VALUE`` strings with dotted keys (see :func:`mdsens.recipe.apply_overrides`).
        seed: replaces the recipe's seed.
        structure: a file ``ase.io.read`` reads; positions, cell, periodicity and species come
            from it instead of the recipe's source (``index`` picks a frame).
        potential: potential name, set before the overrides (its parameters come from them).

    Raises:
        UserError: unknown system, unreadable recipe or structure, bad override, invalid value,
            a species without parameters, or overlapping atoms.
    """
    if system is None and structure is not None:
        recipe: Recipe = {}
    else:
        system = "binary-packing" if system is None else system
        recipe = load_recipe(system)
        recipe.setdefault("name", Path(str(system)).stem)
    if structure is not None:
        for key in ("box", "lattice", "n_particles", "dimension", "structure_index"):
            recipe.pop(key, None)
        for table in recipe.get("species", {}).values():
            table.pop("fraction", None)
        recipe["structure"] = str(Path(structure).resolve())
        recipe["name"] = Path(structure).stem
        if system is not None:  # the recipe's description is of its own positions
            recipe["description"] = f"{Path(structure).name} with the settings of recipe {system}"
    if index is not None:
        recipe["structure_index"] = index
    if potential is not None:
        recipe = apply_overrides(recipe, [f'potential.name="{potential}"'])
    recipe = apply_overrides(recipe, overrides)
    if seed is not None:
        recipe["seed"] = seed
    return build_system(recipe)
