"""Contacts between particles and the rattlers they leave: who touches whom in a relaxed state.

Two particles touch when they are closer than the pair value of the potential's contact parameter
(:attr:`mdsens.potentials.Potential.contact_parameter`, the diameter of soft spheres); potentials
without one have no contacts and no rattlers. Pairs are the system's candidates
(:func:`candidate_pairs`): all of them, or its neighbour list's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.neighbors import overflowed
from mdsens.potentials import metric_from, pair_values_at

if TYPE_CHECKING:
    from mdsens.system import System


def candidate_pairs(system: System, x):
    """(i, j, valid, overflowed): every pair that may interact at ``x``, once each.

    Without a neighbour list all N(N − 1)/2 pairs i < j (``valid`` all True, ``overflowed``
    False); with one, its pairs built at ``x``, where ``valid`` is False for the padding slots and
    ``overflowed`` True when the list cannot hold the pairs at ``x``. Padding slots hold index N
    in the list: here they point at particle 0 (masked by ``valid``), so that they can be
    gathered outside ``jit`` too, where NumPy-style indexing does not clamp. Jittable.
    """
    if system.pair_list is None:
        i, j = np.triu_indices(system.n_particles, k=1)
        return jnp.asarray(i), jnp.asarray(j), jnp.ones(i.shape, dtype=bool), jnp.asarray(False)
    neighbors = system.pair_list.at(x)
    i, j = neighbors.idx
    valid = i < x.shape[0]
    return jnp.where(valid, i, 0), jnp.where(valid, j, 0), valid, overflowed(neighbors)


def contact_graph(system: System, x, params):
    """(i, j, touching): candidate pairs and whether each is closer than its contact distance.

    All pairs as an (N, N) grid without a neighbour list (the diagonal is never touching),
    the listed pairs (padding never touching) with one."""
    x = jnp.asarray(x)
    metric = metric_from(system.displacement)
    types = jnp.asarray(system.types)
    potential = system.potential

    def reach(i, j):
        return pair_values_at(potential, params, system.overridden, types, i, j)[potential.contact_parameter]

    if system.pair_list is None:
        # A grid rather than candidate_pairs: a particle's contacts are then a row sum
        # (_contact_counts), with no scatter over pairs.
        n = x.shape[0]
        index = jnp.arange(n)
        i, j = jnp.broadcast_to(index[:, None], (n, n)), jnp.broadcast_to(index[None, :], (n, n))
        distances = jax.vmap(jax.vmap(metric, (None, 0)), (0, None))(x, x)
        return i, j, (distances < reach(i, j)) & (i != j)
    i, j, valid, _ = candidate_pairs(system, x)
    distances = jax.vmap(metric)(x[i], x[j])
    return i, j, valid & (distances < reach(i, j))


# Compiled once per system (a System hashes by identity), without storing anything in it.
_contact_graph_jit = jax.jit(contact_graph, static_argnums=0)


def _contact_counts(system: System, graph, active):
    """Contacts of every particle with the ``active`` particles."""
    i, j, touching = graph
    n = active.shape[0]
    if system.pair_list is None:
        return jnp.sum(touching & active[None, :], axis=1)
    ends = jnp.concatenate([i, j])
    both = jnp.concatenate([touching & active[j], touching & active[i]]).astype(int)
    return jax.ops.segment_sum(both, ends, num_segments=n + 1)[:n]


def contact_numbers(system: System, x, params) -> jax.Array:
    """(N,) number of contacts of every particle; all 0 for potentials without contacts."""
    if system.potential.contact_parameter is None:
        return jnp.zeros(x.shape[0], dtype=int)
    return _contact_counts(system, contact_graph(system, x, params), jnp.ones(x.shape[0], dtype=bool))


def contact_changes(system: System, x_a, params_a, x_b, params_b) -> np.ndarray:
    """(N,) mask of particles whose set of contacts differs between two states (not jittable)."""
    changed = np.zeros(system.n_particles, dtype=bool)
    if system.potential.contact_parameter is None:
        return changed
    sets = []
    for x, params in ((x_a, params_a), (x_b, params_b)):
        i, j, touching = (np.asarray(a) for a in _contact_graph_jit(system, jnp.asarray(x), params))
        pairs = np.stack([np.minimum(i, j)[touching], np.maximum(i, j)[touching]], axis=1)
        sets.append(set(map(tuple, pairs.tolist())))
    for a, b in sets[0] ^ sets[1]:
        changed[[a, b]] = True
    return changed


def rattlers(system: System, x, params) -> jax.Array:
    """(N,) mask of rattlers: particles left with fewer than d + 1 contacts after removing,
    repeatedly, every particle that has fewer (their positions are not determined)."""
    if system.potential.contact_parameter is None:
        return jnp.zeros(x.shape[0], dtype=bool)
    need = system.dimension + 1
    graph = contact_graph(system, x, params)

    def step(carry):
        active, _ = carry
        kept = active & (_contact_counts(system, graph, active) >= need)
        return kept, jnp.any(kept != active)

    active, _ = jax.lax.while_loop(lambda c: c[1], step, (jnp.ones(x.shape[0], dtype=bool), True))
    return ~active
