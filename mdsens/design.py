"""Inverse design: the parameters θ whose relaxed structure x*(θ) minimises a loss L(x*(θ), θ).

A bilevel optimisation. The inner problem is the relaxation (:class:`mdsens.relaxation.Relaxer`),
warm-started from the previous outer step's x* (or, with ``start="initial"``, from the system's
initial positions every time, so that x*(θ) is the same map that relaxed the system, and a target
relaxed from those positions is reachable). The outer gradient dL/dθ is the implicit reverse-mode
gradient through :func:`mdsens.sensitivity.relaxed_positions_fn`: one adjoint solve per outer
step, whatever the number of parameters (every particle's diameter included). The outer
optimiser is optax's Adam or L-BFGS.

Design variables live in a transformed space that keeps every value positive: z = log θ for each
named parameter (``diameter.B``, ``sigma``, ``epsilon``), and z_i = log of particle i's own value
for per-particle parameters (whose offset θ['atom'][key][i] is then exp(z_i) − the species
value).

Honest bilevel: every trial step is recorded (:class:`DesignStep`). A trial is rejected, and the
step halved (up to ``max_backtracks`` times), when its inner relaxation does not converge (or the
implicit gradient fails), when it jumped to another basin, or, for L-BFGS, when the loss rose.
A basin jump is a change of the contact network (:meth:`mdsens.system.System.contact_changes`)
together with a loss that misses its first-order prediction L + ∇L·Δz by more than the predicted
change itself: a contact that forms or breaks on a continuous path of x*(θ) changes the loss
smoothly and is accepted (and recorded), a jump to another minimum is not. Potentials without
contacts (Lennard-Jones, Morse) have no contact network: their jumps are not detected. A design
never continues from an unconverged inner state: when no step is acceptable it stops and says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdsens.errors import NotConvergedError, UserError
from mdsens.observables import Observable, parse_observable, user_observable
from mdsens.parameters import expand_parameters, parameter_value, per_particle_keys, unit_tangent
from mdsens.potentials import ATOM
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import relaxed_positions_fn
from mdsens.system import System

OPTIMIZERS = ("adam", "lbfgs")
STARTS = ("warm", "initial")
Loss = Callable[[jax.Array, dict], jax.Array]


# --- design variables -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Variables:
    """The design variables z and the parameters θ(z) they stand for.

    Attributes:
        system: the system.
        names: scalar parameter names optimised as log θ (expanded: ``diameter.B``).
        per_particle: species-level parameters optimised per particle (``diameter``), as the log
            of each particle's own value.
        base: θ the design starts from; per-particle offsets present for ``per_particle``.
        start: the named values in ``base``.
        tangents: the unit direction in θ of each name (:func:`mdsens.parameters.unit_tangent`).
    """

    system: System = field(repr=False)
    names: tuple[str, ...]
    per_particle: tuple[str, ...]
    base: dict = field(repr=False)
    start: tuple[float, ...] = field(repr=False)
    tangents: tuple[dict, ...] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.names) + self.system.n_particles * len(self.per_particle)

    def labels(self) -> list[str]:
        """A name per entry of z: the scalar names, then ``diameter[i]`` per particle."""
        return list(self.names) + [
            f"{k}[{i}]" for k in self.per_particle for i in range(self.system.n_particles)
        ]

    def initial(self) -> jax.Array:
        """z of ``base``."""
        named = [math.log(v) for v in self.start]
        own = [np.log(np.asarray(self.particle_values(self.base, k))) for k in self.per_particle]
        return jnp.asarray(np.concatenate([np.asarray(named, dtype=np.float64), *own]), dtype=jnp.float64)

    def particle_values(self, params: dict, key: str) -> jax.Array:
        """(N,) every particle's own value of ``key``: its species value plus its offset."""
        own = params[key][jnp.asarray(self.system.types)]
        offset = params.get(ATOM, {}).get(key)
        return own if offset is None else own + offset

    def params(self, z) -> dict:
        """θ(z), traceable: ``base`` with each named value set to exp(z) and each particle's
        offset set so that its own value is exp(z_i)."""
        p = len(self.names)
        params = self.base
        # Values and directions are fixed numbers computed once: reading them from ``base`` here
        # would stage indexing ops under jit, and parameter_value needs concrete values.
        for k, (value, tangent) in enumerate(zip(self.start, self.tangents, strict=True)):
            delta = jnp.exp(z[k]) - value
            params = jax.tree_util.tree_map(lambda a, t, d=delta: a + d * t, params, tangent)
        n = self.system.n_particles
        atom = dict(params.get(ATOM, {}))
        for j, key in enumerate(self.per_particle):
            species = params[key][jnp.asarray(self.system.types)]
            atom[key] = jnp.exp(z[p + j * n : p + (j + 1) * n]) - species
        return {**params, ATOM: atom} if self.per_particle else params

    def values(self, z) -> dict[str, float]:
        """Named values, and per per-particle key its mean, min and max, for the history."""
        z = np.asarray(z)
        out = {name: float(np.exp(z[k])) for k, name in enumerate(self.names)}
        n, p = self.system.n_particles, len(self.names)
        for j, key in enumerate(self.per_particle):
            own = np.exp(z[p + j * n : p + (j + 1) * n])
            out.update(
                {
                    f"{key}[mean]": float(own.mean()),
                    f"{key}[min]": float(own.min()),
                    f"{key}[max]": float(own.max()),
                }
            )
        return out


