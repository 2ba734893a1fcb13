"""A particle system built from a resolved recipe: positions, space, species, energy(x, θ).

:func:`load_system` is the entry point: recipe name or path (or a structure file) → overrides →
defaults and checks → :class:`System`. Positions come from a structure file (any format
``ase.io.read`` reads), a lattice, or uniform random positions in a box. The space follows the
cell and periodicity: an orthorhombic periodic cell → ``space.periodic``, a triclinic one →
``space.periodic_general`` (Cartesian coordinates), no periodicity → ``space.free``. A system
knows nothing about files it writes or the command line.

The cell is fixed when the system is built; derivatives are taken at that fixed cell.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import ase
import ase.build
import ase.io
import ase.io.formats
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from mdsens.errors import READ_ERRORS, UserError
from mdsens.implicit import NullSpace
from mdsens.neighbors import PairList, build_pair_list, overflowed, use_pair_list
from mdsens.potentials import (
    PAIR,
    POTENTIALS,
    EnergyFn,
    Potential,
    build_energy,
    build_pair_energy,
    metric_from,
    pair_tables,
)
from mdsens.recipe import Recipe, apply_overrides, load_recipe, resolve


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
            them or θ reaches beyond its cutoff: see :mod:`mdsens.neighbors`).
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
        """The (S, S) pair value of every parameter, after mixing and overrides."""
        params = self.params if params is None else params
        return pair_tables(self.potential, params, self.overridden, len(self.species))

    @property
    def zero_modes(self) -> list[str]:
        """Names of the rigid motions the energy is invariant under (removed from derivatives)."""
        axes = "xyz"[: self.dimension]
        modes = [f"translation.{a}" for a in axes]
        if self.space_kind == "free":
            modes += ["rotation.z"] if self.dimension == 2 else [f"rotation.{a}" for a in axes]
        return modes

    def _contact_graph(self, x, params):
        """(i, j, touching): candidate pairs and whether each is closer than its contact distance.

        All pairs as an (N, N) grid without a neighbour list (the diagonal is never touching),
        the listed pairs (padding never touching) with one."""
        reach = self.pair_values(params)[self.potential.contact]
        metric = metric_from(self.displacement)
        types = jnp.asarray(self.types)
        if self.pair_list is None:
            n = x.shape[0]
            index = jnp.arange(n)
            i, j = jnp.broadcast_to(index[:, None], (n, n)), jnp.broadcast_to(index[None, :], (n, n))
            distances = jax.vmap(jax.vmap(metric, (None, 0)), (0, None))(x, x)
            return i, j, (distances < reach[types[i], types[j]]) & (i != j)
        i, j = self.pair_list.at(x).idx
        valid = i < x.shape[0]
        distances = jax.vmap(metric)(x[i], x[j])
        return i, j, valid & (distances < reach[types[i], types[j]])

    @cached_property
    def _contact_graph_jit(self):
        return jax.jit(self._contact_graph)

    def contact_numbers(self, x, params) -> jax.Array:
        """(N,) number of contacts of every particle (pairs closer than their contact distance);
        all 0 for potentials without contacts (see :attr:`Potential.contact`)."""
        if self.potential.contact is None:
            return jnp.zeros(x.shape[0], dtype=int)
        return self._contact_counts(self._contact_graph(x, params), jnp.ones(x.shape[0], dtype=bool))

    def _contact_counts(self, graph, active):
        """Contacts of every particle with the ``active`` particles."""
        i, j, touching = graph
        n = active.shape[0]
        if self.pair_list is None:
            return jnp.sum(touching & active[None, :], axis=1)
        ends = jnp.concatenate([i, j])
        both = jnp.concatenate([touching & active[j], touching & active[i]]).astype(int)
        return jax.ops.segment_sum(both, ends, num_segments=n + 1)[:n]

    def contact_changes(self, x_a, params_a, x_b, params_b) -> np.ndarray:
        """(N,) mask of particles whose set of contacts differs between two states."""
        changed = np.zeros(self.n_particles, dtype=bool)
        if self.potential.contact is None:
            return changed
        sets = []
        for x, params in ((x_a, params_a), (x_b, params_b)):
            i, j, touching = (np.asarray(a) for a in self._contact_graph_jit(jnp.asarray(x), params))
            pairs = np.stack([np.minimum(i, j)[touching], np.maximum(i, j)[touching]], axis=1)
            sets.append(set(map(tuple, pairs.tolist())))
        for a, b in sets[0] ^ sets[1]:
            changed[[a, b]] = True
        return changed

    def rattlers(self, x, params) -> jax.Array:
        """(N,) mask of rattlers: particles left with fewer than d + 1 contacts after removing,
        repeatedly, every particle that has fewer (their positions are not determined)."""
        if self.potential.contact is None:
            return jnp.zeros(x.shape[0], dtype=bool)
        need = self.dimension + 1
        graph = self._contact_graph(x, params)

        def step(carry):
            active, _ = carry
            kept = active & (self._contact_counts(graph, active) >= need)
            return kept, jnp.any(kept != active)

        active, _ = jax.lax.while_loop(lambda c: c[1], step, (jnp.ones(x.shape[0], dtype=bool), True))
        return ~active

    def nullspace(self, x, params) -> NullSpace:
        """The Hessian's zero modes at ``x``, removed from every derivative.

        Rigid translations (and rotations about the centroid in free space) of the particles that
        are not rattlers, and every degree of freedom of the rattlers. Fixed shapes under ``jit``.
        """
        n, d = x.shape
        rattler = self.rattlers(x, params)
        keep = (~rattler).astype(x.dtype)[:, None]
        vectors = [jnp.zeros((n, d)).at[:, a].set(1.0) * keep for a in range(d)]
        if self.space_kind == "free":
            centre = jnp.sum(x * keep, axis=0) / jnp.maximum(jnp.sum(keep), 1.0)
            r = (x - centre) * keep
            if d == 2:
                vectors.append(jnp.stack([-r[:, 1], r[:, 0]], axis=1))
            else:
                for axis in jnp.eye(3):
                    vectors.append(jnp.cross(axis, r))
        basis = jnp.stack([v.ravel() for v in vectors], axis=1)
        q, r_factor = jnp.linalg.qr(basis)
        # A rigid motion with no particle left to move (all rattlers) contributes a zero column.
        q = q * (jnp.abs(jnp.diag(r_factor)) > 1e-10)
        mask = jnp.repeat(rattler, d).astype(x.dtype)
        return NullSpace(q, mask)

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

    def covering(self, params, x=None) -> System:
        """This system, or one whose neighbour list reaches far enough for ``params`` (its
        interaction range grew beyond the list's cutoff) and has room for the pairs at ``x``
        (when given). Same shapes; new compiled functions.

        Raises:
            UserError: the larger range no longer fits the periodic cell.
        """
        if self.pair_list is None:
            return self
        reach = self.reach(params)
        box = np.diag(self.cell)
        short = reach > self.pair_list.cutoff
        full = x is not None and bool(overflowed(self.pair_list.at_jit(jnp.asarray(x))))
        if not (short or full):
            return self
        _check_minimum_image(self.space_kind, self.cell, reach)
        settings = self.recipe["neighbors"]
        cutoff = max(reach * (1 + settings["margin"]), self.pair_list.cutoff)
        if not use_pair_list({**settings, "mode": "always"}, self.n_particles, self.space_kind, box, reach):
            raise UserError(
                f"the interaction range at these parameters ({reach:.4g}) is too large for a neighbour"
                " list in this cell; build the system with these parameters and neighbors.mode = never"
            )
        sample = self.positions if x is None else np.asarray(x)
        pair_list = build_pair_list(self.displacement, box, cutoff, settings, sample)
        energy_fn = _listed_energy(
            self.potential, self.overridden, len(self.species), self.settings, pair_list, self.pair_energy_fn
        )
        return dataclasses.replace(self, pair_list=pair_list, energy_fn=energy_fn)


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
    return atoms


def _species_of(atoms: ase.Atoms) -> tuple[tuple[str, ...], np.ndarray]:
    """Species names and indices: from a per-atom ``type`` array if present, else the symbols.

    With ``type``, names come from ``info["species_names"]`` (mdsens's own files), else from the
    chemical symbols when each type has one symbol of its own, else ``T0``, ``T1``, ….
    """
    symbols = np.array(atoms.get_chemical_symbols())
    if "type" not in atoms.arrays:
        names = tuple(dict.fromkeys(symbols.tolist()))
        return names, np.array([names.index(s) for s in symbols])
    raw = np.asarray(atoms.arrays["type"])
    if not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0:
        raise UserError("per-atom array 'type' must hold non-negative integers")
    _, types = np.unique(raw, return_inverse=True)
    count = int(types.max()) + 1
    given = atoms.info.get("species_names")
    # ASE reads a comma-separated info value back as a string, or as an array if numeric.
    names = [str(v) for v in np.atleast_1d(given)] if isinstance(given, np.ndarray) else []
    if isinstance(given, str):
        names = given.split(",")
    if len(names) == count and np.array_equal(np.unique(raw), np.arange(count)):
        return tuple(names), types
    per_type = [np.unique(symbols[types == t]) for t in range(count)]
    if all(p.size == 1 for p in per_type) and len({p[0] for p in per_type}) == count:
        return tuple(str(p[0]) for p in per_type), types
    return tuple(f"T{t}" for t in np.unique(raw)), types


def _generate(recipe: Recipe) -> ase.Atoms:
    """ASE atoms (symbols 'X', a per-atom ``type``) from a lattice or random positions in a box."""
    if "lattice" in recipe:
        lat = recipe["lattice"]
        atoms = ase.build.bulk("X", lat["kind"], a=lat["a"], cubic=True).repeat(lat["repeat"])
        sites = atoms.get_positions()
        vacancies = sorted(set(lat["vacancies"]))
        if vacancies and (vacancies[0] < 0 or vacancies[-1] >= len(atoms)):
            raise UserError(f"lattice.vacancies must be site indices in [0, {len(atoms)})")
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
    key = jax.random.PRNGKey(recipe["seed"])
    positions = np.asarray(jax.random.uniform(key, (n, d), dtype=jnp.float64)) * box
    xyz, cell = np.zeros((n, 3)), np.zeros(3)
    xyz[:, :d], cell[:d] = positions, box
    atoms = ase.Atoms(["X"] * n, positions=xyz, cell=np.diag(cell), pbc=[True] * d + [False] * (3 - d))
    atoms.arrays["type"] = types
    atoms.info["species_names"] = ",".join(names)
    return atoms


def _geometry(atoms: ase.Atoms) -> tuple[int, np.ndarray, np.ndarray, str]:
    """Dimension, cell (d × d), pbc (d,) and space kind of ASE atoms."""
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
    """The parameter pytree θ and the pair-override masks, with every value accounted for."""
    n_species = len(species)
    table = recipe["species"]
    unknown = sorted(set(table) - set(species))
    if unknown:
        raise UserError(
            f"recipe has [species.{unknown[0]}], but the system's species are {', '.join(species)}"
        )
    params: dict[str, Any] = {PAIR: {}}
    overridden = {}
    for name, spec in potential.parameters.items():
        if spec.level == "species":
            values = []
            for t, s in enumerate(species):
                value = table.get(s, {}).get(name, recipe["potential"].get(name))
                if value is None and name == "diameter" and "diameter" in atoms.arrays:
                    # A per-atom diameter array (mdsens's own files) gives each species its value.
                    value = float(atoms.arrays["diameter"][np.flatnonzero(types == t)[0]])
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
    return params, overridden


def build_system(recipe: Recipe) -> System:
    """Build a :class:`System` from a recipe (resolved here if it is not already)."""
    recipe = resolve(recipe)
    if "structure" in recipe:
        recipe["structure"] = str(Path(recipe["structure"]).resolve())
        atoms = read_structure(recipe["structure"], recipe["structure_index"])
        atoms.info.pop("energy", None)
    else:
        atoms = _generate(recipe)
    d, cell, pbc, kind = _geometry(atoms)
    species, types = _species_of(atoms)
    potential = POTENTIALS[recipe["potential"]["name"]]
    params, overridden = _parameters(recipe, potential, species, types, atoms)

    positions = np.array(atoms.positions[:, :d], dtype=np.float64)
    if recipe["rattle"] > 0:
        rng = np.random.default_rng(recipe["seed"])
        positions = positions + rng.normal(scale=recipe["rattle"], size=positions.shape)
    displacement, shift = _space(kind, cell)
    settings = {k: recipe["potential"][k] for k in potential.settings}
    reach = float(potential.reach(pair_tables(potential, params, overridden, len(species)), settings))
    _check_minimum_image(kind, cell, reach)
    neighbors = recipe["neighbors"]
    pair_list, pair_energy_fn = None, None
    if use_pair_list(neighbors, len(positions), kind, np.diag(cell), reach):
        cutoff = reach * (1 + neighbors["margin"])
        pair_list = build_pair_list(displacement, np.diag(cell), cutoff, neighbors, positions)
        pair_energy_fn = build_pair_energy(potential, displacement, types, overridden, settings)
        energy_fn = _listed_energy(potential, overridden, len(species), settings, pair_list, pair_energy_fn)
    elif neighbors["mode"] == "always":
        raise UserError(
            "neighbors.mode = always needs an orthorhombic periodic cell at least three list cutoffs"
            f" ({reach * (1 + neighbors['margin']) * (1 + neighbors['skin']):.3g}) wide; use"
            " neighbors.mode = auto"
        )
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
    _check_finite_energy(system)
    return system


def _listed_energy(potential, overridden, n_species, settings, pair_list: PairList, pair_energy_fn):
    """E(x, θ) with its pairs found at ``x``: NaN, not a silently wrong number, when the list
    overflows or θ makes the interaction range exceed the list's cutoff."""

    def energy_fn(x, params):
        neighbors = pair_list.at(x)
        reach = potential.reach(pair_tables(potential, params, overridden, n_species), settings)
        bad = (neighbors.did_buffer_overflow != 0) | (jax.lax.stop_gradient(reach) > pair_list.cutoff)
        return jnp.where(bad, jnp.nan, pair_energy_fn(x, params, neighbors.idx))

    return energy_fn


def _check_minimum_image(kind: str, cell: np.ndarray, reach: float) -> None:
    """Pairs are taken at their nearest periodic image only, which misses interactions when the
    range exceeds half the cell's smallest width: refuse such a system rather than mis-count."""
    if kind == "free":
        return
    widths = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    if reach > widths.min() / 2:
        raise UserError(
            f"the interaction range ({reach:.4g}) exceeds half the periodic cell's smallest width"
            f" ({widths.min():.4g} / 2): pairs would miss their periodic images; use a larger cell"
            " (e.g. a larger lattice.repeat or n_particles) or a shorter potential.r_cutoff"
        )


def _check_finite_energy(system: System) -> None:
    """Atoms on top of each other (or so close that the energy is not finite) are a user error
    that names the pair, raised before relaxing. Coincident atoms are caught by distance too:
    a pair function cannot tell them from a particle paired with itself."""
    x = jnp.asarray(system.positions)
    energy, forces, distance, i, j = jax.jit(_closest_pair_and_energy, static_argnums=0)(system, x)
    if np.isfinite(float(energy)) and np.all(np.isfinite(np.asarray(forces))) and float(distance) > 1e-8:
        return
    raise UserError(
        f"the energy at the initial positions is not finite: atoms {int(min(i, j))} and {int(max(i, j))} "
        f"are {float(distance):.3g} apart"
    )


def _closest_pair_and_energy(system: System, x):
    metric = metric_from(system.displacement)
    if system.pair_list is not None:
        i, j = system.pair_list.at(x).idx
        distances = jnp.where(i < x.shape[0], jax.vmap(metric)(x[i], x[j]), jnp.inf)
        k = jnp.argmin(distances)
        return system.energy_fn(x, system.params), system.force_fn(x, system.params), distances[k], i[k], j[k]
    distances = jax.vmap(jax.vmap(metric, (None, 0)), (0, None))(x, x)
    distances = jnp.where(jnp.eye(x.shape[0], dtype=bool), jnp.inf, distances)
    flat = jnp.argmin(distances)
    i, j = jnp.unravel_index(flat, distances.shape)
    return system.energy_fn(x, system.params), system.force_fn(x, system.params), distances[i, j], i, j


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
    if index is not None:
        recipe["structure_index"] = index
    if potential is not None:
        recipe = apply_overrides(recipe, [f'potential.name="{potential}"'])
    recipe = apply_overrides(recipe, overrides)
    if seed is not None:
        recipe["seed"] = seed
    return build_system(recipe)
