"""A Newton–CG finish for an almost-relaxed state: H Δx = F by deflated CG, then a line search.

Near a minimum a first-order minimiser converges linearly at a rate set by the Hessian's
condition number, while Newton's method converges quadratically. :func:`newton_finish` takes
Newton steps from a state that a first-order minimiser has brought close to a minimum:

* the step solves H Δx = F (F = −∇ₓE) by conjugate gradients on the complement of the system's
  null space (:meth:`mdsens.system.System.nullspace`: rigid translations, rotations of a free
  cluster, every degree of freedom of the rattlers), from Hessian-vector products
  (:func:`mdsens.implicit.hessian_matvec`), deflated as :func:`mdsens.implicit.cg` does. It is
  :func:`truncated_cg`, not :func:`mdsens.implicit.cg`, because it must also see what that one
  does not report: a direction of non-positive curvature pᵀHp ≤ 0 met on the way (Steihaug's
  test). A converged solve that met one can still be a descent direction — towards a saddle —
  so the curvature, not the sign of FᵀΔx, decides whether H is positive. CG's tolerance is
  :func:`cg_tolerance` (inexact Newton);
* a backtracking line search (Δx, Δx/2, …) accepts the first step whose energy is below the
  current one by the Armijo fraction of the predicted decrease, or — once the predicted decrease
  is below the energy's round-off, where energies cannot tell two states apart — whose energy is
  not above the current one beyond round-off and whose projected force is smaller. The energy
  therefore never rises by more than round-off;
* it stops, and says why (:data:`STATUS`), when max|F| ≤ fmax (converged), or when it cannot go
  on: CG did not converge, Δx is not a descent direction (ΔxᵀHΔx ≤ 0: H is not positive on the
  complement of the null space, a saddle), the line search failed, the force left is on the null
  space (a rattler still pushed: Newton does not move rattlers), a value is not finite, or the
  iteration cap. Every stop but the first hands the state back to the first-order minimiser.

Force evaluations are counted as :mod:`mdsens.relaxation` counts them, a Hessian-vector product
as two: per iteration one for the linearisation, two per CG iteration, one per line-search trial
(energy and force in one pass). The contact graph behind the rattlers (no force evaluation) is not counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from mdsens.implicit import NullSpace, hessian_matvec, project_out

if TYPE_CHECKING:
    from mdsens.system import System

CONVERGED, RUNNING, CG_FAILED, NOT_DESCENT = 0, 1, 2, 3
LINE_SEARCH_FAILED, NULL_SPACE_FORCE, NOT_FINITE, CAPPED = 4, 5, 6, 7
STATUS = {
    CONVERGED: "converged",
    RUNNING: "running",
    CG_FAILED: "CG did not converge",
    NOT_DESCENT: "not a descent direction (the Hessian is not positive off its null space)",
    LINE_SEARCH_FAILED: "the line search found no lower energy",
    NULL_SPACE_FORCE: "the force left is on the null space (rattlers), which Newton does not move",
    NOT_FINITE: "non-finite energy, force or step",
    CAPPED: "iteration cap reached",
}
"""Why a Newton finish stopped, by status code."""

MAX_ITERATIONS = 20
"""Newton iterations at most: from max|F| ~ 1e-6 quadratic convergence needs two or three."""
LINE_SEARCH_STEPS = 30
"""Halvings of a Newton step before the line search gives up."""
ARMIJO = 1e-4
"""Fraction of the predicted decrease −t Fᵀ Δx that an accepted step must achieve."""
ROUNDOFF = 1e-14
"""Energies closer than this × |E| (and ``ROUNDOFF``) are equal to round-off."""
CG_TARGET = 0.1
"""A step whose CG residual ‖P(F − H Δx)‖ is this fraction of ``fmax`` ends the relaxation when
the energy is quadratic over Δx (see :func:`cg_tolerance`)."""


class NewtonResult(NamedTuple):
    """Where a Newton finish ended.

    Attributes:
        position: (N, d); the start if no step was accepted.
        force: F at ``position``.
        energy: E at ``position``.
        iterations: Newton steps accepted.
        cg_iterations: CG iterations over all steps.
        evaluations: force evaluations (Hessian-vector products as two).
        status: a key of :data:`STATUS`.
    """

    position: jax.Array
    force: jax.Array
    energy: jax.Array
    iterations: jax.Array
    cg_iterations: jax.Array
    evaluations: jax.Array
    status: jax.Array


def _max_norm(v: jax.Array) -> jax.Array:
    return jnp.max(jnp.linalg.norm(v, axis=-1))


class TruncatedCG(NamedTuple):
    """What :func:`truncated_cg` returns: the solution, its iterations, whether the recursive
    residual reached the tolerance, and whether a direction of curvature pᵀHp ≤ 0 was met."""

    x: jax.Array
    iterations: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


def truncated_cg(
    matvec, b: jax.Array, nullspace: NullSpace | jax.Array | None, tol, maxiter: int
) -> TruncatedCG:
    """CG for H x = P b on the complement of ``nullspace``, stopped at the first direction p with
    pᵀHp ≤ 0 (H is then not positive there; x is left where it was).

    The operator is deflated as in :func:`mdsens.implicit.cg`: A = P H P + (I − P), with P the
    projector off the null space. ``tol`` is relative to ‖P b‖; the residual tested is CG's
    recursive one (the caller's line search judges the step itself).
    """

    def op(v):
        pv = project_out(nullspace, v)
        return project_out(nullspace, matvec(pv)) + (v - pv)

    b = project_out(nullspace, b)
    threshold = tol * jnp.linalg.norm(b)

    def cond(state):
        _, _, _, rr, k, negative = state
        return (jnp.sqrt(rr) > threshold) & (k < maxiter) & ~negative

    def body(state):
        x, r, p, rr, k, _ = state
        ap = op(p)
        curvature = jnp.vdot(p, ap)
        negative = ~(curvature > 0)
        step = jnp.where(negative, 0.0, rr / jnp.where(negative, 1.0, curvature))
        x = x + step * p
        r = r - step * ap
        rr_new = jnp.vdot(r, r)
        p = r + (rr_new / rr) * p
        return x, r, p, jnp.where(negative, rr, rr_new), k + 1, negative

    start = (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.zeros((), jnp.int32), jnp.asarray(False))
    x, _, _, rr, k, negative = jax.lax.while_loop(cond, body, start)
    return TruncatedCG(project_out(nullspace, x), k, jnp.sqrt(rr) <= threshold, negative)


def cg_tolerance(force_norm, fmax, forcing: float = 0.5):
    """CG's relative tolerance for a step from a state whose projected force has 2-norm
    ``force_norm``: r^``forcing``, where r = ``CG_TARGET`` × fmax / ``force_norm`` is the
    reduction that would end the relaxation in one step (r within [1e-15, 0.5]; the result
    within [r, 0.5]).

    An inexact Newton method: the next step's force is about the larger of this residual and
    the quadratic remainder. ``forcing`` = 1 solves for the end at once (one step on a
    quadratic energy); the default ½ halves the decades per solve, which costs a step more but
    fewer CG iterations in all where the energy is not quadratic over the step (measured on
    2-D packings of 1024 particles from max|F| = 1e-5 … 1e-7 to 1e-12: 0.6–0.7 × the CG
    iterations of ``forcing`` = 1)."""
    r = jnp.clip(CG_TARGET * fmax / jnp.where(force_norm > 0, force_norm, 1.0), 1e-15, 0.5)
    return jnp.clip(r**forcing, r, 0.5)


def newton_finish(
    system: System,
    max_iterations: int = MAX_ITERATIONS,
    cg_maxiter: int | None = None,
    forcing: float = 0.5,
):
    """``finish(x, params, fmax, neighbors=None) -> NewtonResult``: Newton–CG steps from ``x`` to
    max|F| ≤ fmax.

    Pure and jittable. The null space is the one at ``x`` (the contacts, and with them the
    rattlers, are taken to stay what they are there: :class:`mdsens.relaxation.Relaxer` checks
    that they did). With ``neighbors``, a relaxation's neighbour list brought up to date at
    ``x``, the energy sums over its pairs, and a trial step that takes any particle ``skin / 2``
    or more from the list's reference positions (where the list could miss pairs) is rejected
    like an uphill one. Without it, the system's own E(x, θ) finds its pairs at every x (a cell
    list built from scratch: slower; NaN where that list overflows, which stops with
    ``NOT_FINITE``).

    Args:
        system: the system.
        max_iterations: most Newton steps.
        cg_maxiter: most CG iterations per step (default: 10 × the degrees of freedom).
        forcing: how much of the way to fmax each CG solve goes (see :func:`cg_tolerance`).
    """
    maxiter = 10 * system.positions.size if cg_maxiter is None else cg_maxiter

    def finish(x, params, fmax, neighbors=None) -> NewtonResult:
        if neighbors is None:
            energy_fn = system.energy_fn

            def valid(y):
                return jnp.asarray(True)

        else:
            pairs, reference = neighbors.idx, neighbors.reference_position
            displacement = jax.vmap(system.displacement)

            def energy_fn(y, params):
                return system.pair_energy_fn(y, params, pairs)

            def valid(y):
                moved = jnp.linalg.norm(displacement(y, reference), axis=-1)
                return jnp.max(moved) < system.pair_list.skin / 2

        gradient = jax.grad(energy_fn)
        value_and_gradient = jax.value_and_grad(energy_fn)
        nullspace = system.nullspace(x, params)
        energy, g = value_and_gradient(x, params)
        force = -g

        def status_of(force, energy):
            finite = jnp.isfinite(energy) & jnp.all(jnp.isfinite(force))
            return jnp.where(~finite, NOT_FINITE, jnp.where(_max_norm(force) <= fmax, CONVERGED, RUNNING))

        def newton_step(carry):
            x, force, energy, iterations, cg_total, evaluations, _ = carry
            b = project_out(nullspace, force.ravel())
            b_norm = jnp.linalg.norm(b)
            tol = cg_tolerance(b_norm, fmax, forcing)
            matvec = hessian_matvec(gradient, x, params)
            solved = truncated_cg(matvec, force.ravel(), nullspace, tol, maxiter)
            evaluations = evaluations + 1 + 2 * solved.iterations
            cg_total = cg_total + solved.iterations
            # Fᵀ Δx: the energy's predicted decrease (Δxᵀ H Δx when the solve converged).
            decrease = jnp.vdot(b, solved.x)
            dx = solved.x.reshape(x.shape)
            finite = jnp.all(jnp.isfinite(dx))
            positive = ~solved.negative_curvature & (decrease > 0)
            usable = solved.converged & finite & positive
            status = jnp.where(~finite, NOT_FINITE, jnp.where(~positive, NOT_DESCENT, CG_FAILED))
            floor = ROUNDOFF * jnp.maximum(jnp.abs(energy), 1.0)

            def trial(t):
                y = system.shift(x, t * dx)
                e, g = value_and_gradient(y, params)
                return y, e, -g

            def rejected(state):
                t, y_t, e_t, f_t, k = state
                armijo = e_t <= energy - ARMIJO * t * decrease
                # Below round-off the energy cannot rank the two states; the force can.
                flat = (ARMIJO * t * decrease <= floor) & (e_t <= energy + floor)
                smaller = jnp.linalg.norm(project_out(nullspace, f_t.ravel())) < b_norm
                finite = jnp.isfinite(e_t) & jnp.all(jnp.isfinite(f_t))
                good = finite & valid(y_t) & (armijo | (flat & smaller))
                return ~good & (k < LINE_SEARCH_STEPS)

            def halve(state):
                t, _, _, _, k = state
                y, e, f = trial(t / 2)
                return t / 2, y, e, f, k + 1

            def search():
                y, e, f = trial(1.0)
                t, y, e, f, k = jax.lax.while_loop(rejected, halve, (1.0, y, e, f, 1))
                accepted = ~rejected((t, y, e, f, 0))
                return y, e, f, accepted, k

            def skip():
                return x, energy, force, jnp.asarray(False), 0

            y, e, f, accepted, trials = jax.lax.cond(usable, search, skip)
            evaluations = evaluations + trials
            status = jnp.where(usable, jnp.where(accepted, status_of(f, e), LINE_SEARCH_FAILED), status)
            # A projected force within fmax with max|F| above it is a pushed rattler.
            stuck = _max_norm(project_out(nullspace, f.ravel()).reshape(x.shape)) <= fmax
            status = jnp.where((status == RUNNING) & stuck, NULL_SPACE_FORCE, status)
            iterations = iterations + accepted.astype(jnp.int32)
            status = jnp.where((status == RUNNING) & (iterations >= max_iterations), CAPPED, status)
            keep = accepted
            return (
                jnp.where(keep, y, x),
                jnp.where(keep, f, force),
                jnp.where(keep, e, energy),
                iterations,
                cg_total,
                evaluations,
                status,
            )

        zero = jnp.zeros((), dtype=jnp.int32)
        start = (x, force, energy, zero, zero, jnp.ones((), jnp.int32), status_of(force, energy))
        out = jax.lax.while_loop(lambda c: c[-1] == RUNNING, newton_step, start)
        return NewtonResult(*out)

    return finish
