"""The generic implicit-differentiation core on problems with closed-form derivatives.

Nothing here knows about particles: three small problems whose derivatives are known exactly,

* a quadratic E = ½xᵀAx − (Bθ)ᵀx (SPD A): x* = A⁻¹Bθ and dx*/dθ = A⁻¹B for every x;
* a ring of springs E = Σ kᵢ(½eᵢ² + ¼eᵢ⁴), eᵢ = x_{i+1} − xᵢ − θᵢ (indices mod n): translation
  invariant, so the Hessian has the zero mode 1/√n and only the minimum-norm derivative exists;
* a coupled cubic F = x³ + Ax − θ: the Jacobian (diag(3x*²) + A)⁻¹ depends on θ.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens  # noqa: F401  (float64)
from mdsens import implicit
from mdsens.implicit import ImplicitSolveError, SolveInfo, implicit_root, root_jvp, root_vjp

LINEAR_SOLVES = {"cg": implicit.cg, "dense": implicit.dense}


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def spd_matrix(key, n: int, low: float, high: float) -> jax.Array:
    """A random symmetric matrix with eigenvalues spread over [low, high]."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return (q * jnp.linspace(low, high, n)) @ q.T


# --------------------------------------------------------------------------------------------
# (a) quadratic plus linear energy


N_Q, P_Q = 6, 3
KEY_A, KEY_B, KEY_T = jax.random.split(jax.random.PRNGKey(0), 3)
A_Q = spd_matrix(KEY_A, N_Q, 1.0, 4.0)
B_Q = jax.random.normal(KEY_B, (N_Q, P_Q))
THETA_Q = jax.random.normal(KEY_T, (P_Q,))
EXACT_Q = np.linalg.solve(np.asarray(A_Q), np.asarray(B_Q))  # dx*/dθ = A⁻¹B


def quadratic_energy(x, theta):
    return 0.5 * x @ A_Q @ x - (B_Q @ theta) @ x


quadratic_F = jax.grad(quadratic_energy)


def gradient_descent(steps: int):
    """x ← x − η∇E, η = 0.2 < 2/λmax: converges for many steps, is far off for a few."""

    def solve(theta, x0):
        return jax.lax.fori_loop(0, steps, lambda _, x: x - 0.2 * quadratic_F(x, theta), x0)

    return solve


def stopped_solve(theta, x0):
    # Exact x*, but through a path whose own derivative is zero.
    del x0
    return jax.lax.stop_gradient(jnp.linalg.solve(A_Q, B_Q @ theta))


def callback_solve(theta, x0):
    # Exact x*, through NumPy: JAX cannot differentiate this at all (pure_callback has no JVP).
    del x0

    def numpy_solve(t):
        return np.linalg.solve(np.asarray(A_Q), np.asarray(B_Q) @ np.asarray(t))

    return jax.pure_callback(numpy_solve, jax.ShapeDtypeStruct((N_Q,), jnp.float64), theta)


QUADRATIC_SOLVERS = {
    "gradient_descent": gradient_descent(500),
    "truncated_gradient_descent": gradient_descent(3),
    "stop_gradient": stopped_solve,
    "pure_callback": callback_solve,
}


@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
@pytest.mark.parametrize("solver_name", list(QUADRATIC_SOLVERS))
def test_quadratic_jacobian_is_inverse_a_times_b(solver_name, solve_name):
    x_star = implicit_root(QUADRATIC_SOLVERS[solver_name], quadratic_F, LINEAR_SOLVES[solve_name]())
    x0 = jnp.zeros(N_Q)
    forward, forward_x0 = jax.jit(jax.jacfwd(x_star, argnums=(0, 1)))(THETA_Q, x0)
    reverse, reverse_x0 = jax.jit(jax.jacrev(x_star, argnums=(0, 1)))(THETA_Q, x0)
    assert forward.shape == reverse.shape == (N_Q, P_Q)
    assert rel_err(forward, EXACT_Q) < 1e-10
    assert rel_err(reverse, EXACT_Q) < 1e-10
    # The initial guess does not influence the (unique) root: its derivative is zero.
    assert np.all(forward_x0 == 0.0)
    assert np.all(reverse_x0 == 0.0)


@pytest.mark.parametrize("solver_name", ["gradient_descent", "stop_gradient", "pure_callback"])
def test_quadratic_forward_value_is_the_solver_output(solver_name):
    x_star = implicit_root(QUADRATIC_SOLVERS[solver_name], quadratic_F)
    assert rel_err(x_star(THETA_Q, jnp.zeros(N_Q)), EXACT_Q @ np.asarray(THETA_Q)) < 1e-12


