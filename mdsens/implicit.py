"""Implicit differentiation of the solution of a root-finding problem F(x, θ) = 0.

This module knows nothing about particles. It takes three swappable parts, in the manner of
JAXopt (Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022):

* a *solver* ``solver(params, x0) -> x*`` (any minimiser or root finder; it is never
  differentiated),
* an *optimality condition* ``optimality_fn(x, params) -> F`` with ``F(x*, θ) = 0`` and
  ``F.shape == x.shape`` (for energy minimisation, F = ∇ₓE),
* a *linear solve* ``linear_solve(matvec, b, basis) -> (x, SolveInfo)`` for the symmetric system
  ∂F/∂x · v = b (the Hessian when F = ∇ₓE),

and an optional *null space* ``nullspace(x, params)``: the directions in which the solution is
not defined (rigid translations of a periodic system, rotations of a free cluster, the degrees of
freedom of rattlers). It is either an array Q of shape ``(x.size, k)`` with orthonormal (or
zero) columns, or a :class:`NullSpace` that also removes whole coordinates through a mask. Zero
columns and a mask keep a fixed shape under ``jit`` when the rank depends on the data.

By the implicit function theorem, ``∂F/∂x · dx* = -∂F/∂θ · dθ``. The derivative returned is the
minimum-norm one: the right-hand side, the solution and the reverse-mode cotangent are all
projected onto the orthogonal complement of the null space. Without the projection of the
cotangent, reverse mode solves an inconsistent system whenever the observable is not invariant
under the null-space motions, and Krylov solvers then return numbers of order 1e18 without
complaint.

:func:`implicit_root` gives a function x*(θ) that supports ``jax.jvp``/``jax.jacfwd`` *and*
``jax.vjp``/``jax.grad``/``jax.jacrev`` (a ``jax.custom_jvp`` whose tangent rule is a
``jax.lax.custom_linear_solve``; JAX derives reverse mode by transposing it). :func:`root_jvp` and
:func:`root_vjp` compute the same derivatives explicitly and also return the solver diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any  # a pytree of arrays
Matvec = Callable[[Array], Array]


class SolveInfo(NamedTuple):
    """Diagnostics of one linear solve ∂F/∂x · v = b.

    Attributes:
        iterations: Krylov iterations used (the matrix size for a dense solve; 0 when
            ``exactly_zero``).
        residual: ‖A v - P b‖ / ‖P b‖, computed afresh from the returned v with the deflated
            operator A = ∂F/∂x + Q Qᵀ and the projector P = I - Q Qᵀ (0 when ``exactly_zero``).
        converged: whether that recomputed residual is accepted: at most
            :data:`RESIDUAL_SLACK` × the solver's tolerance (the larger of ``tol × ‖P b‖`` and
            ``atol``), not the tolerance itself; for :func:`dense`, whose tolerance is
            :data:`DENSE_RESIDUAL`, the same slack applies to ``atol`` only.
        rhs_norm: ‖P b‖, the size of the right-hand side the solve saw.
        exactly_zero: ‖P b‖ ≤ ``atol``: the right-hand side is zero or below the accuracy it is
            known to, so the solution is exactly 0 (CG runs no iteration).
    """

    iterations: Array
    residual: Array
    converged: Array
    rhs_norm: Array
    exactly_zero: Array


# CG stops on its recursively updated residual, which drifts from the true one by rounding: the
# residual recomputed at the returned solution is accepted up to this factor above the tolerance.
RESIDUAL_SLACK = 10.0
# A direct solve has no tolerance of its own; what its pseudo-inverse drops, plus rounding, must
# leave a relative residual below this.
DENSE_RESIDUAL = 1e-8


class ImplicitSolveError(FloatingPointError):
    """The linear solve of an implicit derivative failed; its result would be meaningless."""


def _raise_if_failed(info: SolveInfo, finite) -> None:
    if not (bool(finite) and bool(info.converged)):
        raise ImplicitSolveError(
            f"implicit derivative: linear solve failed (relative residual {float(info.residual):.3g}"
            f" after {int(info.iterations)} iterations, finite={bool(finite)}); the state is not a"
            " converged minimum or the null-space basis misses a zero mode"
        )


LinearSolve = Callable[[Matvec, Array, Any], tuple[Array, SolveInfo]]


class NullSpace(NamedTuple):
    """Directions removed from the solve: coordinates (``mask``) and a basis of other vectors.

    Attributes:
        basis: (n, k), orthonormal or zero columns, each zero on the masked coordinates.
        mask: (n,), 1 for a removed coordinate (a rattler's degree of freedom), else 0.
    """

    basis: Array
    mask: Array


def project_out(nullspace: Array | NullSpace | None, v: Array) -> Array:
    """Remove from the flat vector ``v`` its null-space components (P v, P = I − projector)."""
    if nullspace is None:
        return v
    if isinstance(nullspace, NullSpace):
        v = v * (1 - nullspace.mask)
        nullspace = nullspace.basis
    return v - nullspace @ (nullspace.T @ v)


def _deflate(matvec: Matvec, nullspace: Array | NullSpace | None) -> Matvec:
    # A = P H P + (I − P) is non-singular when the null space holds every zero mode of the
    # symmetric H, and A v = P b has the minimum-norm solution of P H P v = P b (its null-space
    # component is zero). Where the removed directions are true zero modes, P H P = H.
    if nullspace is None:
        return matvec

    def op(v):
        pv = project_out(nullspace, v)
        return project_out(nullspace, matvec(pv)) + (v - pv)

    return op


def _residual_info(
    matvec: Matvec, v: Array, b: Array, rtol: float, atol: float, iterations, zero
) -> SolveInfo:
    """:class:`SolveInfo` from the residual recomputed at the returned solution ``v``: converged
    when it is at most ``max(rtol × ‖b‖, atol)``. Where ``zero`` (the right-hand side is below
    the solve's absolute tolerance and v = 0 by decision) the residual is 0 and no iteration ran."""
    b_norm = jnp.linalg.norm(b)
    r_norm = jnp.linalg.norm(matvec(v) - b)
    relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1.0), r_norm)
    return SolveInfo(
        jnp.where(zero, 0, iterations),
        jnp.where(zero, 0.0, relative),
        zero | (r_norm <= jnp.maximum(rtol * b_norm, atol)),
        b_norm,
        zero,
    )


