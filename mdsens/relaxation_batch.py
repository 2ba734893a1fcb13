"""Many relaxations of one system shape stepped together in one compiled loop.

``jax.vmap`` of :attr:`mdsens.relaxation.Relaxer.solve` would relax a batch too, but under
``vmap`` every ``lax.cond`` whose predicate differs between members becomes a ``select`` that
computes both branches: the neighbour list's "rebuild if a particle moved by skin / 2" then
rebuilds every member's list on every step (at 128 particles that made a batched step about
five times the cost of the members' plain steps). Here the loop is written over the batch
instead: each step the minimiser steps every member (``vmap``), and on the steps where some
member's list is stale, a loop over the members (``lax.map``, whose body is one member, so its
``cond`` stays a branch) rebuilds exactly the stale lists, as a single run would.

A member that has converged (or reached the step cap) stops changing: its new state is
discarded, and its step count stops. The loop ends when no member is still moving. The first-
order run, Newton finish and verdict are the single solve's own pieces
(:class:`mdsens.relaxation.SolveParts`), so a member reaches the state a single relaxation from
the same start reaches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mdsens.relaxation import Relaxer, max_force


class BatchRelaxed(NamedTuple):
    """What :func:`batched_solve`'s function returns, one row per member."""

    positions: jax.Array
    """(M, N, d) relaxed positions (NaN rows where ``failed``)."""
    max_force: jax.Array
    steps: jax.Array
    """First-order steps each member took (a Newton finish adds its own few, uncounted)."""
    unconverged: jax.Array
    """max|F| > fmax or non-finite positions."""
    missing: jax.Array
    """Pairs were missing from the member's neighbour list (it overflowed, or θ reaches beyond
    the list's cutoff): the member must be relaxed alone with a larger list."""


def _keep(moving, new, old):
    """``new`` for moving members, ``old`` for the rest (a leading member axis on every leaf)."""

    def choose(a, b):
        return jnp.where(moving.reshape(moving.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(choose, new, old)


def batched_solve(relaxer: Relaxer):
    """``solve(params, x0) -> BatchRelaxed`` for a batch (a leading member axis on every leaf
    of ``params`` and on ``x0``) with ``relaxer``'s minimiser, tolerances and neighbour list.
    Pure JAX and never raises: wrap it in ``jax.jit``; failed members are flagged."""
    parts = relaxer.parts
    minimizer = parts.minimizer
    pair_list = relaxer.system.pair_list
    cap = relaxer.max_steps

    def moving(state, steps):
        force = jax.vmap(lambda s: max_force(minimizer.forces(s)))(state)
        return (force > parts.first_fmax) & jnp.isfinite(force) & (steps < cap)

    def refresh(x, neighbors):
        if pair_list is None:
            return neighbors
        stale = jax.vmap(pair_list.stale)(x, neighbors)

        def one(member):
            # A plain cond per member (lax.map is a loop, not vmap): only stale lists rebuild.
            x, neighbors, stale = member
            return jax.lax.cond(stale, lambda: parts.refresh(x, neighbors), lambda: neighbors)

        return jax.lax.cond(
            jnp.any(stale), lambda: jax.lax.map(one, (x, neighbors, stale)), lambda: neighbors
        )

    def solve(params, x0):
        def body(carry):
            state, neighbors, steps = carry
            active = moving(state, steps)
            neighbors = refresh(jax.vmap(minimizer.positions)(state), neighbors)
            pairs = None if pair_list is None else jax.vmap(parts.pairs_of)(neighbors)
            stepped = jax.vmap(minimizer.step)(state, pairs, params)
            return _keep(active, stepped, state), neighbors, steps + active

        members = x0.shape[0]
        state, neighbors = jax.vmap(parts.start, in_axes=(0, None, 0))(x0, parts.neighbors0, params)
        steps = jnp.zeros(members, dtype=jnp.int32)
        state, neighbors, steps = jax.lax.while_loop(
            lambda carry: jnp.any(moving(carry[0], carry[2])), body, (state, neighbors, steps)
        )
        x, force, steps, neighbors = jax.vmap(parts.tail)(state, neighbors, steps, params)
        unconverged, missing = jax.vmap(parts.unsolved)(x, force, neighbors, params)
        failed = (unconverged | missing).reshape((members,) + (1,) * (x.ndim - 1))
        return BatchRelaxed(jnp.where(failed, jnp.nan, x), force, steps, unconverged, missing)

    return solve