def variables(
    system: System, names: Sequence[str] = (), per_particle: Sequence[str] = (), params: dict | None = None
) -> Variables:
    """The design variables for ``--param`` names and ``--per-particle`` selections.

    ``per_particle`` names (``diameter``, ``diameter.B``) select species-level parameters made one
    value per particle (:func:`mdsens.parameters.per_particle_keys`); named values of those
    parameters are then not optimised separately (the particles' values cover them).

    Raises:
        UserError: unknown names, nothing to optimise, or a parameter that is not positive.
    """
    params = system.params if params is None else params
    keys = tuple(per_particle_keys(system, list(per_particle))) if per_particle else ()
    names = tuple(n for n in expand_parameters(system, list(names)) if n.partition(".")[0] not in keys)
    if not names and not keys:
        raise UserError("nothing to design: give --param NAME (repeatable) or --per-particle NAME")
    if keys:
        atom = dict(params.get(ATOM, {}))
        for key in keys:
            atom.setdefault(key, jnp.zeros(system.n_particles, dtype=jnp.float64))
        params = {**params, ATOM: atom}
    start = tuple(parameter_value(system, params, name) for name in names)
    tangents = tuple(unit_tangent(system, name, params) for name in names)
    out = Variables(system, names, keys, params, start, tangents)
    for name in names:
        if not parameter_value(system, params, name) > 0:
            raise UserError(
                f"{name} = {parameter_value(system, params, name)}: designs keep values positive (log scale)"
            )
    for key in keys:
        if not np.all(np.asarray(out.particle_values(params, key)) > 0):
            raise UserError(f"per-particle {key}: every particle's value must be positive")
    return out


# --- objectives -----------------------------------------------------------------------------------


def target_loss(system: System, target: np.ndarray) -> Loss:
    """Mean squared minimum-image displacement of x*(θ) from ``target`` over the non-rattlers,
    after removing the rigid translation (and, for a free cluster, the best rotation: Kabsch).

    Rattlers are those of x*(θ) at each evaluation; their positions are not determined. The
    translation and rotation are minimisers of the same squared distance, so their own
    derivatives do not enter the gradient (envelope theorem): they are held fixed in it.
    """
    target = jnp.asarray(target, dtype=jnp.float64)
    free = system.space_kind == "free"

    def loss(x, params):
        keep = ~jax.lax.stop_gradient(system.rattlers(x, params))
        weight = keep.astype(x.dtype)[:, None]
        count = jnp.maximum(jnp.sum(weight), 1.0)
        d = jax.vmap(system.displacement)(x, target)  # x - target, minimum image
        shift = jax.lax.stop_gradient(jnp.sum(weight * d, axis=0) / count)
        d = d - shift
        if free:
            # Kabsch: the rotation R minimising Σ|a_i − R b_i|² over centred x (a) and target (b).
            a = x - jnp.sum(weight * x, axis=0) / count
            b = target - jnp.sum(weight * target, axis=0) / count
            u, _, vt = jnp.linalg.svd(jax.lax.stop_gradient((weight * b).T @ a))
            v = vt.T
            flip = jnp.sign(jnp.linalg.det(v @ u.T))
            rotation = jax.lax.stop_gradient(v.at[:, -1].multiply(flip) @ u.T)
            d = a - b @ rotation.T
        return jnp.sum(weight * d**2) / count

    return loss