def cg(tol: float = 1e-12, maxiter: int | None = None, atol: float = 0.0) -> LinearSolve:
    """Matrix-free conjugate gradients on the deflated operator.

    Needs only matrix-vector products (Hessian-vector products for F = ∇ₓE); nothing of size
    n × n is formed. Requires the operator to be symmetric positive semi-definite with its null
    space spanned by ``basis``: at a saddle point or with an incomplete basis CG can stall, which
    shows up as ``converged == False`` and a large residual, never as a silent answer.

    Args:
        tol: target relative residual ‖A v - P b‖ / ‖P b‖ (the iterations stop there; the
            recomputed residual is accepted up to :data:`RESIDUAL_SLACK` × it).
        maxiter: iteration cap; default 10 × the vector length.
        atol: target absolute residual, when larger than ``tol × ‖P b‖``: the accuracy the
            right-hand side itself has. A right-hand side that is pure noise at that level
            (say, residual forces of an almost-relaxed state) then gives 0, not amplified noise.
    """

    def solve(matvec: Matvec, b: Array, basis) -> tuple[Array, SolveInfo]:
        op = _deflate(matvec, basis)
        b = project_out(basis, b)
        cap = 10 * b.size if maxiter is None else maxiter
        b_norm = jnp.linalg.norm(b)
        threshold = jnp.maximum(tol * b_norm, atol)

        def cond(state):
            _, r, _, rr, k = state
            return (jnp.sqrt(rr) > threshold) & (k < cap)

        def body(state):
            x, r, p, rr, k = state
            ap = op(p)
            step = rr / jnp.vdot(p, ap)
            x = x + step * p
            r = r - step * ap
            rr_new = jnp.vdot(r, r)
            p = r + (rr_new / rr) * p
            return x, r, p, rr_new, k + 1

        x0 = jnp.zeros_like(b)
        x, _, _, _, k = jax.lax.while_loop(cond, body, (x0, b, b, jnp.vdot(b, b), 0))
        x = project_out(basis, x)
        # ‖b‖ ≤ atol stops CG before its first iteration with x = 0.
        zero = b_norm <= atol
        return x, _residual_info(op, x, b, RESIDUAL_SLACK * tol, RESIDUAL_SLACK * atol, k, zero)

    return solve


