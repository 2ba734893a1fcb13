"""The lowest eigenvalues of a Hessian with its known zero modes removed: conditioning diagnostics.

Works on any symmetric operator given as a matrix-vector product, like :mod:`mdsens.implicit`.
Small problems are diagonalised densely; large ones use Lanczos (SciPy's ``eigsh``, ARPACK) on
the operator P H P + c (I − P), where P removes the null space and the shift c, above the
largest eigenvalue, moves the removed directions out of the way. :func:`lowest_mode` is the
cheap stability verdict: only the lowest eigenpair, by plain Lanczos on P H P, at the cost of
about two linear solves (ARPACK's four lowest to 1e-6 cost far more: restarts with a small
basis, and eigenvalues clustered near zero against a spectrum that spans 10⁴).

What the numbers say: a negative eigenvalue means the state is a saddle point, not a minimum
(the derivative is then that of an unstable state); a near-zero eigenvalue beyond the removed
modes is a soft or zero mode the null space misses (a rattler, a free rotation), along which the
derivative is ill-defined; the ratio of the largest to the smallest eigenvalue magnitude (off the
zero modes) bounds how much the linear solve amplifies errors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from mdsens.implicit import Matvec, NullSpace, project_out

DENSE_SPECTRUM_LIMIT = 1024  # degrees of freedom up to which the operator is diagonalised densely
# Krylov basis size of ARPACK's restarted Lanczos for the k lowest: its default 2k + 1 restarts
# so often that the eigenvalues clustered near zero take many times longer to converge.
LANCZOS_BASIS = 64


def lanczos_basis(k: int, n: int) -> int:
    """ARPACK's ``ncv`` for the ``k`` lowest of an operator of size ``n``: :data:`LANCZOS_BASIS`,
    at least 2k + 1 (ARPACK's own default), at most n."""
    return min(max(2 * k + 1, LANCZOS_BASIS), n)


# Lanczos steps per compiled call of :func:`lowest_mode`; convergence is checked between calls.
LANCZOS_CHUNK = 64


@dataclass(frozen=True)
class Spectrum:
    """Lowest eigenvalues of the Hessian restricted to the complement of the null space.

    Attributes:
        lowest: the ``k`` lowest eigenvalues, ascending.
        largest: the largest eigenvalue.
        removed: dimension of the null space that was projected out.
        extra_zero_modes: eigenvalues (among ``lowest``) with |λ| ≤ ``zero_tol`` × ``largest``.
        negative: whether an eigenvalue is below −``zero_tol`` × ``largest`` (a saddle point).
        method: ``dense``, ``lanczos`` (ARPACK, the ``k`` lowest), ``lanczos-lowest`` (only the
            lowest, :func:`lowest_mode`), or ``none`` when the null space is everything.
    """

    lowest: list[float]
    largest: float
    removed: int
    extra_zero_modes: int
    negative: bool
    method: str

    @property
    def condition_number(self) -> float:
        """|λ|max / |λ|min over the non-zero eigenvalues: how much the linear solve amplifies errors.

        A ratio of magnitudes, so that it means the same at a saddle point, where the lowest
        eigenvalues are negative. |λ|min is the smallest |λ| in ``lowest`` once its
        ``extra_zero_modes`` are left out (those are zero modes, reported as such); |λ|max is the
        larger of |``largest``| and the largest |λ| in ``lowest``. Only the computed eigenvalues
        count: when ``lowest`` holds only negative ones, a smaller |λ| may lie beyond them and the
        true ratio is larger. ``inf`` when every eigenvalue in ``lowest`` is a zero mode; 1 when
        the null space is everything and no eigenvalue is left.
        """
        if not self.lowest:
            return 1.0
        magnitudes = np.sort(np.abs(self.lowest))[self.extra_zero_modes :]
        if magnitudes.size == 0:
            return float("inf")
        return float(max(abs(self.largest), magnitudes[-1]) / magnitudes[0])


def _removed_dimension(nullspace: NullSpace | jax.Array | None) -> int:
    if nullspace is None:
        return 0
    if isinstance(nullspace, NullSpace):
        columns = np.linalg.norm(np.asarray(nullspace.basis), axis=0) > 0.5
        return int(np.sum(np.asarray(nullspace.mask) > 0.5) + np.sum(columns))
    return int(np.sum(np.linalg.norm(np.asarray(nullspace), axis=0) > 0.5))


def lowest_eigenvalues(
    matvec: Matvec, n: int, nullspace=None, k: int = 4, zero_tol: float = 1e-8
) -> Spectrum:
    """The ``k`` lowest eigenvalues of the symmetric ``matvec`` (size ``n``) off its null space."""
    removed = _removed_dimension(nullspace)
    if removed >= n:
        return Spectrum(
            lowest=[], largest=0.0, removed=removed, extra_zero_modes=0, negative=False, method="none"
        )
    projected = jax.jit(lambda v: project_out(nullspace, matvec(project_out(nullspace, v))))
    k = max(1, min(k, n - removed))
    if n <= DENSE_SPECTRUM_LIMIT:
        matrix = np.asarray(jax.lax.map(projected, jnp.eye(n), batch_size=32))
        values = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        # The projection leaves exactly `removed` zero eigenvalues; drop those closest to zero.
        keep = np.sort(np.argsort(np.abs(values))[removed:])
        values = values[keep]
        lowest, largest, method = values[:k], float(values[-1]), "dense"
    else:
        operator = scipy.sparse.linalg.LinearOperator(
            (n, n), matvec=lambda v: np.asarray(projected(jnp.asarray(v.ravel()))), dtype=np.float64
        )
        largest = float(
            scipy.sparse.linalg.eigsh(operator, k=1, which="LA", tol=1e-4, return_eigenvectors=False)[0]
        )
        shift = 2.0 * largest

        def shifted(v):
            v = jnp.asarray(v.ravel())
            return np.asarray(projected(v) + shift * (v - project_out(nullspace, v)))

        operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=shifted, dtype=np.float64)
        # Diagnostics need a few digits, not machine precision: tol=1e-6 halves the iterations.
        lowest = np.sort(
            scipy.sparse.linalg.eigsh(
                operator, k=k, which="SA", tol=1e-6, ncv=lanczos_basis(k, n), return_eigenvectors=False
            )
        )
        method = "lanczos"
    scale = zero_tol * abs(largest)
    return Spectrum(
        lowest=[float(v) for v in lowest],
        largest=largest,
        removed=removed,
        extra_zero_modes=int(np.sum(np.abs(lowest) <= scale)),
        negative=bool(np.any(lowest < -scale)),
        method=method,
    )


