"""Inverse design: the parameters θ whose relaxed structure x*(θ) minimises a loss L(x*(θ), θ).

A bilevel optimisation. The inner problem is the relaxation (:class:`mdsens.relaxation.Relaxer`),
warm-started from the previous outer step's x*, or started every time from fixed positions: the
system's initial ones (``start="initial"``: x*(θ) is then the map that relaxed the system), or
any structure, typically the target's (``start=target``: at the target's parameters the target
is already a minimum, and x*(θ) reaches it continuously as θ nears them, so the target's basin
in θ is wide where the initial positions' is narrow; docs/design.md measures both).

The outer gradient dL/dθ is the implicit reverse-mode one at the relaxed state
(:func:`mdsens.implicit.root_vjp`): one adjoint solve per outer step, whatever the number of
parameters (every particle's diameter included), and the minimiser's steps are never
differentiated or stored. The outer optimiser is optax's L-BFGS or Adam; the losses are
:mod:`mdsens.design_losses`'s, or any traceable function.

Design variables live in a transformed space that keeps every value positive: z = log θ for each
named parameter (``diameter.B``, ``sigma``, ``epsilon``), and z_i = log of particle i's own value
for per-particle parameters (whose offset θ['atom'][key][i] is then exp(z_i) − the species
value).

Honest bilevel: every trial step is recorded (:class:`DesignStep`). A trial is rejected, and the
step halved (up to ``max_backtracks`` times), when its inner relaxation or its adjoint solve does
not converge, when it jumped to another basin, or, for L-BFGS, when the loss rose. A basin jump is
a change of the contact network (:meth:`mdsens.system.System.contact_changes`) together with a
loss that misses its first-order prediction L + ∇L·Δz by more than the predicted change itself:
a contact that forms or breaks on a continuous path of x*(θ) changes the loss smoothly and is
accepted (and recorded), a jump to another minimum is not. Potentials without contacts
(Lennard-Jones, Morse) have no contact network: there a jump is a loss that misses the trapezoid
rule ½(∇L₀ + ∇L₁)·Δz, exact for a quadratic loss, by more than the gradients' own predictions.
Relaxed from a structure of the caller's (``start=`` positions), x*(θ) is one function of θ, and
a jump to a lower loss is accepted (recorded as a jump) with the optimiser's memory reset. A
design never continues from an unconverged inner state: when no step is acceptable it stops and
says why.

A local method reaches only the start's basin: x*(θ) is piecewise smooth, and a target whose
basin in θ the design does not start in is out of reach of any gradient, however exact
(docs/design.md shows one, and how narrow a basin can be).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdsens import implicit
from mdsens.design_losses import Loss
from mdsens.errors import NotConvergedError, UserError
from mdsens.parameters import expand_parameters, parameter_value, per_particle_keys, unit_tangent
from mdsens.potentials import ATOM
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import optimality_fn
from mdsens.system import System

OPTIMIZERS = ("adam", "lbfgs")
STARTS = ("warm", "initial")
# Adam's rate is a step length per log-value (1 %); L-BFGS's scales its quasi-Newton step, whose
# natural length is 1 (a smaller rate shrinks every step and the design crawls).
DEFAULT_RATES = {"adam": 0.01, "lbfgs": 1.0}
# Curvature pairs L-BFGS keeps: with optax's 10 a per-particle design (one variable per particle)
# crawls (the 128-particle packing, 60 steps: the loss from 3.7e-8 to 1.4e-11 with 10, to 8.6e-13
# with 50); the pairs are vectors the size of z, small beside one relaxation.
LBFGS_MEMORY = 50


# --- design variables -----------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "start", "tangents"],
    meta_fields=["system", "names", "per_particle"],
)
@dataclass(frozen=True, eq=False)
class Variables:
    """The design variables z and the parameters θ(z) they stand for.

    A pytree: its arrays (``base``, ``start``, ``tangents``) are leaves and the rest is static, so
    a compiled gradient is reused by every design of the same system, names and shapes.

    Attributes:
        system: the system.
        names: scalar parameter names optimised as log θ (expanded: ``diameter.B``).
        per_particle: species-level parameters optimised per particle (``diameter``), as the log
            of each particle's own value.
        base: θ the design starts from; per-particle offsets present for ``per_particle``.
        start: (P,) the named values in ``base``.
        tangents: the unit direction in θ of each name (:func:`mdsens.parameters.unit_tangent`).
    """

    system: System = field(repr=False)
    names: tuple[str, ...]
    per_particle: tuple[str, ...]
    base: dict = field(repr=False)
    start: jax.Array = field(repr=False)
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
        named = np.log(np.asarray(self.start, dtype=np.float64))
        own = [np.log(np.asarray(self.particle_values(self.base, k))) for k in self.per_particle]
        return jnp.asarray(np.concatenate([named, *own]), dtype=jnp.float64)

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
        for k, tangent in enumerate(self.tangents):
            delta = jnp.exp(z[k]) - self.start[k]
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
    start = jnp.asarray([parameter_value(system, params, name) for name in names], dtype=jnp.float64)
    tangents = tuple(unit_tangent(system, name, params) for name in names)
    out = Variables(system, names, keys, params, start.reshape(len(names)), tangents)
    for name in names:
        if not parameter_value(system, params, name) > 0:
            raise UserError(
                f"{name} = {parameter_value(system, params, name)}: designs keep values positive (log scale)"
            )
    for key in keys:
        if not np.all(np.asarray(out.particle_values(params, key)) > 0):
            raise UserError(f"per-particle {key}: every particle's value must be positive")
    return out


# --- the outer loop -------------------------------------------------------------------------------


def _adjoint_solve(system: System) -> implicit.LinearSolve:
    """The recipe's linear solve without an absolute tolerance: the adjoint's right-hand side
    ∂L/∂x has the units of the loss per length, not of a force, so the forward solve's noise
    floor (:func:`mdsens.sensitivity.solve_atol`) does not apply; with it, a small cotangent near
    the optimum would be dropped and the gradient reported as exactly zero."""
    settings = system.recipe["sensitivity"]
    if settings["solver"] == "dense":
        return implicit.dense()
    return implicit.cg(tol=settings["tol"], maxiter=settings["maxiter"] or None)


@functools.partial(jax.jit, static_argnums=(0, 1))
def value_and_gradient(system: System, loss: Loss, var: Variables, z, x):
    """L(x, θ(z)), dL/dz and the adjoint solve's :class:`mdsens.implicit.SolveInfo`, at a state
    ``x`` relaxed at θ(z) (``var.params(z)``): the outer gradient of one design step.

    dL/dθ = ∂L/∂θ − (∂F/∂θ)ᵀ H⁺ P ∂L/∂x, one solve whatever the number of parameters, pulled
    back to z. The relaxation is the caller's: nothing here iterates the minimiser. ``system``
    must be the relaxation engine's (its neighbour list covers θ(z) and ``x``). Compiled once per
    (system, loss) and variable layout: a System hashes by identity, a loss by its own hash (a
    function: identity), and the variables' arrays are arguments. Raises nothing: check
    ``SolveInfo.converged``.
    """
    params, pullback = jax.vjp(var.params, z)
    value, (loss_x, loss_theta) = jax.value_and_grad(loss, argnums=(0, 1))(x, params)
    theta_bar, info = implicit.root_vjp(
        optimality_fn(system), x, params, loss_x, _adjoint_solve(system), system.nullspace
    )
    (grad,) = pullback(jax.tree_util.tree_map(jnp.add, loss_theta, theta_bar))
    return value, grad, info


_params_jit = jax.jit(lambda var, z: var.params(z))


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
        converged: whether the inner relaxation and the gradient's adjoint solve converged.
        contact_changes: particles whose contacts differ from the last accepted state.
        basin_jump: a jump to another minimum: a contact change with a loss off its first-order
            prediction, or without contacts a loss off the trapezoid rule (rejected, unless it
            lowered the loss of a design relaxed from fixed positions).
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
        converged: stopped on ``tol``, ``gtol`` or ``xtol``, or at the loss's floor (not on the
            step count, nor because failed relaxations or basin jumps left no acceptable step).
        steps: accepted outer steps.
        engines: relaxation engines used: one, or more where θ's interaction range outgrew the
            neighbour list (each compiles its relaxation and gradient once).
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
    engines: int
    wall_time: float


class _Failed(Exception):
    """A trial whose inner relaxation or gradient failed."""


def _optimizer(optimizer, learning_rate: float | None) -> tuple[optax.GradientTransformation, bool]:
    """(transformation, monotone): monotone optimisers accept only steps that lower the loss."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        rate = DEFAULT_RATES[optimizer] if learning_rate is None else learning_rate
        if optimizer == "adam":
            return optax.adam(rate), False
        # No zoom line search: its trial points run inside one compiled call, where an inner
        # relaxation that fails aborts the whole update. The backtracking here replaces it.
        return optax.lbfgs(learning_rate=rate, memory_size=LBFGS_MEMORY, linesearch=None), True
    return optimizer, False