def dense(rcond: float = 1e-12, atol: float = 0.0) -> LinearSolve:
    """Direct solve: the operator is materialised column by column (n matrix-vector products).

    Costs O(n²) memory and O(n³) time; meant for small systems and as a reference. Directions
    whose eigenvalue is below ``rcond`` × the largest are treated as null (pseudo-inverse), so
    near-singular modes outside ``basis`` are dropped rather than amplified; ``residual`` reports
    what that dropped. ``atol`` as for :func:`cg`.
    """

    def solve(matvec: Matvec, b: Array, basis) -> tuple[Array, SolveInfo]:
        op = _deflate(matvec, basis)
        b = project_out(basis, b)
        # Columns in batches: a vmap over all n would hold n matrix-vector products at once.
        matrix = jax.lax.map(op, jnp.eye(b.size, dtype=b.dtype), batch_size=32).T
        matrix = 0.5 * (matrix + matrix.T)
        eigenvalues, vectors = jnp.linalg.eigh(matrix)
        keep = jnp.abs(eigenvalues) > rcond * jnp.max(jnp.abs(eigenvalues))
        inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues, 1.0), 0.0)
        x = project_out(basis, vectors @ (inverse * (vectors.T @ b)))
        # As for CG: a right-hand side below atol is noise, and its solution is 0.
        zero = jnp.linalg.norm(b) <= atol
        x = jnp.where(zero, 0.0, x)
        return x, _residual_info(op, x, b, DENSE_RESIDUAL, RESIDUAL_SLACK * atol, b.size, zero)

    return solve


def hessian_matvec(optimality_fn, x: Array, params: Params) -> Matvec:
    """v ↦ ∂F/∂x · v on flat vectors, linearised once at (x, params)."""
    _, jvp_fn = jax.linearize(lambda y: optimality_fn(y.reshape(x.shape), params).ravel(), x.ravel())
    return jvp_fn


def _basis(nullspace, x: Array, params: Params) -> Array | NullSpace | None:
    return None if nullspace is None else jax.lax.stop_gradient(nullspace(x, params))


def root_jvp(
    optimality_fn: Callable[[Array, Params], Array],
    x: Array,
    params: Params,
    params_dot: Params,
    linear_solve: LinearSolve,
    nullspace: Callable[[Array, Params], Array] | None = None,
) -> tuple[Array, SolveInfo]:
    """Forward mode: dx* = -(∂F/∂x)⁺ ∂F/∂θ · params_dot at a root ``x`` of F(·, params).

    Returns the tangent (shape of ``x``, null-space components removed) and the solve's
    diagnostics. One linear solve per call.
    """
    _, b = jax.jvp(lambda p: optimality_fn(x, p), (params,), (params_dot,))
    basis = _basis(nullspace, x, params)
    v, info = linear_solve(hessian_matvec(optimality_fn, x, params), -b.ravel(), basis)
    return v.reshape(x.shape), info


