"""Energy minimisation to a tight force tolerance: FIRE (JAX-MD), FIRE 2.0 and gradient descent,
optionally finished by Newton–CG.

The first-order minimisers (:mod:`mdsens.minimizers`) are ``fire`` (JAX-MD's FIRE, Bitzek et al.
2006, velocity Verlet), ``fire2`` (:mod:`mdsens.fire2`, Guénolé et al. 2020) and
``gradient_descent``. With
``minimizer.newton_switch`` > 0 (``fire2`` only), once max|F| falls to it the relaxation switches to
Newton–CG steps (:mod:`mdsens.newton`); if these cannot go on (CG fails, the Hessian is not
positive off its null space, the line search fails), the first-order minimiser takes over again
from where Newton stopped. Every result counts its force evaluations, a Hessian-vector product as
two (:attr:`RelaxResult.force_evaluations`).

The loop runs on the device inside ``lax.while_loop`` until max_i |F_i| ≤ fmax (the per-particle
force norm, ASE's convention) or a step cap. :class:`Relaxer` compiles it once per system shape
and takes the parameters as arguments, so relaxing at θ, θ + h and θ - h reuses one compilation.
It runs in chunks of steps (fewer for larger systems, so that each is short), so that a caller
can show progress between chunks and a diverging relaxation stops early: a non-finite force
stops the compiled loop at once; non-finite positions or energies, or an energy far above the
start (:func:`mdsens.relax_verdict.far_above`: the time step is unstable; overlaps from forces
growing without bound end there too), stop it within :data:`CHUNK_STEPS` steps. A non-finite
energy, force or position is never converged.

Ctrl-C interrupts the wait for a chunk's result at once (KeyboardInterrupt propagates from
:meth:`Relaxer.relax`). Nothing in the compiled loop calls back into Python: an interrupt that
lands in such a callback would come back as a JAX runtime error, not as a KeyboardInterrupt.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import NotConvergedError
from mdsens.minimizers import Minimizer, first_order
from mdsens.neighbors import host_overflowed, overflowed
from mdsens.newton import CONVERGED, STATUS, newton_finish
from mdsens.relax_verdict import (
    UNSTABLE_HINT,
    check_tolerances,
    divergence,
    energy_rose,
    raise_if_unsolved,
    stop_reason,
)
from mdsens.system import System

CHUNK_STEPS = 200
"""Most minimiser steps per compiled chunk, and between two divergence checks of the energy."""
CHUNK_PARTICLE_STEPS = 2_000_000
"""Particle-steps per chunk: larger systems take fewer steps per chunk, so that progress and
divergence checks come every second or so."""


@dataclass(frozen=True)
class RelaxResult:
    """A relaxed state and how it was reached.

    Attributes:
        positions: relaxed positions, shape (N, d), float64 (a periodic cell's steps wrap them
            into the cell).
        energy: E(x*, θ).
        max_force: max_i |F_i| at ``positions``.
        steps: minimiser steps taken.
        converged: ``max_force <= fmax`` and the energy did not rise (``energy_increased``).
        wall_time: seconds, compilation included.
        minimizer: the minimiser's name.
        fmax: the force tolerance this relaxation ran to (the engine's or the call's).
        initial_energy: E at the start; a relaxation that ends higher than it started is
            unstable (time step too large) and is not ``converged`` whatever its forces.
        diverged: the relaxation was stopped because it diverged (non-finite energy, forces or
            positions, or an energy far above the start): never ``converged``.
        reason: why it stopped, one sentence (converged, step cap, diverged, unstable).
        force_evaluations: force evaluations, Hessian-vector products of a Newton finish counted
            as two, the start's included (chunks redone after a neighbour-list overflow too).
        newton_iterations: Newton steps accepted (0 without a Newton finish).
        newton: what the Newton finish did, one sentence ("" when none ran).
        contact_changes: particles whose set of contacts differs between the start and the end
            of the Newton steps (0 where none were taken or the potential has no contacts): a
            Newton step that changed the contact network may have left the first-order
            minimiser's basin.
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
    diverged: bool = False
    reason: str = ""
    force_evaluations: int = 0
    newton_iterations: int = 0
    newton: str = ""
    contact_changes: int = 0

    @property
    def energy_increased(self) -> bool:
        return energy_rose(self.initial_energy, self.energy)

    def require_converged(self) -> None:
        """Raise :class:`NotConvergedError` unless the relaxation reached ``fmax``."""
        if self.diverged:
            raise NotConvergedError(f"relaxation stopped: {self.reason} ({UNSTABLE_HINT})")
        if self.energy_increased:
            raise NotConvergedError(
                f"relaxation is unstable: the energy rose from {self.initial_energy:.6g} to"
                f" {self.energy:.6g} ({UNSTABLE_HINT})"
            )
        if not self.converged:
            raise NotConvergedError(
                f"relaxation did not converge: max force {self.max_force:.3g} > fmax {self.fmax:.3g}"
                f" after {self.steps} steps (raise minimizer.max_steps or relax fmax)"
            )


