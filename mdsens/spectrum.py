"""The lowest eigenvalues of a Hessian with its known zero modes removed: conditioning diagnostics.

Works on any symmetric operator given as a matrix-vector product, like :mod:`mdsens.implicit`.
Small problems are diagonalised densely; large ones use Lanczos (SciPy's ``eigsh``, ARPACK) on
the operator P H P + c (I − P), where P removes the null space and the shift c, above the
largest eigenvalue, moves the removed directions out of the way.

What the numbers say: a negative eigenvalue means the state is a saddle point, not a minimum
(the derivative is then that of an unstable state); a near-zero eigenvalue beyond the removed
modes is a soft or zero mode the null space misses (a rattler, a free rotation), along which the
derivative is ill-defined; the ratio of the largest to the smallest eigenvalue magnitude (off the
zero modes) bounds how much the linear solve amplifies errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

from mdsens.implicit import Matvec, NullSpace, project_out

DENSE_SPECTRUM_LIMIT = 1024  # degrees of freedom up to which the operator is diagonalised densely


@dataclass(frozen=True)
class Spectrum:
    """Lowest eigenvalues of the Hessian restricted to the complement of the null space.

    Attributes:
        lowest: the ``k`` lowest eigenvalues, ascending.
        largest: the largest eigenvalue.
        removed: dimension of the null space that was projected out.
        extra_zero_modes: eigenvalues (among ``lowest``) with |λ| ≤ ``zero_tol`` × ``largest``.
        negative: whether an eigenvalue is below −``zero_tol`` × ``largest`` (a saddle point).
        method: ``dense``, ``lanczos``, or ``none`` when the null space is everything.
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
            scipy.sparse.linalg.eigsh(operator, k=k, which="SA", tol=1e-6, return_eigenvectors=False)
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