def design(
    system: System,
    loss: Loss,
    names: Sequence[str] = (),
    *,
    per_particle: Sequence[str] = (),
    params: dict | None = None,
    x0=None,
    optimizer: str | optax.GradientTransformation = "lbfgs",
    learning_rate: float | None = None,
    steps: int = 50,
    tol: float = 0.0,
    gtol: float = 0.0,
    xtol: float = 1e-10,
    max_step: float = 0.1,
    max_backtracks: int = 8,
    start: str | np.ndarray | jax.Array = "warm",
    relaxer: Relaxer | None = None,
    progress: Callable[[DesignStep], None] | None = None,
) -> DesignResult:
    """Minimise ``loss(x*(θ), θ)`` over the parameters ``names`` (and per-particle values).

    Each outer step: the optimiser proposes a step in z = log θ (cut to ``max_step``); the inner
    relaxation at the new θ gives x*; the trial is accepted unless it fails, jumps basin or (for
    L-BFGS) raises the loss, in which case the step is halved. The gradient at an accepted state
    is the implicit one: one adjoint solve at x*, compiled once per system, loss and variable
    layout (a second design of the same kind reuses it).

    The loop stops, converged, when the loss is at most ``tol``, when ‖dL/dz‖ is at most
    ``gtol``, or when the optimiser's proposed step changes no log-value by more than ``xtol``
    (for L-BFGS, whose step estimates the distance to the minimum, θ is then known to about
    ``xtol`` relative), or when no step larger than ``xtol`` lowers the loss (it is at its
    numerical floor: the inner relaxation's and the target's precision). It stops unconverged
    after ``steps`` accepted steps, or when ``max_backtracks`` halvings find no acceptable step
    for another reason (failed relaxations, basin jumps).

    Args:
        system: the system (its recipe gives the relaxation and the linear solve).
        loss: ``loss(x, params) -> scalar``, traceable by JAX (:mod:`mdsens.design_losses`:
            ``target_loss``, ``observable_loss``, ``user_loss``; or any); hashable (a function is):
            the compiled gradient is cached by it.
        names: ``--param`` names (``diameter`` expands to every species).
        per_particle: species-level parameters to design per particle (``diameter``).
        params: θ to start from (default the system's).
        x0: where the first inner relaxation starts (default the ``start`` positions, else the
            system's; pass a relaxed state at ``params`` to start from it at no cost).
        optimizer: ``lbfgs``, ``adam`` or any optax transformation (used as a first-order one:
            no monotone check).
        learning_rate: Adam's step per log-value (default 0.01); L-BFGS's scale of its
            quasi-Newton step (default 1, its natural length).
        steps: most accepted outer steps.
        tol: stop when the loss is at most this.
        gtol: stop when ‖dL/dz‖ is at most this.
        xtol: stop when a proposed or acceptable step changes no log-value by more than this.
        max_step: largest change of any log-value in one step (0.1: 10 %), the trust region
            every proposed step is cut to.
        max_backtracks: most halvings of one step before the design stops.
        start: ``warm`` (each inner relaxation from the last accepted x*), ``initial`` (from
            the system's initial positions: x*(θ) is then the map that relaxed the system), or
            (N, d) positions to start every relaxation from: the target structure, whose basin
            in θ is wide.
        relaxer: a relaxation engine of ``system`` to reuse.
        progress: called with every trial.

    Raises:
        UserError: bad names or settings.
        NotConvergedError: the starting state cannot be relaxed or differentiated.
    """
    if int(steps) != steps or steps < 1:
        raise UserError(f"the number of outer steps must be a positive integer, not {steps}")
    if (learning_rate is not None and not learning_rate > 0) or not max_step > 0:
        raise UserError("the learning rate and the largest step must be positive")
    if not xtol >= 0 or not gtol >= 0:
        raise UserError("xtol and gtol must be non-negative")
    anchor = None
    if isinstance(start, str):
        if start not in STARTS:
            raise UserError(f"unknown start {start!r}; known: {', '.join(STARTS)}, or positions")
    else:
        anchor = jnp.asarray(start, dtype=jnp.float64)
        if anchor.shape != np.shape(system.positions):
            raise UserError(
                f"start positions of shape {anchor.shape}: the system's are {np.shape(system.positions)}"
            )
    began = time.perf_counter()
    opt, monotone = _optimizer(optimizer, learning_rate)
    var = variables(system, names, per_particle, params)
    relaxer = Relaxer(system) if relaxer is None else relaxer
    engines: set[Relaxer] = set()
    initial_positions = jnp.asarray(system.positions)
    contactless = system.potential.contact_parameter is None

    def evaluate(z, x_start):
        """(loss, gradient, x*, inner steps, engine) at z, relaxed from x_start."""
        p = _params_jit(var, z)
        engine = relaxer.for_params(p, x_start)
        engines.add(engine)
        relaxed = engine.relax(p, x_start)
        if not relaxed.converged:
            raise _Failed(f"inner relaxation did not converge ({relaxed.reason})", relaxed.steps)
        x = jnp.asarray(relaxed.positions)
        value, grad, info = value_and_gradient(engine.system, loss, var, z, x)
        value, grad = float(value), np.asarray(grad)
        if not bool(info.converged):
            raise _Failed(
                f"the adjoint solve did not converge (residual {float(info.residual):.2g} after"
                f" {int(info.iterations)} iterations)",
                relaxed.steps,
            )
        if not (math.isfinite(value) and np.all(np.isfinite(grad))):
            raise _Failed("loss or gradient not finite", relaxed.steps)
        return value, grad, np.asarray(x), relaxed.steps, engine

    history: list[DesignStep] = []

    def record(entry: DesignStep) -> None:
        history.append(entry)
        if progress is not None:
            progress(entry)

    z = var.initial()
    if x0 is not None:
        start_x = jnp.asarray(x0, dtype=jnp.float64)
    else:
        start_x = initial_positions if anchor is None else anchor
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
        if monotone and not np.dot(grad, updates) < 0:
            # Curvature pairs spoilt by the loss's noise (sᵀy ≤ 0) can point L-BFGS uphill:
            # forget them and start again from a scaled gradient step.
            state = opt.init(z)
            updates, new_state = opt.update(jnp.asarray(grad), state, z)
            updates = np.asarray(updates)
        largest = float(np.max(np.abs(updates)))
        if largest <= xtol:
            reason = f"the optimiser's step {largest:.3g} is below xtol {xtol:.3g}; the loss is {value:.3g}"
            done = True
            break
        if largest > max_step:
            updates, largest = updates * (max_step / largest), max_step
        scale, moved, rose = 1.0, False, True
        p_now = _params_jit(var, z)
        for attempt in range(max_backtracks + 1):
            if attempt and scale * largest <= xtol:
                break  # a step this small cannot be told from the loss's rounding
            z_try = z + scale * jnp.asarray(updates)
            step_try = accepted + 1
            if anchor is not None:
                x_from = anchor
            else:
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
                scale, rose = scale / 2, False
                continue
            changes = int(np.sum(eng.system.contact_changes(x, p_now, xt, _params_jit(var, z_try))))
            predicted = float(np.dot(grad, scale * updates))
            if contactless:
                # Trapezoid rule: on a smooth branch the change is ½(∇L₀ + ∇L₁)·Δz up to third
                # order (exactly for a quadratic loss, however large the step); a jump to another
                # minimum is unrelated to the gradients at either end.
                after = float(np.dot(g, scale * updates))
                expected = (predicted + after) / 2
                off = abs(v - value - expected)
                jump = off > max((abs(predicted) + abs(after)) / 2, 1e-8 * max(abs(value), abs(v)))
                why = f"the loss moved {v - value:.3g} against {expected:.3g} from the gradients at both ends"
            else:
                off = abs(v - value - predicted)
                jump = changes > 0 and off > max(abs(predicted), 1e-8 * abs(value))
                why = (
                    f"{changes} particles changed contacts and the loss moved {v - value:.3g}"
                    f" against a first-order {predicted:.3g}"
                )
            gn = float(np.linalg.norm(g))
            if jump and anchor is not None and v < value:
                # Relaxed from a fixed structure, x*(θ) is one function of θ, discontinuous where
                # the relaxation from it changes basin: a lower branch is progress, and its
                # gradient is exact there. The curvature pairs straddle the jump: forget them.
                note = f"basin jump to a lower loss, accepted: {why}"
                record(
                    DesignStep(
                        step_try, attempt, True, v, var.values(z_try), gn, inner, True, changes, True, note
                    )
                )
                z, value, grad, x, state, moved = z_try, v, g, xt, opt.init(z_try), True
                accepted += 1
                break
            if jump:
                note = f"basin jump: {why}"
                # A contact-free "jump" that persists down to steps of xtol is the loss's noise.
                rose = rose and contactless
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
        if moved:
            continue
        if rose and scale * largest <= xtol:
            reason = (
                f"no step larger than xtol {xtol:.3g} lowers the loss {value:.3g}: it is at its"
                " numerical floor"
            )
            done = True
        else:
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
        engines=len(engines),
        wall_time=time.perf_counter() - began,
    )
