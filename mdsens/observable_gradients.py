"""Total derivatives of observables of a relaxed state: dq/dθ = ∂q/∂θ + ∂q/∂x · dx*/dθ.

Two ways to the same numbers (:mod:`mdsens.implicit`):

* reverse (adjoint) mode: one linear solve H w = −P ∂q/∂x per observable gives its derivative by
  *every* parameter at once, per-particle values included (N diameters cost one solve);
* forward mode: one solve per parameter gives dx*/dθ, which serves every observable (and costs
  nothing more when the sensitivities are already solved).

:func:`observable_gradients` counts the solves each would need and takes the cheaper. The zero
modes are removed as for every derivative here: the cotangent ∂q/∂x is projected off the null
space (rigid motions, rattlers), so an observable that moves with a rattler or a translation is
differentiated as if those stood still, which is what the forward dx*/dθ says too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.observables import Observable
from mdsens.parameters import directional, per_particle_name, unit_tangent
from mdsens.potentials import ATOM
from mdsens.sensitivity import linear_solve_from_recipe, optimality_fn
from mdsens.system import System

MODES = ("auto", "forward", "reverse")


@dataclass(frozen=True)
class ObservableGradient:
    """One observable at a relaxed state and its derivatives.

    Attributes:
        name: the observable's name.
        value: q(x*, θ).
        units: its units.
        gradient: dq/dθ (total) by scalar parameter name.
        explicit: ∂q/∂θ alone (the part at fixed positions), by the same names.
        per_particle: for each per-particle parameter (``diameter``), the (N,) array of
            dq/d(diameter[i]); empty unless asked for.
        iterations, residual, converged: the adjoint solve's diagnostics (reverse mode; in
            forward mode those of the sensitivities' solves are reported with them: 0, 0, True).
        rattler_dependence: |∂q/∂x| on rattlers' coordinates, which the derivative ignores
            (their positions are not determined): nonzero means q depends on a rattler.
    """

    name: str
    value: float
    units: str
    gradient: dict[str, float]
    explicit: dict[str, float]
    per_particle: dict[str, np.ndarray]
    iterations: int
    residual: float
    converged: bool
    rattler_dependence: float

    @property
    def warnings(self) -> list[str]:
        """What a user should know about this derivative (its dependence on rattlers)."""
        if self.rattler_dependence == 0:
            return []
        return [
            f"{self.name} depends on the positions of rattlers (|∂q/∂x| = {self.rattler_dependence:.3g}"
            " on their coordinates), which are not determined: their motion is left out of dq/dθ"
        ]


@dataclass(frozen=True)
class ObservableResult:
    """Observables and their gradients at one state, and how they were computed.

    ``mode`` is ``reverse`` or ``forward``; ``solves`` the linear solves run here; ``reason``
    says why that mode, in a sentence (chosen or asked for, and the solve count of each).
    """

    observables: dict[str, ObservableGradient]
    mode: str
    solves: int
    reason: str
    wall_time: float


def choose_mode(n_observables: int, forward_solves: int, mode: str = "auto") -> str:
    """``reverse`` when it needs fewer linear solves than forward (ties go to forward, whose
    dx*/dθ serve every observable), else ``forward``; or ``mode`` itself when not ``auto``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode != "auto":
        return mode
    return "reverse" if n_observables < forward_solves else "forward"


def _adjoint_solve(system: System, solver: str | None):
    """The linear solve of the adjoint system. No absolute tolerance: the cotangent ∂q/∂x has the
    units of q per length, not of a force, so the forward solve's noise floor does not apply."""
    settings = system.recipe["sensitivity"]
    solver = settings["solver"] if solver is None else solver
    if solver == "dense":
        return implicit.dense()
    return implicit.cg(tol=settings["tol"], maxiter=settings["maxiter"] or None)


# Compiled once per (system, solver) or (observable): a System and an Observable hash by identity.
def _tangent(system: System, solver: str | None, x, params, tangent):
    linear_solve = linear_solve_from_recipe(system, solver)
    return implicit.root_jvp(optimality_fn(system), x, params, tangent, linear_solve, system.nullspace)


def _cotangent(system: System, solver: str | None, x, params, q_x):
    adjoint = _adjoint_solve(system, solver)
    return implicit.root_vjp(optimality_fn(system), x, params, q_x, adjoint, system.nullspace)


def _value_and_grads(observable: Observable, x, params):
    return jax.value_and_grad(observable.fn, argnums=(0, 1))(x, params)


def _rattler_rows(system: System, x, params):
    """(N, d) mask of the coordinates the null space removes one by one: the rattlers'."""
    return system.nullspace(x, params).mask.reshape(x.shape)


_tangent_jit = jax.jit(_tangent, static_argnums=(0, 1))
_cotangent_jit = jax.jit(_cotangent, static_argnums=(0, 1))
_value_and_grads_jit = jax.jit(_value_and_grads, static_argnums=0)
# Compiled: outside jit the null space is seconds of single operations (and gathers at the
# neighbour list's padding, out of range, fail).
_rattler_rows_jit = jax.jit(_rattler_rows, static_argnums=0)