@dataclass(frozen=True)
class LowestMode:
    """The lowest eigenpair of a symmetric operator off its null space, by plain Lanczos.

    What it guarantees: ``value`` is the Rayleigh quotient of the unit vector ``vector`` (in the
    complement of the null space), so the lowest eigenvalue there is at most ``value`` (a
    negative ``value`` proves a saddle), and some eigenvalue lies within ``residual`` of it
    (‖A v − value·v‖, recomputed, not the Lanczos estimate). That this eigenvalue is the lowest
    is not proved: a random start has a component along every eigenvector, and Lanczos reaches
    the extreme one first, but a lower eigenvalue whose component is tiny could be missed.

    Attributes:
        value: vᵀ A v, A the operator projected on the complement of the null space.
        vector: v, (n,), unit norm, orthogonal to the null space.
        residual: ‖A v − value·v‖.
        largest: the largest Ritz value: a lower bound on the largest eigenvalue (converged to a
            few digits long before the lowest one).
        iterations: Lanczos steps (each one operator product; as many again to build ``vector``).
        converged: ``residual`` ≤ ``rtol`` × max(|value|, ``zero_tol`` × ``largest``).
    """

    value: float
    vector: np.ndarray
    residual: float
    largest: float
    iterations: int
    converged: bool


@functools.partial(jax.jit, static_argnums=0)
def _lanczos_chunk(steps: int, matvec: Matvec, nullspace, q_prev, q, beta, y, c):
    """``steps`` Lanczos steps of P ``matvec`` P from (q_prev, q, β), adding Σ cⱼ qⱼ to ``y``
    on the way.

    No reorthogonalisation: the extreme Ritz values still converge (lost orthogonality only
    adds copies of converged ones), and nothing of size steps × n is stored. Rerun with the
    Ritz vector's coefficients ``c``, the same deterministic steps rebuild that vector.
    ``matvec`` is an argument (a ``jax.tree_util.Partial``, as ``jax.linearize`` returns), not a
    closure: its arrays are then the compiled function's inputs, not constants baked into it,
    so one compilation serves every state (and the compilation cache, every run).
    """

    def body(j, state):
        q_prev, q, beta, y, alphas, betas = state
        w = _projected(matvec, nullspace, q)
        alpha = jnp.vdot(q, w)
        w = w - alpha * q - beta * q_prev
        beta_next = jnp.linalg.norm(w)
        # An invariant subspace (β = 0) is exact: the steps after it are never used.
        q_next = w / jnp.where(beta_next > 0, beta_next, 1.0)
        y = y + c[j] * q
        return q, q_next, beta_next, y, alphas.at[j].set(alpha), betas.at[j].set(beta_next)

    zeros = jnp.zeros(steps, dtype=q.dtype)
    return jax.lax.fori_loop(0, steps, body, (q_prev, q, beta, y, zeros, zeros))


