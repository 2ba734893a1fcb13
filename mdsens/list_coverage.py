"""Neighbour-list coverage: whether a system's pairs reach as far as its interactions at given θ.

A neighbour list is built for the interaction range at the recipe's parameters (plus a margin).
Parameters that lengthen the range (a larger diameter or σ), or positions with more pairs than the
list has room for, need a new list: :func:`for_params` gives the system with one. The energy of a
listed system is NaN, not a silently wrong number, where its list does not cover (see
:func:`listed_energy`); and in any periodic cell the range must stay below half the cell's width
(:func:`check_minimum_image`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import UserError
from mdsens.neighbors import PairList, build_pair_list, cell_list_problem, host_overflowed
from mdsens.potentials import bounding_tables

if TYPE_CHECKING:
    from mdsens.system import System


def listed_energy(potential, overridden, n_species, settings, pair_list: PairList, pair_energy_fn):
    """E(x, θ) with its pairs found at ``x``: NaN, not a silently wrong number, when the list
    overflows or θ makes the interaction range exceed the list's cutoff."""

    def energy_fn(x, params):
        neighbors = pair_list.at(x)
        reach = potential.reach(bounding_tables(potential, params, overridden, n_species), settings)
        bad = (neighbors.did_buffer_overflow != 0) | (jax.lax.stop_gradient(reach) > pair_list.cutoff)
        return jnp.where(bad, jnp.nan, pair_energy_fn(x, params, neighbors.idx))

    return energy_fn


def check_minimum_image(kind: str, cell: np.ndarray, reach: float) -> None:
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


def for_params(system: System, params, x=None) -> System:
    """``system``, or one whose neighbour list reaches far enough for ``params`` (its interaction
    range grew beyond the list's cutoff) and has room for the pairs at ``x`` (when given). Same
    shapes; new compiled functions.

    Raises:
        UserError: the larger range no longer fits the periodic cell.
    """
    if system.pair_list is None:
        return system
    reach = system.reach(params)
    box = np.diag(system.cell)
    short = reach > system.pair_list.cutoff
    full = (
        x is not None
        and not system.pair_list.sized_at(x)
        and host_overflowed(system.pair_list.at_jit(jnp.asarray(x)))
    )
    if not (short or full):
        return system
    check_minimum_image(system.space_kind, system.cell, reach)
    settings = system.recipe["neighbors"]
    cutoff = max(reach * (1 + settings["margin"]), system.pair_list.cutoff)
    sample = system.positions if x is None else np.asarray(x)
    problem = cell_list_problem(settings, sample, system.space_kind, box, reach)
    if problem is not None:
        raise UserError(
            f"the interaction range at these parameters ({reach:.4g}) is too large for a neighbour"
            f" list in this cell (a cell list {problem}); build the system with these parameters"
            " and neighbors.mode = never"
        )
    pair_list = build_pair_list(system.displacement, box, cutoff, settings, sample)
    energy_fn = listed_energy(
        system.potential,
        system.overridden,
        len(system.species),
        system.settings,
        pair_list,
        system.pair_energy_fn,
    )
    return dataclasses.replace(system, pair_list=pair_list, energy_fn=energy_fn)
