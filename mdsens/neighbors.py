"""Which pairs of particles interact: all of them (small systems) or a neighbour list (large ones).

Below :data:`AUTO_MIN_PARTICLES` particles mdsens sums over all N(N−1)/2 pairs: nothing to keep
up to date. From it on, in an orthorhombic periodic cell, the pairs come
from a JAX-MD cell-list neighbour list (``jax_md.partition``, ordered-sparse format: each pair
once, as two index arrays padded with N), so that memory and time per force evaluation grow as N,
not N². A recipe's ``[neighbors]`` table chooses (``mode = "auto" | "always" | "never"``).

A :class:`PairList` covers pairs closer than its ``cutoff``: the potential's interaction range
(the largest pair contact distance, or ``r_cutoff × σ`` for potentials with a cutoff) at the
recipe's parameters times ``1 + margin``, so that small parameter changes (finite differences,
sensitivities) do not leave it. A relaxation keeps one list for many steps: it includes pairs up
to ``cutoff + skin`` and is rebuilt when a particle has moved more than ``skin / 2`` since the
last build (JAX-MD's rule). A list has a fixed capacity; when a rebuild finds more pairs it sets
an overflow flag, and the caller allocates a larger one and redoes the work (it cannot be
reallocated inside ``jit``).

Free clusters and triclinic cells always use all pairs (JAX-MD's cell list needs an orthorhombic
box), and so does any cell not wider than three times ``cutoff + skin`` along every axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.jaxmd import partition

AUTO_MIN_PARTICLES = 64
"""``mode = "auto"`` uses a neighbour list from this many particles on. Measured on two CPU
cores (``benchmarks/neighbors.py``): a force evaluation over all pairs costs 4× the list's at
N = 64 and 100× at N = 1024."""
MODES = ("auto", "always", "never")
DEFAULTS = {"mode": "auto", "skin": 0.3, "margin": 0.1, "capacity": 1.5}
"""``margin`` is a fraction of the interaction range, ``skin`` a fraction of the list's cutoff;
``capacity`` multiplies the number of pairs found when a list is allocated."""


def overflowed(neighbors: partition.NeighborList) -> jax.Array:
    """Whether a list (or the cell list behind it) ran out of room since it was allocated."""
    return neighbors.did_buffer_overflow != 0


@dataclass(frozen=True)
class PairList:
    """Neighbour-list functions for one system shape and cutoff.

    Attributes:
        cutoff: pairs closer than this are always in the list.
        skin: extra distance kept in a relaxation's list, so it survives moves below ``skin / 2``.
        capacity: allocation headroom (multiplies the number of pairs found).
        n_particles: N (the padding index of unused slots).
        box: the cell's side lengths; positions are wrapped into it, where a cell list needs them.
    """

    cutoff: float
    skin: float
    capacity: float
    n_particles: int
    box: np.ndarray
    _skinned: partition.NeighborListFns
    _exact: partition.NeighborListFns
    _template: partition.NeighborList

    @cached_property
    def at_jit(self):
        """:meth:`at`, compiled (for checks outside ``jit``)."""
        return jax.jit(self.at)

    def allocate(self, x) -> partition.NeighborList:
        """A list with skin for a relaxation starting at ``x`` (not jittable: sizes the buffers)."""
        return self._skinned.allocate(self._wrap(x))

    def _wrap(self, x):
        return jnp.mod(jnp.asarray(x), self.box)

    def grow(self, x, neighbors: partition.NeighborList) -> partition.NeighborList:
        """A list for ``x`` with room for at least 1.5 × the pairs ``neighbors`` could hold
        (after an overflow; not jittable)."""
        extra = int(np.ceil(0.5 * neighbors.max_occupancy / self.n_particles))
        return self._skinned.allocate(self._wrap(x), extra_capacity=extra)

    def update(self, x, neighbors: partition.NeighborList) -> partition.NeighborList:
        """The list at ``x``: the same one if no particle moved by ``skin / 2``, else rebuilt."""
        return self._skinned.update(self._wrap(x), neighbors)

    def at(self, x) -> partition.NeighborList:
        """A list built from scratch at ``x`` with no skin (jittable; capacity fixed at build).

        Used by the self-contained energy E(x, θ): within a linearisation (Hessian-vector
        products at a relaxed state) it is built once.
        """
        x = self._wrap(jax.lax.stop_gradient(x))
        return self._exact.update(x, replace(self._template, reference_position=x))


def build_pair_list(displacement, box: np.ndarray, cutoff: float, settings: dict, x0) -> PairList:
    """Neighbour-list functions for an orthorhombic periodic ``box`` (side lengths) and ``cutoff``."""
    skin = settings["skin"] * cutoff
    kwargs = dict(
        format=partition.OrderedSparse,
        capacity_multiplier=settings["capacity"],
        fractional_coordinates=False,
    )
    skinned = partition.neighbor_list(displacement, jnp.asarray(box), cutoff, dr_threshold=skin, **kwargs)
    exact = partition.neighbor_list(displacement, jnp.asarray(box), cutoff, dr_threshold=0.0, **kwargs)
    box = np.asarray(box, dtype=np.float64)
    template = exact.allocate(jnp.mod(jnp.asarray(x0), box))
    return PairList(cutoff, skin, settings["capacity"], int(np.shape(x0)[0]), box, skinned, exact, template)


def use_pair_list(settings: dict, n_particles: int, space_kind: str, box: np.ndarray, reach: float) -> bool:
    """Whether a system whose interaction range is ``reach`` gets a neighbour list (see the
    module docstring)."""
    if settings["mode"] == "never" or (settings["mode"] == "auto" and n_particles < AUTO_MIN_PARTICLES):
        return False
    return possible_pair_list(space_kind, box, reach * (1 + settings["margin"]) * (1 + settings["skin"]))


def possible_pair_list(space_kind: str, box: np.ndarray, reach: float) -> bool:
    """A cell list needs an orthorhombic periodic cell wider than three ``reach`` (the list's
    cutoff plus skin) along every axis."""
    return space_kind == "periodic" and bool(np.isfinite(reach)) and bool(np.all(box > 3 * reach))
