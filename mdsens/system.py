"""A particle system built from a resolved recipe: positions, box, species, energy(x, θ).

:func:`load_system` is the entry point: recipe name or path → overrides → defaults and checks →
:class:`System`. The system holds the initial positions, the periodic space, the parameter
pytree θ and ``energy_fn(x, params)``; it knows nothing about files or the command line.

The box is fixed when the system is built (from the packing fraction at the recipe's
diameters); sensitivities with respect to diameters are taken at that fixed box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from mdsens.errors import UserError
from mdsens.potentials import POTENTIALS, EnergyFn
from mdsens.recipe import Recipe, apply_overrides, load_recipe, resolve


@dataclass(frozen=True, eq=False)
class System:
    """Everything needed to relax a system and differentiate its relaxed state.

    Attributes:
        recipe: the resolved recipe (complete: it rebuilds this system exactly).
        positions: initial positions, shape (N, d), float64.
        types: species index of every particle, shape (N,).
        species: species names; ``types`` indexes this tuple.
        box: side lengths of the periodic box, shape (d,).
        params: the parameter pytree θ: ``diameter`` (one per species) and the potential's
            global parameters (e.g. ``epsilon``, ``alpha``), float64 arrays.
        energy_fn: ``energy_fn(x, params) -> E``, differentiable in both arguments.
        displacement, shift: JAX-MD periodic space functions.
    """

    recipe: Recipe
    positions: np.ndarray
    types: np.ndarray
    species: tuple[str, ...]
    box: np.ndarray
    params: dict[str, jax.Array]
    energy_fn: EnergyFn = field(repr=False)
    displacement: Any = field(repr=False)
    shift: Any = field(repr=False)

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.positions.shape[1])

    @property
    def name(self) -> str:
        return self.recipe["name"]

    def force_fn(self, x, params):
        """-∇ₓE(x, params)."""
        return -jax.grad(self.energy_fn)(x, params)

    def translation_basis(self) -> jax.Array:
        """Orthonormal basis of rigid translations, shape (N·d, d): the periodic box's zero modes."""
        n, d = self.n_particles, self.dimension
        return jnp.kron(jnp.ones((n, 1)), jnp.eye(d)) / math.sqrt(n)

    def nullspace(self, x, params) -> jax.Array:
        """Null-space basis of the Hessian at ``x`` for the implicit solve (translations)."""
        del x, params
        return self.translation_basis()

    def with_positions(self, positions) -> System:
        """The same system started from other positions (used to re-relax warm-started)."""
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != self.positions.shape:
            raise UserError(
                f"positions of shape {positions.shape} do not fit a system of shape {self.positions.shape}"
            )
        return System(**{**self.__dict__, "positions": positions})


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


def build_system(recipe: Recipe) -> System:
    """Build a :class:`System` from a recipe (resolved here if it is not already)."""
    recipe = resolve(recipe)
    d, n = recipe["dimension"], recipe["n_particles"]
    names = tuple(recipe["species"])
    fractions = [recipe["species"][s]["fraction"] for s in names]
    diameters = [recipe["species"][s]["diameter"] for s in names]
    counts = species_counts(fractions, n)
    if any(c == 0 for c in counts):
        empty = names[counts.index(0)]
        raise UserError(f"species {empty!r} gets no particle out of {n}; raise n_particles")
    types = np.repeat(np.arange(len(names)), counts)

    if "side" in recipe["box"]:
        box = np.broadcast_to(np.asarray(recipe["box"]["side"], dtype=np.float64), (d,)).copy()
    else:
        occupied = sum(c * particle_volume(dia, d) for c, dia in zip(counts, diameters, strict=True))
        box = np.full(d, (occupied / recipe["box"]["packing_fraction"]) ** (1.0 / d))

    key = jax.random.PRNGKey(recipe["seed"])
    positions = np.asarray(jax.random.uniform(key, (n, d), dtype=jnp.float64)) * box

    potential = POTENTIALS[recipe["potential"]["name"]]
    params = {"diameter": jnp.asarray(diameters, dtype=jnp.float64)}
    for key_ in potential.defaults:
        params[key_] = jnp.asarray(recipe["potential"][key_], dtype=jnp.float64)

    displacement, shift = space.periodic(jnp.asarray(box))
    return System(
        recipe=recipe,
        positions=positions,
        types=types,
        species=names,
        box=box,
        params=params,
        energy_fn=potential.build(displacement, types),
        displacement=displacement,
        shift=shift,
    )


def load_system(
    system: str | Path = "binary-packing",
    overrides: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
) -> System:
    """Load a recipe by name or path, apply ``KEY=VALUE`` overrides and a seed, build the system.

    Raises:
        UserError: unknown system, unreadable recipe, bad override or invalid value.
    """
    recipe = apply_overrides(load_recipe(system), overrides)
    if seed is not None:
        recipe["seed"] = seed
    if not recipe.get("name"):
        recipe["name"] = Path(str(system)).stem
    return build_system(recipe)