def observable_gradients(
    system: System,
    x,
    params: dict,
    observables: list[Observable],
    names: list[str],
    *,
    dx: dict[str, np.ndarray] | None = None,
    solver: str | None = None,
    mode: str = "auto",
) -> ObservableResult:
    """Each observable's value and total derivative by every parameter in ``names``, at the
    relaxed state ``x``.

    Args:
        system: the system (its neighbour list must cover ``params`` and ``x``; see
            :meth:`mdsens.system.System.for_params`).
        x: relaxed positions (N, d).
        params: θ; with per-particle offsets (:func:`mdsens.parameters.with_per_particle`) the
            gradient by every particle's own value is returned in ``per_particle``.
        observables: what to differentiate.
        names: scalar parameter names (expanded: ``diameter.B``, not ``diameter``).
        dx: dx*/dθ already solved, by name (forward mode reuses them: no new solve).
        solver: ``cg`` or ``dense`` (default: the recipe's).
        mode: ``auto`` (the fewer solves), ``forward`` or ``reverse``.

    Raises:
        FloatingPointError: an observable or derivative is not finite, or a solve did not converge.
    """
    start = time.perf_counter()
    x = jnp.asarray(x, dtype=jnp.float64)
    dx = dict(dx or {})  # forward mode adds the solves it runs; the caller's dict is left alone
    per_particle = list(params.get(ATOM, {}))
    forward_solves = sum(name not in dx for name in names) + system.n_particles * len(per_particle)
    chosen = choose_mode(len(observables), forward_solves, mode)
    counts = (
        f"{len(observables)} adjoint solve(s), one per observable, against {forward_solves} forward"
        " solve(s), one per parameter whose dx*/dθ is not yet solved"
    )
    why = "the fewer solves" if mode == "auto" else "as asked"
    reason = f"{chosen} mode, {why}: {counts}"
    rattler_rows = np.asarray(_rattler_rows_jit(system, x, params), dtype=bool)
    tangents = {name: unit_tangent(system, name, params) for name in names}
    solves = 0
    if chosen == "forward":
        for name in names:
            if name not in dx:
                solved, info = _tangent_jit(system, solver, x, params, tangents[name])
                _require(bool(info.converged), f"the linear solve for dx*/d{name}", info)
                dx[name] = np.asarray(solved)
                solves += 1
        for key in per_particle:
            for i in range(system.n_particles):
                name = per_particle_name(key, i)
                solved, info = _tangent_jit(system, solver, x, params, unit_tangent(system, name, params))
                _require(bool(info.converged), f"the linear solve for dx*/d{name}", info)
                dx[name] = np.asarray(solved)
                solves += 1
    out = {}
    for observable in observables:
        value, (q_x, q_theta) = _value_and_grads_jit(observable, x, params)
        value = float(value)
        if not np.isfinite(value) or not np.all(np.isfinite(np.asarray(q_x))):
            raise FloatingPointError(f"observable {observable.name} is not finite at this state")
        explicit = {name: directional(q_theta, tangents[name]) for name in names}
        if chosen == "reverse":
            theta_bar, info = _cotangent_jit(system, solver, x, params, q_x)
            _require(bool(info.converged), f"the adjoint solve for {observable.name}", info)
            solves += 1
            total = jax.tree_util.tree_map(jnp.add, q_theta, theta_bar)
            gradient = {name: directional(total, tangents[name]) for name in names}
            by_particle = {key: np.asarray(total[ATOM][key]) for key in per_particle}
            diagnostics = (int(info.iterations), float(info.residual), bool(info.converged))
        else:
            q_flat = np.asarray(q_x)
            gradient = {name: explicit[name] + float(np.vdot(q_flat, dx[name])) for name in names}
            by_particle = {
                key: np.array(
                    [
                        float(q_theta[ATOM][key][i]) + float(np.vdot(q_flat, dx[per_particle_name(key, i)]))
                        for i in range(system.n_particles)
                    ]
                )
                for key in per_particle
            }
            diagnostics = (0, 0.0, True)
        numbers = list(gradient.values()) + [float(np.sum(np.abs(v))) for v in by_particle.values()]
        if not np.all(np.isfinite(numbers)):
            raise FloatingPointError(f"the derivative of {observable.name} is not finite")
        out[observable.name] = ObservableGradient(
            name=observable.name,
            value=value,
            units=observable.units,
            gradient=gradient,
            explicit=explicit,
            per_particle=by_particle,
            iterations=diagnostics[0],
            residual=diagnostics[1],
            converged=diagnostics[2],
            rattler_dependence=float(np.linalg.norm(np.asarray(q_x)[rattler_rows])),
        )
    return ObservableResult(out, chosen, solves, reason, time.perf_counter() - start)


def _require(ok: bool, what: str, info) -> None:
    if not ok:
        raise FloatingPointError(
            f"{what} did not converge: relative residual {float(info.residual):.3g} after"
            f" {int(info.iterations)} iterations (try --solver dense, or relax to a smaller fmax)"
        )