def observable_loss(targets: Sequence[tuple[Observable, float]]) -> Loss:
    """Σ (q(x, θ)/q_target − 1)² over the targets: each observable's squared relative misfit."""

    def loss(x, params):
        return sum((o(x, params) / value - 1.0) ** 2 for o, value in targets)

    return loss


def parse_target_observable(system: System, spec: str) -> tuple[Observable, float]:
    """``NAME=VALUE`` (``pressure=0.05``) → (observable, value).

    Raises:
        UserError: no ``=``, an unknown observable, or a value that is not a nonzero number.
    """
    name, equals, text = spec.rpartition("=")
    if not equals or not name.strip():
        raise UserError(f"--target-observable {spec!r}: give NAME=VALUE (pressure=0.05)")
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--target-observable {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value == 0:
        raise UserError(
            f"--target-observable {spec!r}: the target must be finite and nonzero (relative misfit)"
        )
    return parse_observable(system, name), value


def user_loss(system: System, spec: str) -> Loss:
    """``FILE.py:FUNCTION``, a JAX scalar ``FUNCTION(positions, system, params)``, checked when
    loaded (see :func:`mdsens.observables.user_observable`).

    Raises:
        UserError: no such file or function, or it raises, does not return one real number, or
            cannot be differentiated.
    """
    if ":" not in spec:
        raise UserError(f"--loss {spec!r}: give FILE.py:FUNCTION")
    try:
        return user_observable(system, spec).fn
    except UserError as error:
        raise UserError(f"--loss: {error}") from None


# --- the outer loop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DesignStep:
    """One trial of the outer loop.

    Attributes:
        step: the outer step it tried to make (0: the start).
        attempt: 0 for the optimiser's step, k after k halvings.
        accepted: whether the design moved there.
        loss: L at the trial (NaN where the inner relaxation failed).
        values: parameter values at the trial (:meth:`Variables.values`).
        grad_norm: ‖dL/dz‖ (z the log values) at the trial.
        inner_steps: minimiser steps of its inner relaxation.
        converged: whether the inner relaxation converged (and the gradient's solve succeeded).
        contact_changes: particles whose contacts differ from the last accepted state.
        basin_jump: a contact change with a loss off its first-order prediction (rejected).
        note: why a trial was rejected, or what happened; "" for a plain accepted step.
    """

    step: int
    attempt: int
    accepted: bool
    loss: float
    values: dict[str, float]
    grad_norm: float
    inner_steps: int
    converged: bool
    contact_changes: int
    basin_jump: bool
    note: str = ""


@dataclass(frozen=True)
class DesignResult:
    """The outcome of :func:`design`.

    Attributes:
        params: the final θ (with per-particle offsets when designed per particle).
        positions: x*(θ) at the final θ.
        values: final parameter values by name (per-particle keys: mean, min, max).
        per_particle: (N,) final own values per per-particle key.
        loss: final loss.
        grad_norm: final ‖dL/dz‖.
        history: every trial, in order.
        reason: why the loop stopped, one sentence.
        converged: stopped on ``tol`` or ``gtol``.
        steps: accepted outer steps.
        compilations: how many times the value-and-gradient was compiled (one per neighbour-list
            shape).
        wall_time: seconds, compilation included.
    """

    params: dict
    positions: np.ndarray
    values: dict[str, float]
    per_particle: dict[str, np.ndarray]
    loss: float
    grad_norm: float
    history: list[DesignStep]
    reason: str
    converged: bool
    steps: int
    compilations: int
    wall_time: float


class _Failed(Exception):
    """A trial whose inner relaxation or gradient failed."""


def _optimizer(optimizer, learning_rate: float) -> tuple[optax.GradientTransformation, bool]:
    """(transformation, monotone): monotone optimisers accept only steps that lower the loss."""
    if isinstance(optimizer, str):
        if optimizer == "adam":
            return optax.adam(learning_rate), False
        if optimizer == "lbfgs":
            # No zoom line search: its trial points run inside one compiled call, where an inner
            # relaxation that fails aborts the whole update. The backtracking here replaces it.
            return optax.lbfgs(learning_rate=learning_rate, linesearch=None), True
        raise UserError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return optimizer, False


def design(
    system: System,
    loss: Loss,
    names: Sequence[str] = (),
    *,
    per_particle: Sequence[str] = (),
    params: dict | None = None,
    x0=None,
    optimizer: str | optax.GradientTransformation = "adam",
    learning_rate: float = 0.01,
    steps: int = 50,
    tol: float = 0.0,
    gtol: float = 0.0,
    max_step: float = 0.1,
    max_backtracks: int = 8,
    start: str = "warm",
    relaxer: Relaxer | None = None,
    progress: Callable[[DesignStep], None] | None = None,
) -> DesignResult:
    """Minimise ``loss(x*(θ), θ)`` over the parameters ``names`` (and per-particle values).

    Args:
        system: the system (its recipe gives the relaxation and the linear solve).
        loss: ``loss(x, params) -> scalar``, traceable by JAX (:func:`target_loss`,
            :func:`observable_loss`, :func:`user_loss`, or any).
        names: ``--param`` names (``diameter`` expands to every species).
        per_particle: species-level parameters to design per particle (``diameter``).
        params: θ to start from (default the system's).
        x0: a relaxed state at ``params`` to warm-start from (default: relaxed here from the
            system's positions).
        optimizer: ``adam``, ``lbfgs`` or any optax transformation (used as a first-order one).
        learning_rate: the optimiser's (Adam: step per log-value; L-BFGS: scale of its step).
        steps: most accepted outer steps.
        tol: stop when the loss is at most this.
        gtol: stop when ‖dL/dz‖ is at most this.
        max_step: largest change of any log-value in one step (0.1: 10 %), the trust region
            every proposed step is cut to.
        max_backtracks: most halvings of one step before the design stops.
        start: ``warm`` (each inner relaxation from the last accepted x*) or ``initial`` (from
            the system's initial positions: x*(θ) is then the map that relaxed the system).
        relaxer: a relaxation engine of ``system`` to reuse.
        progress: called with every trial.

    Raises:
        UserError: bad names or settings.
        NotConvergedError: the starting state cannot be relaxed or differentiated.
    """
    if int(steps) != steps or steps < 1:
        raise UserError(f"the number of outer steps must be a positive integer, not {steps}")
    if not learning_rate > 0 or not max_step > 0:
        raise UserError("the learning rate and the largest step must be positive")
    if start not in STARTS:
        raise UserError(f"unknown start {start!r}; known: {', '.join(STARTS)}")
    began = time.perf_counter()
    opt, monotone = _optimizer(optimizer, learning_rate)
    var = variables(system, names, per_particle, params)
    relaxer = Relaxer(system) if relaxer is None else relaxer
    compiled: dict = {}

    def value_and_grad(engine: Relaxer):
        if engine not in compiled:
            x_star = relaxed_positions_fn(engine.system, engine)

            def objective(z, x_start):
                p = var.params(z)
                x = x_star(p, x_start)
                return loss(x, p), x

            compiled[engine] = jax.jit(jax.value_and_grad(objective, has_aux=True))
        return compiled[engine]

    initial_positions = jnp.asarray(system.positions)

    def evaluate(z, x_start):
        """(loss, gradient, x*, inner steps, engine) at z, relaxed from x_start."""
        p = var.params(z)
        engine = relaxer.for_params(p, x_start)
        relaxed = engine.relax(p, x_start)
        if not relaxed.converged:
            raise _Failed(f"inner relaxation did not converge ({relaxed.reason})", relaxed.steps)
        try:
            (value, x), grad = value_and_grad(engine)(z, jnp.asarray(relaxed.positions))
            value, grad = float(value), np.asarray(grad)
        except Exception as error:  # noqa: BLE001 - a failed solve surfaces as a JAX runtime error
            text = str(error).strip().splitlines()
            raise _Failed(
                f"gradient failed: {text[0] if text else type(error).__name__}", relaxed.steps
            ) from None
        if not (math.isfinite(value) and np.all(np.isfinite(grad))):
            raise _Failed("loss or gradient not finite", relaxed.steps)
        return value, grad, np.asarray(x), relaxed.steps, engine

    history: list[DesignStep] = []

    def record(entry: DesignStep) -> None:
        history.append(entry)
        if progress is not None:
            progress(entry)

    z = var.initial()
    start_x = initial_positions if x0 is None else jnp.asarray(x0, dtype=jnp.float64)
    try:
        value, grad, x, inner, _ = evaluate(z, start_x)
    except _Failed as failure:
        raise NotConvergedError(f"the design's starting state: {failure.args[0]}") from None
    record(
        DesignStep(
            0, 0, True, value, var.values(z), float(np.linalg.norm(grad)), inner, True, 0, False, "start"
        )
    )
    state = opt.init(z)
    accepted, reason, done = 0, "", False
    while True:
        gnorm = float(np.linalg.norm(grad))
        if value <= tol:
            reason, done = f"the loss {value:.3g} reached tol {tol:.3g}", True
            break
        if gnorm <= gtol:
            reason, done = f"the gradient norm {gnorm:.3g} reached gtol {gtol:.3g}", True
            break
        if accepted >= steps:
            reason = f"{steps} outer steps taken; the loss is {value:.3g}"
            break
        updates, new_state = opt.update(jnp.asarray(grad), state, z)
        updates = np.asarray(updates)
        largest = float(np.max(np.abs(updates)))
        if largest > max_step:
            updates = updates * (max_step / largest)
        scale, moved = 1.0, False
        p_now = var.params(z)
        for attempt in range(max_backtracks + 1):
            z_try = z + scale * jnp.asarray(updates)
            step_try = accepted + 1
            x_from = x if start == "warm" else initial_positions
            try:
                v, g, xt, inner, eng = evaluate(z_try, x_from)
            except _Failed as failure:
                note, inner_steps = failure.args
                record(
                    DesignStep(
                        step_try,
                        attempt,
                        False,
                        math.nan,
                        var.values(z_try),
                        math.nan,
                        inner_steps,
                        False,
                        0,
                        False,
                        note,
                    )
                )
                scale /= 2
                continue
            changes = int(np.sum(eng.system.contact_changes(x, p_now, xt, var.params(z_try))))
            predicted = float(np.dot(grad, scale * updates))
            off = abs(v - value - predicted)
            jump = changes > 0 and off > max(abs(predicted), 1e-8 * abs(value))
            gn = float(np.linalg.norm(g))
            if jump:
                note = (
                    f"basin jump: {changes} particles changed contacts and the loss moved"
                    f" {v - value:.3g} against a first-order {predicted:.3g}"
                )
            elif monotone and v > value:
                note = f"loss rose from {value:.6g} to {v:.6g}"
            else:
                note = f"{changes} particles changed contacts on a continuous path" if changes else ""
                record(
                    DesignStep(
                        step_try, attempt, True, v, var.values(z_try), gn, inner, True, changes, False, note
                    )
                )
                z, value, grad, x, state, moved = z_try, v, g, xt, new_state, True
                accepted += 1
                break
            record(
                DesignStep(
                    step_try, attempt, False, v, var.values(z_try), gn, inner, True, changes, jump, note
                )
            )
            scale /= 2
        if not moved:
            reason = (
                f"no acceptable step after {max_backtracks} halvings at outer step {accepted + 1}"
                f" (last: {history[-1].note}); the loss is {value:.3g}"
            )
            break
    final = var.params(z)
    return DesignResult(
        params=final,
        positions=x,
        values=var.values(z),
        per_particle={k: np.asarray(var.particle_values(final, k)) for k in var.per_particle},
        loss=value,
        grad_norm=float(np.linalg.norm(grad)),
        history=history,
        reason=reason,
        converged=done,
        steps=accepted,
        compilations=len(compiled),
        wall_time=time.perf_counter() - began,
    )