def test_truncated_solver_is_not_differentiated():
    """Unrolling 3 gradient-descent steps gives (I − (I − ηA)³)A⁻¹B, far from A⁻¹B.

    The implicit derivative depends only on F (the quadratic's Hessian and ∂F/∂θ are constant),
    so it is exact although the solver's output and its own derivative are wrong; this makes
    sure the previous test would notice a differentiated solver.
    """
    solve = QUADRATIC_SOLVERS["truncated_gradient_descent"]
    x0 = jnp.zeros(N_Q)
    unrolled = jax.jacfwd(lambda t: solve(t, x0))(THETA_Q)
    step = np.eye(N_Q) - 0.2 * np.asarray(A_Q)
    assert rel_err(unrolled, (np.eye(N_Q) - np.linalg.matrix_power(step, 3)) @ EXACT_Q) < 1e-12
    assert rel_err(unrolled, EXACT_Q) > 0.1
    assert rel_err(solve(THETA_Q, x0), EXACT_Q @ np.asarray(THETA_Q)) > 0.1
    implicit_jacobian = jax.jacfwd(lambda t: implicit_root(solve, quadratic_F)(t, x0))(THETA_Q)
    assert rel_err(implicit_jacobian, EXACT_Q) < 1e-10


# --------------------------------------------------------------------------------------------
# (b) ring of springs with a translational zero mode


N_R = 5
K_R = jnp.array([1.0, 2.0, 0.5, 1.5, 1.0])
THETA_R = jnp.array([0.3, -0.2, 0.5, 0.1, 0.4])


def ring_strain(x, theta):
    return jnp.roll(x, -1) - x - theta


def ring_energy(x, theta):
    e = ring_strain(x, theta)
    return jnp.sum(K_R * (0.5 * e**2 + 0.25 * e**4))


ring_F = jax.grad(ring_energy)


def ring_solver(theta, x0):
    # Gradient descent; the mean of x is conserved (Σ ∂E/∂xᵢ = 0), so x* is defined by x0.
    return jax.lax.fori_loop(0, 5000, lambda _, x: x - 0.1 * ring_F(x, theta), x0)


def ring_nullspace(x, theta):
    del x, theta
    return jnp.ones((N_R, 1)) / math.sqrt(N_R)


def ring_analytic_jacobian(x_star, theta) -> np.ndarray:
    """Minimum-norm dx*/dθ by hand.

    At the minimum every spring carries the same tension μ = kᵢ(eᵢ + eᵢ³) and Σᵢeᵢ = −Σᵢθᵢ (the
    ring closes). Differentiating: dμ = sᵢ deᵢ with sᵢ = kᵢ(1 + 3eᵢ²), Σ deᵢ = −Σ dθᵢ, so
    dμ = −Σdθ / Σ(1/s). The bond lengths dᵢ = eᵢ + θᵢ move by deᵢ + dθᵢ, xᵢ by their partial
    sums; the translation is then removed.
    """
    e = np.asarray(ring_strain(x_star, theta))
    s = np.asarray(K_R) * (1 + 3 * e**2)
    jacobian = np.zeros((N_R, N_R))
    for k in range(N_R):
        dtheta = np.eye(N_R)[k]
        de = -dtheta.sum() / np.sum(1 / s) / s
        dbond = de + dtheta
        assert abs(dbond.sum()) < 1e-14  # the ring stays closed
        dx = np.concatenate([[0.0], np.cumsum(dbond)[:-1]])
        jacobian[:, k] = dx - dx.mean()
    return jacobian


@pytest.fixture(scope="module")
def ring_state():
    x0 = jnp.linspace(0.0, 1.0, N_R)
    x = ring_solver(THETA_R, x0)
    assert float(jnp.max(jnp.abs(ring_F(x, THETA_R)))) < 1e-14
    return x0, x, ring_analytic_jacobian(x, THETA_R)


def ring_root(solve_name, nullspace=ring_nullspace):
    return implicit_root(ring_solver, ring_F, LINEAR_SOLVES[solve_name](), nullspace)


def test_ring_analytic_jacobian_matches_finite_differences(ring_state):
    # Guards the hand derivation: central differences of the solver itself (translation removed).
    x0, _, analytic = ring_state
    h = 1e-6
    columns = []
    for k in range(N_R):
        step = h * jnp.eye(N_R)[k]
        diff = np.asarray(ring_solver(THETA_R + step, x0) - ring_solver(THETA_R - step, x0))
        columns.append((diff - diff.mean()) / (2 * h))
    assert rel_err(np.stack(columns, axis=1), analytic) < 1e-8


