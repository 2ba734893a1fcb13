"""Energy minimisation to a tight force tolerance: FIRE (JAX-MD) and gradient descent.

The loop runs on the device inside ``lax.while_loop`` until max_i |F_i| ≤ fmax (the per-particle
force norm, ASE's convention) or a step cap. :class:`Relaxer` compiles it once per system shape
and takes the parameters as arguments, so relaxing at θ, θ + h and θ - h reuses one compilation.
It runs in chunks of steps so that a caller can show progress between chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import minimize

from mdsens.errors import NotConvergedError
from mdsens.system import System

CHUNK_STEPS = 1000


@dataclass(frozen=True)
class RelaxResult:
    """A relaxed state and how it was reached.

    Attributes:
        positions: relaxed positions, shape (N, d), float64, wrapped into the box.
        energy: E(x*, θ).
        max_force: max_i |F_i| at ``positions``.
        steps: minimiser steps taken.
        converged: ``max_force <= fmax``.
        wall_time: seconds, compilation included.
        minimizer: the minimiser's name.
        fmax: the force tolerance asked for.
        initial_energy: E at the start; a relaxation that ends higher than it started is
            unstable (time step too large) and is not ``converged`` whatever its forces.
    """

    positions: np.ndarray
    energy: float
    max_force: float
    steps: int
    converged: bool
    wall_time: float
    minimizer: str
    fmax: float
    initial_energy: float

    @property
    def energy_increased(self) -> bool:
        return rose(self.initial_energy, self.energy)

    def require_converged(self) -> None:
        """Raise :class:`NotConvergedError` unless the relaxation reached ``fmax``."""
        if self.energy_increased:
            raise NotConvergedError(
                f"relaxation is unstable: the energy rose from {self.initial_energy:.6g} to"
                f" {self.energy:.6g} (reduce minimizer.dt_max / dt_start, or minimizer.step_size)"
            )
        if not self.converged:
            raise NotConvergedError(
                f"relaxation did not converge: max force {self.max_force:.3g} > fmax {self.fmax:.3g}"
                f" after {self.steps} steps (raise minimizer.max_steps or relax fmax)"
            )


def rose(before: float, after: float) -> bool:
    """Whether an energy rose beyond round-off: a minimiser must not end above its start."""
    return after > before + 1e-9 * max(1.0, abs(before))


def max_force(forces: jax.Array) -> jax.Array:
    """max_i |F_i|, the per-particle force norm used as convergence criterion."""
    return jnp.max(jnp.linalg.norm(forces, axis=-1))


def _minimizer(system: System, settings: dict[str, Any]):
    """(init_fn, step_fn, positions_of, forces_of) for the recipe's minimiser."""
    name = settings["name"]
    if name == "fire":
        init_fn, step_fn = minimize.fire_descent(
            lambda x, **params: system.force_fn(x, params),
            system.shift,
            dt_start=settings["dt_start"],
            dt_max=settings["dt_max"],
        )
        return init_fn, step_fn, (lambda s: s.position), (lambda s: s.force)
    if name == "gradient_descent":
        step_size = settings["step_size"]

        def init_fn(x, **params):
            return x, system.force_fn(x, params)

        def step_fn(state, **params):
            x, f = state
            x = system.shift(x, step_size * f)
            return x, system.force_fn(x, params)

        return init_fn, step_fn, (lambda s: s[0]), (lambda s: s[1])
    raise ValueError(f"unknown minimizer {name!r}")


class Relaxer:
    """Relaxation of one system, compiled once and reused for any parameters and start.

    Args:
        system: the system (its recipe's ``minimizer`` table gives the method and tolerances).
        fmax: force tolerance; defaults to the recipe's ``minimizer.fmax``.
        max_steps: step cap; defaults to the recipe's ``minimizer.max_steps``.
    """

    def __init__(self, system: System, fmax: float | None = None, max_steps: int | None = None):
        settings = system.recipe["minimizer"]
        self.system = system
        self.name = settings["name"]
        self.fmax = float(settings["fmax"] if fmax is None else fmax)
        self.max_steps = int(settings["max_steps"] if max_steps is None else max_steps)
        init_fn, step_fn, positions_of, forces_of = _minimizer(system, settings)
        fmax_ = self.fmax

        def run(state, steps, cap, params):
            def cond(carry):
                state, k = carry
                return (max_force(forces_of(state)) > fmax_) & (k < cap)

            def body(carry):
                state, k = carry
                return step_fn(state, **params), k + 1

            return jax.lax.while_loop(cond, body, (state, steps))

        self._init = jax.jit(lambda x, params: init_fn(x, **params))
        self._run = jax.jit(run)
        self._minimizer = init_fn, step_fn
        self.positions_of = positions_of
        self._forces_of = forces_of
        self._energy = jax.jit(system.energy_fn)

        def solve(params, x0):
            state, _ = run(init_fn(x0, **params), 0, self.max_steps, params)
            return positions_of(state)

        self.solve: Callable = solve
        """Pure-JAX ``solve(params, x0) -> x*`` for :func:`mdsens.implicit.implicit_root`."""

    def unrolled(self):
        """``(init(x, params), step(state, params))`` of one minimiser step, for differentiating
        through the unrolled minimiser (what implicit differentiation avoids)."""
        init_fn, step_fn = self._minimizer
        return (lambda x, params: init_fn(x, **params)), (lambda state, params: step_fn(state, **params))

    def relax(
        self,
        params: dict | None = None,
        x0=None,
        progress: Callable[[int, float], None] | None = None,
    ) -> RelaxResult:
        """Relax from ``x0`` (default: the system's initial positions) at ``params`` (default θ).

        ``progress(steps, max_force)`` is called after every chunk of steps. Never raises on
        non-convergence: check ``result.converged`` or call ``result.require_converged()``.
        """
        params = self.system.params if params is None else params
        x0 = self.system.positions if x0 is None else x0
        start = time.perf_counter()
        x0 = jnp.asarray(x0, dtype=jnp.float64)
        initial_energy = float(self._energy(x0, params))
        state = self._init(x0, params)
        steps = 0
        while True:
            cap = min(steps + CHUNK_STEPS, self.max_steps)
            state, steps_arr = self._run(state, steps, cap, params)
            steps = int(steps_arr)
            force = float(max_force(self._forces_of(state)))
            if progress is not None:
                progress(steps, force)
            if force <= self.fmax or steps >= self.max_steps or not np.isfinite(force):
                break
        positions = self.positions_of(state)
        energy = float(self._energy(positions, params))
        return RelaxResult(
            positions=np.asarray(positions),
            energy=energy,
            max_force=force,
            steps=steps,
            converged=force <= self.fmax and not rose(initial_energy, energy),
            wall_time=time.perf_counter() - start,
            minimizer=self.name,
            fmax=self.fmax,
            initial_energy=initial_energy,
        )


def relax(system: System, params: dict | None = None, x0=None, progress=None) -> RelaxResult:
    """Relax ``system`` once (see :class:`Relaxer` to relax the same system many times)."""
    return Relaxer(system).relax(params=params, x0=x0, progress=progress)
