"""Pair potentials with named, differentiable parameters.

A potential is one :class:`Potential` entry in :data:`POTENTIALS`: its global parameters with
their defaults, and a builder that turns a displacement function and the species of every
particle into ``energy_fn(x, params)``. Parameters travel in a pytree (a dict of arrays) that is
passed at call time, never baked into the function, so the same compiled energy serves every
parameter value and ``jax.grad`` with respect to ``params`` is natural.

Species diameters are a parameter of every potential (``params["diameter"]``, one entry per
species): for soft spheres the contact distance of a pair is the additive mixture
σ_ij = (d_i + d_j) / 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax_md import energy, smap, space

EnergyFn = Callable[[Any, dict], Any]


@dataclass(frozen=True)
class Potential:
    """A registry entry.

    Attributes:
        name: the name recipes use (``potential.name``).
        defaults: global parameters and their default values; each is a scalar parameter that
            ``--param`` can differentiate.
        build: ``build(displacement_fn, types) -> energy_fn(x, params)``.
        doc: one line for ``--help`` and the docs.
    """

    name: str
    defaults: dict[str, float]
    build: Callable[[Callable, np.ndarray], EnergyFn]
    doc: str


def additive_contact_distance(diameter, types):
    """σ_ij = (d_{t_i} + d_{t_j}) / 2 as an N × N matrix, from per-species diameters."""
    per_particle = diameter[types]
    return 0.5 * (per_particle[:, None] + per_particle[None, :])


def _soft_sphere(displacement, types: np.ndarray) -> EnergyFn:
    metric = space.canonicalize_displacement_or_metric(displacement)
    # ignore_unused_parameters=True would make smap.pair drop every call-time parameter that was
    # not also given when it was built, silently falling back to sigma = 1.
    pair = smap.pair(energy.soft_sphere, metric)
    types = jnp.asarray(types)

    def energy_fn(x, params):
        sigma = additive_contact_distance(params["diameter"], types)
        return pair(x, sigma=sigma, epsilon=params["epsilon"], alpha=params["alpha"])

    return energy_fn


POTENTIALS: dict[str, Potential] = {
    "soft_sphere": Potential(
        name="soft_sphere",
        defaults={"epsilon": 1.0, "alpha": 2.0},
        build=_soft_sphere,
        doc="U(r) = ε/α (1 - r/σ_ij)^α for r < σ_ij = (d_i + d_j)/2 (α = 2: harmonic)",
    ),
}