@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
def test_ring_grad_of_non_invariant_observable(solve_name, ring_state):
    x0, _, analytic = ring_state
    x_star = ring_root(solve_name)
    w = jnp.array([1.0, 2.0, -0.5, 3.0, 0.25])  # not translation invariant: Σw ≠ 0
    grad = jax.jit(jax.grad(lambda t: w @ x_star(t, x0)))(THETA_R)
    assert np.all(np.isfinite(grad))
    # The implicit derivative is the minimum-norm one, so d(w·x*)/dθ = (Pw)ᵀ J = wᵀ J.
    assert rel_err(grad, analytic.T @ np.asarray(w)) < 1e-10
    forward = jax.jit(jax.jacfwd(lambda t: x_star(t, x0)))(THETA_R)
    assert rel_err(forward, analytic) < 1e-10
    assert np.max(np.abs(forward.sum(axis=0))) < 1e-12  # no translation component


@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
def test_ring_jvp_vjp_are_adjoint(solve_name, ring_state):
    x0, _, _ = ring_state
    x_star = ring_root(solve_name)

    @jax.jit
    def both(u, v):
        _, jv = jax.jvp(lambda t: x_star(t, x0), (THETA_R,), (v,))
        _, vjp_fn = jax.vjp(lambda t: x_star(t, x0), THETA_R)
        return u @ jv, vjp_fn(u)[0] @ v

    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    for key_u, key_v in zip(keys[::2], keys[1::2], strict=True):
        u = jax.random.normal(key_u, (N_R,)) + 1.0  # cotangent with a translation component
        v = jax.random.normal(key_v, (N_R,))
        u_jv, jtu_v = both(u, v)
        assert abs(float(u_jv) - float(jtu_v)) < 1e-10


def _assert_solve_failed(error: BaseException) -> None:
    assert isinstance(error, ImplicitSolveError) or "linear solve failed" in str(error)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
def test_ring_without_nullspace_raises_instead_of_garbage(solve_name, jit, ring_state):
    """Without the zero mode, the adjoint system for a non-invariant observable is
    inconsistent: the derivative must fail loudly, never return a number."""
    x0, _, _ = ring_state
    x_star = ring_root(solve_name, nullspace=None)
    w = jnp.array([1.0, 2.0, -0.5, 3.0, 0.25])
    grad_fn = jax.grad(lambda t: w @ x_star(t, x0))
    if jit:
        grad_fn = jax.jit(grad_fn)
    with pytest.raises(Exception) as caught:  # noqa: B017  (type depends on jit; checked below)
        jax.block_until_ready(grad_fn(THETA_R))
    _assert_solve_failed(caught.value)


# --------------------------------------------------------------------------------------------
# (c) root_jvp / root_vjp: diagnostics, and agreement with implicit_root


N_C = 4
A_C = spd_matrix(jax.random.PRNGKey(2), N_C, 0.5, 2.0)
THETA_C = jnp.array([0.7, -1.2, 0.3, 2.0])


def cubic_F(x, theta):
    return x**3 + A_C @ x - theta


def cubic_solver(theta, x0):
    # Newton's method (the Jacobian diag(3x²) + A is SPD, the root unique).
    def step(_, x):
        return x - jnp.linalg.solve(jnp.diag(3 * x**2) + A_C, cubic_F(x, theta))

    return jax.lax.fori_loop(0, 50, step, x0)


def cubic_analytic_jacobian(x_star) -> np.ndarray:
    return np.linalg.inv(np.diag(3 * np.asarray(x_star) ** 2) + np.asarray(A_C))


PROBLEMS = {
    # name: (solver, F, nullspace, theta, x0)
    "cubic": (cubic_solver, cubic_F, None, THETA_C, jnp.zeros(N_C)),
    "ring": (ring_solver, ring_F, ring_nullspace, THETA_R, jnp.linspace(0.0, 1.0, N_R)),
}


@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_root_jvp_and_root_vjp_agree_with_implicit_root(problem, solve_name):
    solver, F, nullspace, theta, x0 = PROBLEMS[problem]
    linear_solve = LINEAR_SOLVES[solve_name]()
    x_star = implicit_root(solver, F, linear_solve, nullspace)
    x = solver(theta, x0)
    n = x.size
    key_v, key_u = jax.random.split(jax.random.PRNGKey(3))
    v = jax.random.normal(key_v, (n,))
    u = jax.random.normal(key_u, (n,)) + 0.5  # not orthogonal to the ring's zero mode

    tangent, info = jax.jit(root_jvp, static_argnums=(0, 4, 5))(F, x, theta, v, linear_solve, nullspace)
    assert isinstance(info, SolveInfo)
    assert bool(info.converged)
    assert float(info.residual) < 1e-10
    assert int(info.iterations) >= 1
    if solve_name == "dense":
        assert int(info.iterations) == n
    _, expected_tangent = jax.jit(lambda v: jax.jvp(lambda t: x_star(t, x0), (theta,), (v,)))(v)
    assert rel_err(tangent, expected_tangent) < 1e-12

    cotangent, info = jax.jit(root_vjp, static_argnums=(0, 4, 5))(F, x, theta, u, linear_solve, nullspace)
    assert bool(info.converged)
    assert float(info.residual) < 1e-10
    expected_cotangent = jax.jit(lambda u: jax.vjp(lambda t: x_star(t, x0), theta)[1](u)[0])(u)
    assert rel_err(cotangent, expected_cotangent) < 1e-12

    if problem == "cubic":
        jacobian = cubic_analytic_jacobian(x)
    else:
        jacobian = ring_analytic_jacobian(x, theta)
    assert rel_err(tangent, jacobian @ np.asarray(v)) < 1e-10
    assert rel_err(cotangent, jacobian.T @ np.asarray(u)) < 1e-10