def chunk_steps(n_particles: int) -> int:
    """Steps per compiled chunk for a system of ``n_particles`` (see :data:`CHUNK_PARTICLE_STEPS`)."""
    return max(1, min(CHUNK_STEPS, CHUNK_PARTICLE_STEPS // max(n_particles, 1)))


def max_force(forces: jax.Array) -> jax.Array:
    """max_i |F_i|, the per-particle force norm used as convergence criterion."""
    return jnp.max(jnp.linalg.norm(forces, axis=-1))


def host_max_force(forces) -> float:
    """:func:`max_force` of computed forces, in NumPy (an eager JAX call would dispatch two
    operations, each traced and lowered again in a fresh process)."""
    return float(np.max(np.linalg.norm(np.asarray(forces), axis=-1)))


class SolveParts(NamedTuple):
    """The pure pieces :attr:`Relaxer.solve` is made of, for a solve that drives them another
    way (:mod:`mdsens.relaxation_batch` steps many members in one loop)."""

    minimizer: Minimizer
    refresh: Callable
    """``refresh(x, neighbors)``: the list brought up to date at x (None without a list)."""
    pairs_of: Callable
    start: Callable
    """``start(x, neighbors, params) -> (state, neighbors)``."""
    tail: Callable
    """``tail(state, neighbors, steps, params) -> (x, max|F|, steps, neighbors)``: after the
    first-order run to :attr:`first_fmax`, the Newton finish where there is one."""
    unsolved: Callable
    """``unsolved(x, max|F|, neighbors, params) -> (unconverged, missing pairs)``."""
    neighbors0: Any
    first_fmax: float
    """The first-order run's tolerance: fmax, or the Newton switch-over where it is larger."""


@dataclass(frozen=True, eq=False)
class Relaxer:
    """Relaxation of one system, compiled once and reused for any parameters and start.

    An immutable value, safe to share: nothing is assigned to it after construction, and its
    compiled functions close over local values, never over the engine. ``fmax`` and
    ``max_steps`` are defaults that each :meth:`relax` call may override.

    With a neighbour list (:mod:`mdsens.neighbors`) the list travels with the minimiser's state
    and is brought up to date before every step; a list that overflows is reallocated larger for
    that relaxation and the chunk of steps redone. Parameters whose interaction range exceeds the
    list's cutoff need a system with a longer one: :meth:`for_params` builds that engine (one
    more compilation); :meth:`relax` builds it for the one call when it is given such parameters.

    Args:
        system: the system (its recipe's ``minimizer`` table gives the method and tolerances).
        fmax: default force tolerance; defaults to the recipe's ``minimizer.fmax``.
        max_steps: default step cap; defaults to the recipe's ``minimizer.max_steps``.
    """

    system: System = field(repr=False)
    fmax: float | None = None
    max_steps: int | None = None
    name: str = field(init=False)
    newton_switch: float = field(init=False)
    """max|F| below which a Newton–CG finish takes over (0: none)."""
    solve: Callable = field(init=False, repr=False)
    """Pure-JAX ``solve(params, x0) -> x*`` for :func:`mdsens.implicit.implicit_root`, with the
    engine's ``fmax`` and ``max_steps`` and its Newton finish, if any (NaN if the neighbour list
    overflows or θ reaches beyond its cutoff: inside ``jit`` it cannot be reallocated)."""
    _start: Callable = field(init=False, repr=False)
    _run: Callable = field(init=False, repr=False)
    _newton: Callable | None = field(init=False, repr=False)
    _minimizer: Minimizer = field(init=False, repr=False)
    _refresh: tuple = field(init=False, repr=False)
    _energy: Callable = field(init=False, repr=False)
    _max_force: Callable = field(init=False, repr=False)
    _neighbors0: Any = field(init=False, repr=False)
    parts: SolveParts = field(init=False, repr=False)
    """The pure pieces of :attr:`solve`, for :mod:`mdsens.relaxation_batch`."""

    def __post_init__(self):
        system = self.system
        settings = system.recipe["minimizer"]
        fmax = float(settings["fmax"] if self.fmax is None else self.fmax)
        max_steps = int(settings["max_steps"] if self.max_steps is None else self.max_steps)
        check_tolerances(fmax, max_steps)
        minimizer = first_order(system, settings)
        positions_of, forces_of = minimizer.positions, minimizer.forces
        switch = float(settings.get("newton_switch", 0.0))
        finish = newton_finish(system) if switch > 0 else None
        pair_list = system.pair_list

        def refresh(x, neighbors):
            return None if pair_list is None else pair_list.update(x, neighbors)

        def pairs_of(neighbors):
            return None if neighbors is None else neighbors.idx

        def run(state, neighbors, steps, cap, fmax, params):
            def cond(carry):
                state, _, k = carry
                force = max_force(forces_of(state))
                # A non-finite force stops at once (NaN > fmax is already False; inf is not).
                return (force > fmax) & jnp.isfinite(force) & (k < cap)

            def body(carry):
                state, neighbors, k = carry
                neighbors = refresh(positions_of(state), neighbors)
                return minimizer.step(state, pairs_of(neighbors), params), neighbors, k + 1

            return jax.lax.while_loop(cond, body, (state, neighbors, steps))

        def start(x, neighbors, params):
            neighbors = refresh(x, neighbors)
            return minimizer.init(x, pairs_of(neighbors), params), neighbors

        def newton(x, neighbors, params, fmax):
            # Newton sums over the relaxation's list, brought up to date at x.
            neighbors = refresh(x, neighbors)
            return finish(x, params, fmax, neighbors), neighbors

        # The list every relaxation starts from, sized once here: its capacity is a shape of the
        # compiled loop, so one list means one compilation.
        neighbors0 = None if pair_list is None else pair_list.allocate(system.positions)

        def tail(state, neighbors, steps, params):
            """x*, its max|F|, the steps and the list after the first-order run to
            max(fmax, switch): the Newton finish from there, where there is one."""
            x = positions_of(state)
            if finish is None:
                return x, max_force(forces_of(state)), steps, neighbors
            # Newton from max|F| <= switch; the first-order minimiser finishes if it stops.
            near = max_force(forces_of(state)) <= switch
            # Not near (the step cap came first): an infinite tolerance stops Newton at once.
            out, neighbors = newton(x, neighbors, params, jnp.where(near, fmax, jnp.inf))
            done = near & (out.status == CONVERGED)
            restart, neighbors = start(jnp.where(near, out.position, x), neighbors, params)
            restart, neighbors, steps = jax.lax.cond(
                done,
                lambda: (restart, neighbors, steps),
                lambda: run(restart, neighbors, steps, max_steps, fmax, params),
            )
            x = jnp.where(done, out.position, positions_of(restart))
            force = jnp.where(done, max_force(out.force), max_force(forces_of(restart)))
            return x, force, steps, neighbors

        def unsolved(x, force, neighbors, params):
            """Whether x* missed fmax (or is not finite), and whether pairs were missing from the
            list (it overflowed, or θ reaches beyond its cutoff)."""
            unconverged = ~(force <= fmax) | ~jnp.all(jnp.isfinite(x))
            missing = jnp.asarray(False)
            if neighbors is not None:
                reach = system.potential.reach(system.pair_values(params), system.settings)
                missing = overflowed(neighbors) | (reach > pair_list.cutoff)
            return unconverged, missing

        def solve(params, x0):
            state, neighbors = start(x0, neighbors0, params)
            state, neighbors, steps = run(state, neighbors, 0, max_steps, max(fmax, switch), params)
            x, force, steps, neighbors = tail(state, neighbors, steps, params)
            unconverged, missing = unsolved(x, force, neighbors, params)
            # Outside the loop, so the loop itself never calls back into Python.
            jax.debug.callback(
                functools.partial(raise_if_unsolved, fmax=fmax, max_steps=max_steps),
                unconverged,
                missing,
                force,
                steps,
            )
            return jnp.where(unconverged | missing, jnp.nan, x)

        # A frozen dataclass is assigned its derived fields here, once, and never after.
        for key, value in {
            "fmax": fmax,
            "max_steps": max_steps,
            "name": settings["name"],
            "newton_switch": switch,
            "solve": solve,
            "_start": jax.jit(start),
            "_run": jax.jit(run),
            "_newton": None if finish is None else jax.jit(newton),
            "_minimizer": minimizer,
            "_refresh": (refresh, pairs_of),
            "_energy": jax.jit(system.energy_fn),
            "_max_force": jax.jit(lambda x, params: max_force(system.force_fn(x, params))),
            "_neighbors0": neighbors0,
            "parts": SolveParts(
                minimizer, refresh, pairs_of, start, tail, unsolved, neighbors0, max(fmax, switch)
            ),
        }.items():
            object.__setattr__(self, key, value)

    def for_params(self, params: dict, x=None) -> Relaxer:
        """This engine, or a new one (same defaults) whose neighbour list reaches far enough for
        ``params`` and has room for the pairs at ``x`` (see :meth:`mdsens.system.System.for_params`).

        Build it once to relax many times at such parameters: :meth:`relax` otherwise builds
        (and compiles) a new engine on every call.
        """
        system = self.system.for_params(params, x)
        return self if system is self.system else Relaxer(system, self.fmax, self.max_steps)

    def unrolled(self):
        """``(init(x, params), step(state, params), positions(state))`` of the first-order
        minimiser, one step at a time, for differentiating through the unrolled minimiser (what
        implicit differentiation avoids). From the system's initial positions it takes exactly
        the steps :meth:`relax` takes up to a Newton finish, which is not unrolled: with
        ``newton_switch`` > 0 the unrolled steps are those of the first-order minimiser alone. A
        neighbour list travels in the state and is updated the same way."""
        minimizer = self._minimizer
        refresh, pairs_of = self._refresh
        neighbors0 = self._neighbors0

        def init(x, params):
            neighbors = refresh(x, neighbors0)
            return minimizer.init(x, pairs_of(neighbors), params), neighbors

        def step(state, params):
            state, neighbors = state
            neighbors = refresh(minimizer.positions(state), neighbors)
            return minimizer.step(state, pairs_of(neighbors), params), neighbors

        return init, step, lambda state: minimizer.positions(state[0])

    def relax(
        self,
        params: dict | None = None,
        x0=None,
        progress: Callable[[int, float], None] | None = None,
        *,
        fmax: float | None = None,
        max_steps: int | None = None,
    ) -> RelaxResult:
        """Relax from ``x0`` (default: the system's initial positions) at ``params`` (default θ).

        ``fmax`` and ``max_steps`` override the engine's for this call only (``max_steps`` caps
        the first-order steps; a Newton finish adds its own few).
        ``progress(steps, max_force)`` is called after every chunk of steps and after a Newton
        finish. Never raises on non-convergence: check ``result.converged`` or call
        ``result.require_converged()``.
        """
        params = self.system.params if params is None else params
        x0 = self.system.positions if x0 is None else x0
        fmax = self.fmax if fmax is None else float(fmax)
        max_steps = self.max_steps if max_steps is None else int(max_steps)
        check_tolerances(fmax, max_steps)
        return self.for_params(params, x0)._relax(params, x0, progress, fmax, max_steps)

    def _relax(self, params, x0, progress, fmax: float, max_steps: int) -> RelaxResult:
        """:meth:`relax` on this engine, whose list covers ``params`` and ``x0``."""
        pair_list = self.system.pair_list
        minimizer = self._minimizer
        start = time.perf_counter()
        x0 = jnp.asarray(x0, dtype=jnp.float64)
        if pair_list is not None:
            x0 = jnp.mod(x0, pair_list.box)  # where a cell list expects positions
        initial_energy = float(self._energy(x0, params))
        # Every relaxation starts from the engine's list (updated to x0), so that its static
        # structure, and with it the compiled loop, is reused; a list that overflows is replaced
        # by a larger one for the rest of this relaxation only.
        neighbors = self._neighbors0
        state, neighbors = self._start(x0, neighbors, params)
        while neighbors is not None and host_overflowed(neighbors):
            neighbors = pair_list.grow(x0, neighbors)
            state, neighbors = self._start(x0, neighbors, params)
        steps, lowest, diverged, checked = 0, initial_energy, "", 0
        # Force evaluations of earlier runs (redone chunks, a Newton finish, the first-order run
        # before a restart); the current first-order state has taken steps - base steps.
        spent, base = 0, 0
        newton = NewtonReport()
        pending = self._newton is not None and self.newton_switch > fmax
        chunk = chunk_steps(self.system.n_particles)
        while True:
            cap = min(steps + chunk, max_steps)
            stop = max(fmax, self.newton_switch) if pending else fmax
            new_state, new_neighbors, steps_arr = self._run(state, neighbors, steps, cap, stop, params)
            if new_neighbors is not None and host_overflowed(new_neighbors):
                # The chunk ran with pairs missing: redo it with room for them.
                spent += int(minimizer.evaluations(new_state, int(steps_arr) - base)) - int(
                    minimizer.evaluations(state, steps - base)
                )
                neighbors = pair_list.grow(minimizer.positions(new_state), neighbors)
                continue
            state, neighbors, steps = new_state, new_neighbors, int(steps_arr)
            force = host_max_force(minimizer.forces(state))
            if progress is not None:
                progress(steps, force)
            positions = minimizer.positions(state)
            if pending and fmax < force <= self.newton_switch:
                pending = False
                newton, neighbors = self._finish(params, positions, neighbors, fmax)
                spent += newton.evaluations
                if progress is not None:
                    progress(steps, newton.force)
                if newton.converged:
                    positions, force, energy = newton.positions, newton.force, newton.energy
                    diverged = divergence(steps, energy, force, positions, initial_energy, lowest)
                    break
                if newton.iterations:
                    # The first-order minimiser starts afresh where Newton's steps ended.
                    spent += int(minimizer.evaluations(state, steps - base))
                    base = steps
                    state, neighbors = self._start(newton.positions, neighbors, params)
                    while neighbors is not None and host_overflowed(neighbors):
                        neighbors = pair_list.grow(newton.positions, neighbors)
                        state, neighbors = self._start(newton.positions, neighbors, params)
                # Else it goes on from its own state, now to fmax.
                continue
            # The compiled loop stops before its cap only when it converged or the force is not
            # finite; whatever stopped it (even an fmax that nothing satisfies), this loop ends.
            done = steps < cap or steps >= max_steps
            # The energy (a pass over all pairs) is checked every CHUNK_STEPS steps, not after
            # every short chunk of a large system.
            if done or steps - checked >= CHUNK_STEPS or not np.isfinite(force):
                energy = float(self._energy(positions, params))
                diverged = divergence(steps, energy, force, positions, initial_energy, lowest)
                lowest, checked = min(lowest, energy), steps
            if diverged or done:
                break
        if pair_list is not None and not newton.converged:
            # The minimiser's last force used the list of the step before; this one is exact
            # (and is checked for finiteness again). Newton's forces are exact already.
            force = float(self._max_force(positions, params))
            diverged = diverged or divergence(steps, energy, force, positions, initial_energy, lowest)
        converged = not diverged and force <= fmax and not energy_rose(initial_energy, energy)
        return RelaxResult(
            positions=np.asarray(positions),
            energy=energy,
            max_force=force,
            steps=steps,
            converged=converged,
            wall_time=time.perf_counter() - start,
            minimizer=self.name,
            fmax=fmax,
            initial_energy=initial_energy,
            diverged=bool(diverged),
            reason=diverged or stop_reason(converged, initial_energy, energy, force, fmax, steps),
            force_evaluations=spent + int(minimizer.evaluations(state, steps - base)),
            newton_iterations=newton.iterations,
            newton=newton.describe(self.name),
            contact_changes=newton.contact_changes,
        )

    def _finish(self, params, x, neighbors, fmax: float) -> tuple[NewtonReport, Any]:
        """The Newton finish from ``x`` and the contacts it changed, with the neighbour list it
        used (grown if it overflowed at ``x``)."""
        out, refreshed = self._newton(x, neighbors, params, fmax)
        while refreshed is not None and host_overflowed(refreshed):
            neighbors = self.system.pair_list.grow(x, neighbors)
            out, refreshed = self._newton(x, neighbors, params, fmax)
        iterations = int(out.iterations)
        changes = 0
        if iterations:
            changes = int(np.sum(self.system.contact_changes(x, params, out.position, params)))
        report = NewtonReport(
            positions=out.position,
            force=host_max_force(out.force),
            energy=float(out.energy),
            iterations=iterations,
            cg_iterations=int(out.cg_iterations),
            evaluations=int(out.evaluations),
            status=int(out.status),
            contact_changes=changes,
        )
        return report, refreshed


@dataclass(frozen=True)
class NewtonReport:
    """What a Newton finish inside :meth:`Relaxer.relax` did (``status`` -1: none ran)."""

    positions: Any = None
    force: float = float("nan")
    energy: float = float("nan")
    iterations: int = 0
    cg_iterations: int = 0
    evaluations: int = 0
    status: int = -1
    contact_changes: int = 0

    @property
    def converged(self) -> bool:
        return self.status == CONVERGED

    def describe(self, minimizer: str) -> str:
        """One sentence for :attr:`RelaxResult.newton`."""
        if self.status < 0:
            return ""
        steps = f"{self.iterations} Newton steps, {self.cg_iterations} CG iterations"
        if self.converged:
            return f"converged: {steps}"
        return f"{STATUS[self.status]} ({steps}); {minimizer} went on"


def relax(system: System, params: dict | None = None, x0=None, progress=None) -> RelaxResult:
    """Relax ``system`` once (see :class:`Relaxer` to relax the same system many times)."""
    return Relaxer(system).relax(params=params, x0=x0, progress=progress)
