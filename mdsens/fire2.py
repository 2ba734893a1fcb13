"""FIRE 2.0: the Fast Inertial Relaxation Engine as revised by Guénolé et al. (2020).

Guénolé, Nöhring, Vaid, Houllé, Xie, Prakash & Bitzek, "Assessment and optimization of the fast
inertial relaxation engine (FIRE) for energy minimization in atomistic simulations and its
implementation in LAMMPS", Comput. Mater. Sci. 175, 109584 (2020): Algorithm 2, with LAMMPS's
``min_style fire`` defaults. What it changes from the 2006 FIRE that JAX-MD implements
(velocity Verlet, no backtracking):

* semi-implicit (symplectic) Euler: v ← v + Δt F, then the FIRE mixing
  v ← (1 − α) v + α |v| F/|F|, then x ← x + Δt v (unit masses);
* on an uphill move (P = F·v ≤ 0) the positions go back half a step, x ← x − ½ Δt v, and the
  velocities are zeroed; the force is then evaluated again at the new positions (a second force
  evaluation for that step, as LAMMPS does; none when v was already zero);
* an initial delay: during the first ``n_delay`` steps an uphill move neither shrinks Δt nor
  resets α (the start has no momentum to lose yet);
* Δt stays within [``dt_min``, ``dt_max``]: it grows by ``f_inc`` after ``n_delay`` downhill
  steps in a row and shrinks by ``f_dec`` on an uphill one, unless that would take it below
  ``dt_min``;
* a maximum displacement ``dmax`` per particle and step (LAMMPS's ``dmax``): where Δt · |v| of
  some particle exceeds it, all velocities are scaled down together until it does not, so that
  x, v and Δt stay consistent (LAMMPS shortens that step's Δt instead, from the velocity before
  the update, which does not bound the move when the force is large). A start with overlapping
  particles, or a Δt too large for a stiff potential, cannot throw particles across the box.

LAMMPS's other stopping rule (quit after 2000 uphill moves in a row) is left out: a relaxation
here stops on max|F| ≤ fmax or its step cap (:mod:`mdsens.relaxation`).

The constants are arguments; mdsens's defaults (:data:`mdsens.recipe.MINIMIZER_DEFAULTS`) take
LAMMPS's ``dtgrow 1.1``, ``dtshrink 0.5``, ``alphashrink 0.99``, ``dmax 0.1`` and ``tmin 0.02``
(``dt_min`` = 0.02 ``dt_start``), but three from JAX-MD's FIRE, chosen by measurement on harmonic
soft-sphere packings from random starts to max|F| ≤ 1e-12 (mean force evaluations over seeds):

* ``dt_max`` 0.4, not LAMMPS's 10 ``dt_start`` = 1: semi-implicit Euler is unstable above about
  0.4 on these packings (2-D, N = 1024, 8 seeds: dt_max 0.5 took 10 400 evaluations and 1 took
  12 600 where 0.4 took 1 700; 3-D, N = 1024, 4 seeds, LAMMPS's α and delay: dt_max 1 took
  16 400 where 0.4 took 4 800);
* ``alpha_start`` 0.1 and ``n_delay`` 5, not 0.25 and 20: 1 700 instead of 2 700 evaluations
  (2-D, N = 1024, 8 seeds) and 3 900 instead of 4 800 (3-D, N = 1024, 4 seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

CONSTANTS = ("dt_start", "dt_max", "dt_min", "dmax", "n_delay", "f_inc", "f_dec", "alpha_start", "f_alpha")
"""The keyword arguments of :func:`fire2`, as a recipe's ``minimizer`` table names them (their
defaults are in :data:`mdsens.recipe.MINIMIZER_DEFAULTS`)."""


class Fire2State(NamedTuple):
    """One FIRE 2.0 iterate.

    Attributes:
        position: (N, d).
        velocity: (N, d), unit masses.
        force: F at ``position``.
        dt: the time step of the last move (a half step back undoes half of it).
        alpha: the mixing coefficient.
        downhill: downhill steps (P > 0) since the last uphill one.
        step: steps taken (for the initial delay).
        evaluations: force evaluations so far, the one at the start included.
    """

    position: jax.Array
    velocity: jax.Array
    force: jax.Array
    dt: jax.Array
    alpha: jax.Array
    downhill: jax.Array
    step: jax.Array
    evaluations: jax.Array


def fire2(
    force: Callable[[jax.Array, Any, Any], jax.Array],
    shift: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    dt_start: float,
    dt_max: float,
    dt_min: float,
    dmax: float,
    n_delay: int,
    f_inc: float,
    f_dec: float,
    alpha_start: float,
    f_alpha: float,
) -> tuple[Callable, Callable]:
    """``(init(x, pairs, params), step(state, pairs, params))`` of FIRE 2.0.

    Args:
        force: ``force(x, pairs, params) -> F`` (``pairs``: a neighbour list's pairs or ``None``).
        shift: the space's ``shift(x, dx)`` (wraps positions into a periodic cell).
        dt_start, dt_max, dt_min: the first time step and the bounds of Δt.
        dmax: most distance a particle's velocity may carry it in one step.
        n_delay: downhill steps before Δt grows, and length of the initial delay.
        f_inc, f_dec: factors by which Δt grows and shrinks.
        alpha_start, f_alpha: the mixing coefficient after a reset, and its factor per growth.

    Both functions are pure and jittable; ``step`` takes one force evaluation, two after an
    uphill move that had a velocity to undo.
    """

    def init(x, pairs, params) -> Fire2State:
        zero = jnp.zeros((), dtype=x.dtype)
        return Fire2State(
            position=x,
            velocity=jnp.zeros_like(x),
            force=force(x, pairs, params),
            dt=zero + dt_start,
            alpha=zero + alpha_start,
            downhill=jnp.zeros((), dtype=jnp.int32),
            step=jnp.zeros((), dtype=jnp.int32),
            evaluations=jnp.ones((), dtype=jnp.int32),
        )

    def step(state: Fire2State, pairs, params) -> Fire2State:
        x, v, f = state.position, state.velocity, state.force
        power = jnp.vdot(f, v)
        downhill = power > 0
        count = jnp.where(downhill, state.downhill + 1, 0)
        grow = downhill & (count > n_delay)
        dt = jnp.where(grow, jnp.minimum(state.dt * f_inc, dt_max), state.dt)
        alpha = jnp.where(grow, state.alpha * f_alpha, state.alpha)
        # An uphill move shrinks Δt and resets α, except during the initial delay.
        reset = ~downhill & (state.step >= n_delay)
        alpha = jnp.where(reset, alpha_start, alpha)
        dt = jnp.where(reset & (dt * f_dec >= dt_min), dt * f_dec, dt)

        # Uphill: half a step back, zero velocities, and the force where the particles now are.
        moved = ~downhill & jnp.any(v != 0)
        x = jnp.where(moved, shift(x, -0.5 * state.dt * v), x)
        f = jax.lax.cond(moved, lambda: force(x, pairs, params), lambda: f)
        v = jnp.where(downhill, v, 0.0)

        # Semi-implicit Euler with the FIRE mixing between the velocity and the position update.
        v = v + dt * f
        f_norm = jnp.linalg.norm(f)
        mix = alpha * jnp.linalg.norm(v) / jnp.where(f_norm > 0, f_norm, 1.0)
        v = (1 - alpha) * v + mix * f
        # At most dmax per particle and step: all velocities scaled down together.
        reach = dt * jnp.max(jnp.linalg.norm(v, axis=-1))
        v = v * jnp.where(reach > dmax, dmax / jnp.where(reach > 0, reach, 1.0), 1.0)
        x = shift(x, dt * v)
        return Fire2State(
            position=x,
            velocity=v,
            force=force(x, pairs, params),
            dt=dt,
            alpha=alpha,
            downhill=count,
            step=state.step + 1,
            evaluations=state.evaluations + 1 + moved.astype(jnp.int32),
        )

    return init, step