def test_root_vjp_without_nullspace_reports_failure():
    # The diagnostics of an inconsistent adjoint solve say so (root_vjp does not raise itself).
    x = ring_solver(THETA_R, jnp.zeros(N_R))
    u = jnp.ones(N_R)  # pure translation: entirely outside the Hessian's range
    _, info = root_vjp(ring_F, x, THETA_R, u, implicit.dense(), None)
    assert not bool(info.converged)
    assert float(info.residual) > 0.5


@pytest.mark.parametrize(
    "scale, zero", [(0.0, True), (1e-9, True), (1e-6, False)], ids=["0", "noise", "signal"]
)
@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
def test_a_right_hand_side_below_atol_is_an_exact_zero_not_a_failed_solve(solve_name, scale, zero):
    """‖b‖ ≤ atol: v = 0 exactly, 0 iterations, residual 0, accepted, ``exactly_zero``; above
    atol a real solve runs (before: 0 iterations reported with residual 1, like a failure)."""
    atol = 1e-8
    b = scale * jnp.ones(N_Q) / jnp.sqrt(N_Q)
    v, info = LINEAR_SOLVES[solve_name](atol=atol)(lambda u: A_Q @ u, b, None)
    assert bool(info.exactly_zero) is zero and bool(info.converged)
    assert float(info.rhs_norm) == pytest.approx(scale, rel=1e-12)
    if zero:
        assert not np.any(np.asarray(v)) and int(info.iterations) == 0 and float(info.residual) == 0.0
    else:
        # Solved to the absolute tolerance it was given (up to the accepted slack).
        assert np.linalg.norm(np.asarray(A_Q @ v - b)) <= implicit.RESIDUAL_SLACK * atol
        assert int(info.iterations) >= 1


# --------------------------------------------------------------------------------------------
# (d) jax.vmap and jax.jit compose


def test_vmap_and_jit_compose():
    x_star = implicit_root(cubic_solver, cubic_F)
    x0 = jnp.zeros(N_C)
    thetas = jnp.stack([THETA_C, 0.5 * THETA_C + 1.0, 2 * THETA_C, THETA_C[::-1]])

    values = jax.jit(jax.vmap(x_star, in_axes=(0, None)))(thetas, x0)
    assert float(jnp.max(jnp.abs(jax.vmap(cubic_F)(values, thetas)))) < 1e-12
    expected = np.stack([cubic_analytic_jacobian(x) for x in values])

    jacfwd = jax.jit(jax.vmap(jax.jacfwd(x_star), in_axes=(0, None)))(thetas, x0)
    jacrev = jax.vmap(jax.jit(jax.jacrev(x_star)), in_axes=(0, None))(thetas, x0)
    assert jacfwd.shape == (4, N_C, N_C)
    assert rel_err(jacfwd, expected) < 1e-10
    assert rel_err(jacrev, expected) < 1e-10
    # The Jacobians really depend on θ here, so a batched rule that mixed them up would show.
    assert rel_err(expected[1], expected[0]) > 0.1

    c = jnp.array([1.0, -2.0, 0.5, 3.0])
    grads = jax.jit(jax.vmap(jax.grad(lambda t: c @ x_star(t, x0))))(thetas)
    assert rel_err(grads, np.einsum("bij,i->bj", expected, np.asarray(c))) < 1e-10


@pytest.mark.parametrize("solve_name", list(LINEAR_SOLVES))
def test_vmap_with_nullspace(solve_name):
    x_star = ring_root(solve_name)
    x0 = jnp.linspace(0.0, 1.0, N_R)
    thetas = jnp.stack([THETA_R, 2 * THETA_R, THETA_R[::-1]])
    w = jnp.array([1.0, 2.0, -0.5, 3.0, 0.25])
    grads = jax.jit(jax.vmap(jax.grad(lambda t: w @ x_star(t, x0))))(thetas)
    for theta, grad in zip(thetas, grads, strict=True):
        analytic = ring_analytic_jacobian(ring_solver(theta, x0), theta)
        assert rel_err(grad, analytic.T @ np.asarray(w)) < 1e-10