def _projected(matvec: Matvec, nullspace, v):
    """P A P v."""
    return project_out(nullspace, matvec(project_out(nullspace, v)))


_projected_jit = jax.jit(_projected)


def lowest_mode(
    matvec: Matvec,
    n: int,
    nullspace=None,
    rtol: float = 1e-3,
    zero_tol: float = 1e-8,
    maxiter: int | None = None,
    seed: int = 0,
) -> LowestMode:
    """The lowest eigenvalue of the symmetric ``matvec`` (size ``n``) off its null space, with its
    eigenvector, by Lanczos on P A P from a random start in the complement of the null space.

    Costs about as many operator products as a CG solve with the same operator (both converge
    at a rate set by the spectrum's spread), twice over: once for the tridiagonal, once to
    rebuild the eigenvector from the same steps. Stops when the Lanczos estimate of the
    residual is below ``rtol`` × max(|λ|, ``zero_tol`` × largest) (an eigenvalue known to
    ``rtol`` relative, or a zero mode at the resolution of :func:`lowest_eigenvalues`), or after
    ``maxiter`` steps (default 10 n); see :class:`LowestMode` for what the answer guarantees.
    Needs n − removed ≥ 1.
    """

    if not isinstance(matvec, jax.tree_util.Partial):
        # Any other callable works too, compiled with what it closes over as constants.
        matvec = jax.tree_util.Partial(matvec)

    def chunk(*state):
        return _lanczos_chunk(LANCZOS_CHUNK, matvec, nullspace, *state)

    start = project_out(nullspace, jax.random.normal(jax.random.PRNGKey(seed), (n,), dtype=jnp.float64))
    start = start / jnp.linalg.norm(start)
    zero = jnp.zeros(n, dtype=jnp.float64)
    cap = 10 * n if maxiter is None else maxiter
    state = (zero, start, jnp.zeros((), dtype=jnp.float64))
    alphas, betas = [], []
    none = jnp.zeros(LANCZOS_CHUNK, dtype=jnp.float64)
    while True:
        *state, _, a, b = chunk(*state, zero, none)
        alphas.append(np.asarray(a))
        betas.append(np.asarray(b))
        alpha, beta = np.concatenate(alphas), np.concatenate(betas)
        # An exhausted Krylov space (β ≈ 0 relative to the operator's scale) ends the recursion.
        scale = np.max(np.abs(alpha)) + np.max(beta)
        broken = np.flatnonzero(beta <= 1e-14 * scale)
        m = int(broken[0]) + 1 if broken.size else alpha.size
        ritz, s = scipy.linalg.eigh_tridiagonal(alpha[:m], beta[: m - 1])
        estimate = beta[m - 1] * abs(s[-1, 0])
        tolerance = rtol * max(abs(ritz[0]), zero_tol * abs(ritz[-1]))
        if broken.size or estimate <= tolerance or alpha.size >= cap:
            break
    # The same steps again, now summing the Ritz vector Σ sⱼ qⱼ.
    coefficients = np.zeros(alpha.size)
    coefficients[:m] = s[:, 0]
    state = (zero, start, jnp.zeros((), dtype=jnp.float64))
    y = zero
    for block in coefficients.reshape(-1, LANCZOS_CHUNK):
        *state, y, _, _ = chunk(*state, y, jnp.asarray(block))
    y = project_out(nullspace, y)
    y = y / jnp.linalg.norm(y)
    ay = _projected_jit(matvec, nullspace, y)
    value = float(jnp.vdot(y, ay))
    residual = float(jnp.linalg.norm(ay - value * y))
    largest = float(ritz[-1])
    return LowestMode(
        value=value,
        vector=np.asarray(y),
        residual=residual,
        largest=largest,
        iterations=m,
        converged=residual <= rtol * max(abs(value), zero_tol * abs(largest)),
    )


def lowest_eigenvalue(mode: LowestMode, nullspace, zero_tol: float = 1e-8) -> Spectrum:
    """The :class:`Spectrum` of one :class:`LowestMode`: a stability verdict (is the Hessian
    positive off its null space, and how far from zero is it) without the ``k`` lowest."""
    scale = zero_tol * abs(mode.largest)
    return Spectrum(
        lowest=[mode.value],
        largest=mode.largest,
        removed=_removed_dimension(nullspace),
        extra_zero_modes=int(abs(mode.value) <= scale),
        negative=mode.value < -scale,
        method="lanczos-lowest",
    )
