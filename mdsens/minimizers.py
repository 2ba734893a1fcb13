"""The first-order minimisers as the relaxation loop drives them: JAX-MD's FIRE (Bitzek et al. 2006,
its 2011 constants), FIRE 2.0 (:mod:`mdsens.fire2`) and gradient descent, each as
``init``/``step`` functions of the positions, the neighbour list's pairs and θ
(:class:`Minimizer`). The loop, its stopping rule and the Newton finish are
:mod:`mdsens.relaxation`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from mdsens.fire2 import CONSTANTS as FIRE2_CONSTANTS
from mdsens.fire2 import fire2
from mdsens.jaxmd import minimize
from mdsens.system import System


def _force(system: System):
    """``force(x, params, pairs)``: with a neighbour list over the given pairs, else all pairs."""
    if system.pair_list is None:
        return lambda x, params, pairs: system.force_fn(x, params)
    return lambda x, params, pairs: -jax.grad(system.pair_energy_fn)(x, params, pairs)


class Minimizer(NamedTuple):
    """A first-order minimiser as the relaxation loop drives it.

    Attributes:
        init: ``init(x, pairs, params) -> state``.
        step: ``step(state, pairs, params) -> state``.
        positions: ``positions(state) -> x``.
        forces: ``forces(state) -> F`` at those positions.
        evaluations: ``evaluations(state, steps) -> n``: force evaluations from ``init`` on.
    """

    init: Callable
    step: Callable
    positions: Callable
    forces: Callable
    evaluations: Callable


def _one_per_step(state, steps):
    """One force evaluation at the start and one per step."""
    return steps + 1


def first_order(system: System, settings: dict[str, Any]) -> Minimizer:
    """The recipe's first-order minimiser."""
    name = settings["name"]
    force = _force(system)
    if name == "fire":
        init_fn, step_fn = minimize.fire_descent(
            lambda x, pairs, **params: force(x, params, pairs),
            system.shift,
            dt_start=settings["dt_start"],
            dt_max=settings["dt_max"],
        )
        return Minimizer(
            lambda x, pairs, params: init_fn(x, pairs=pairs, **params),
            lambda state, pairs, params: step_fn(state, pairs=pairs, **params),
            lambda s: s.position,
            lambda s: s.force,
            _one_per_step,
        )
    if name == "fire2":
        init_fn, step_fn = fire2(
            lambda x, pairs, params: force(x, params, pairs),
            system.shift,
            **{key: settings[key] for key in FIRE2_CONSTANTS},
        )
        return Minimizer(
            init_fn, step_fn, lambda s: s.position, lambda s: s.force, lambda s, steps: s.evaluations
        )
    if name == "gradient_descent":
        step_size = settings["step_size"]

        def gd_init(x, pairs, params):
            return x, force(x, params, pairs)

        def gd_step(state, pairs, params):
            x, f = state
            x = system.shift(x, step_size * f)
            return x, force(x, params, pairs)

        return Minimizer(gd_init, gd_step, lambda s: s[0], lambda s: s[1], _one_per_step)
    raise ValueError(f"unknown minimizer {name!r}")