def root_vjp(
    optimality_fn: Callable[[Array, Params], Array],
    x: Array,
    params: Params,
    x_bar: Array,
    linear_solve: LinearSolve,
    nullspace: Callable[[Array, Params], Array] | None = None,
) -> tuple[Params, SolveInfo]:
    """Reverse mode: θ̄ = -(∂F/∂θ)ᵀ (∂F/∂x)⁺ P x̄ at a root ``x`` of F(·, params).

    ``x_bar`` is the cotangent of x* (for a scalar loss L, ∂L/∂x*); its null-space components are
    projected out first, which is what keeps the adjoint system consistent. One linear solve per
    call, whatever the number of parameters. Returns a pytree shaped like ``params``.
    """
    basis = _basis(nullspace, x, params)
    # ∂F/∂x is symmetric for F = ∇ₓE, so the adjoint system uses the same operator.
    w, info = linear_solve(hessian_matvec(optimality_fn, x, params), -x_bar.ravel(), basis)
    _, vjp_fn = jax.vjp(lambda p: optimality_fn(x, p), params)
    (params_bar,) = vjp_fn(w.reshape(x.shape).astype(x.dtype))
    return params_bar, info


def implicit_root(
    solver: Callable[[Params, Array], Array],
    optimality_fn: Callable[[Array, Params], Array],
    linear_solve: LinearSolve | None = None,
    nullspace: Callable[[Array, Params], Array] | None = None,
) -> Callable[[Params, Array], Array]:
    """Wrap ``solver`` into a function x*(params, x0) differentiable by the implicit function theorem.

    The returned function is ``solver(params, x0)`` on the forward pass; its derivative with
    respect to ``params`` comes from ``optimality_fn`` alone, so the solver's iterations are
    never differentiated or stored (memory does not grow with the number of solver steps), and
    the derivative with respect to the initial guess ``x0`` is zero.

    Both modes work: ``jax.jvp``, ``jax.jacfwd``, ``jax.vjp``, ``jax.grad``, ``jax.jacrev``, and
    ``jax.vmap``/``jax.jit`` around any of them. Limits: the derivative is only as good as the
    root the solver returns (an unconverged x* gives a wrong derivative: the solver must fail
    loudly itself, as :attr:`mdsens.relaxation.Relaxer.solve` does with NaN and an error), the
    operator ∂F/∂x must be symmetric (true for F = ∇ₓE), and second derivatives of x* are not
    supported. The solve's diagnostics are not visible through JAX transformations; use
    :func:`root_jvp`/:func:`root_vjp` when they are needed. A solve that does not converge or
    returns non-finite values raises :class:`ImplicitSolveError` (inside ``jit`` JAX re-raises
    it as a runtime error that carries the same message) instead of returning a wrong number.

    Args:
        solver: ``solver(params, x0) -> x*``; it is called with ``params`` under
            ``lax.stop_gradient``, so it may close over nothing that depends on θ.
        optimality_fn: ``F(x, params)``, zero at the solution, same shape as ``x``.
        linear_solve: see :func:`cg` (default) and :func:`dense`.
        nullspace: ``nullspace(x, params)``: an array Q (``(x.size, k)``, orthonormal or zero
            columns) or a :class:`NullSpace`.
    """
    linear_solve = cg() if linear_solve is None else linear_solve

    @jax.custom_jvp
    def solution(params: Params, x0: Array) -> Array:
        return solver(jax.lax.stop_gradient(params), jax.lax.stop_gradient(x0))

    @solution.defjvp
    def solution_jvp(primals, tangents):
        params, x0 = primals
        params_dot, _ = tangents
        x = solution(params, x0)
        _, b = jax.jvp(lambda p: optimality_fn(x, p), (params,), (params_dot,))
        basis = _basis(nullspace, x, params)
        matvec = hessian_matvec(optimality_fn, x, params)

        def solve(mv, rhs):
            v, info = linear_solve(mv, rhs, basis)
            jax.debug.callback(_raise_if_failed, info, jnp.all(jnp.isfinite(v)))
            return v

        v = jax.lax.custom_linear_solve(matvec, -b.ravel(), solve, symmetric=True)
        return x, v.reshape(x.shape)

    return solution
