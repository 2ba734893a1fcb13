"""How far a parameter can move before the linearisation of the relaxed state stops holding.

Along θ(t) = θ₀ + t·e (e a unit parameter direction, or a whole step Δθ), the relaxed state is
x*(t) ≈ x* + t·dx with dx = dx*/dt from one implicit solve. That line is the derivative of a
smooth branch of minima only while

* **no pair crosses a non-smooth radius** of the potential
  (:meth:`mdsens.potentials.Potential.non_smooth_radii`: the contact distance of soft spheres,
  r_onset·σ and r_cutoff·σ of Lennard-Jones and Morse with a cutoff): the linearised gap
  g(t) = r_ij(x* + t·dx) − R_ij(θ(t)) of every listed pair, radii moving with θ included, is
  followed to its first zero in each direction (t > 0: θ up; t < 0: θ down);
* **the Hessian stays positive** off its null space: each of the lowest eigenvalues λ moves as
  dλ/dt = vᵀ (dH/dt) v, H = ∂²E/∂x² at (x* + t·dx, θ(t)) and v its eigenvector (for a degenerate
  eigenvalue, the eigenvalues of the matrix Vᵀ(dH/dt)V over its eigenvectors V), and reaches
  zero at t = −λ / (dλ/dt), in the direction that lowers it.

The validity radius in each direction is the smaller of the two, with the pair or the mode that
limits it (:class:`Validity`). Pairs with a rattler are not followed: a rattler's position is
not determined, its dx is 0 by convention, and its contacts say nothing about the rigid
network's linearisation. Pairs are those in the system's neighbour list at x* (within the
interaction range × (1 + margin)), or all pairs without a list; the lowest ``k`` eigenvalues
(default 4, as :mod:`mdsens.spectrum` reports) are followed, dense up to
:data:`mdsens.spectrum.DENSE_SPECTRUM_LIMIT` degrees of freedom and by Lanczos (SciPy's
``eigsh``) beyond.

Both criteria are first-order estimates: a gap or eigenvalue that curves may reach zero
earlier or later than its tangent line says.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

from mdsens.contacts import candidate_pairs
from mdsens.implicit import NullSpace, project_out
from mdsens.parameters import unit_tangent
from mdsens.potentials import metric_from, pair_values_at
from mdsens.spectrum import DENSE_SPECTRUM_LIMIT, LowestMode, lanczos_basis
from mdsens.system import System

# Eigenvalues closer than this fraction of the largest are one degenerate eigenvalue: their
# eigenvectors are any basis of the eigenspace, and only the group's derivative is defined.
DEGENERATE = 1e-8


@dataclass(frozen=True)
class Limit:
    """The first place along one direction of θ where the linearisation stops holding.

    Attributes:
        distance: |t| there, in units of the tangent (of the parameter for a unit direction, of
            the step for a step Δθ); ``inf`` where nothing limits.
        kind: ``contact`` (a pair's gap to a non-smooth radius reaches zero), ``mode`` (an
            eigenvalue of the Hessian reaches zero) or ``none``.
        pair: (i, j), i < j, the pair that limits a ``contact`` limit.
        radius: the radius it crosses: ``contact``, ``r_onset`` or ``r_cutoff``.
        mode: index of the eigenvalue that limits a ``mode`` limit (0: the lowest).
        value: that pair's gap r − R, or that eigenvalue, at θ₀.
        rate: its derivative d/dt along the tangent.
    """

    distance: float = math.inf
    kind: str = "none"
    pair: tuple[int, int] | None = None
    radius: str | None = None
    mode: int | None = None
    value: float | None = None
    rate: float | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict (``distance`` is null where infinite)."""
        out = {"distance": self.distance if math.isfinite(self.distance) else None, "kind": self.kind}
        if self.kind == "contact":
            out.update(pair=list(self.pair), radius=self.radius)
        if self.kind == "mode":
            out["mode"] = self.mode
        if self.kind != "none":
            out.update(value=self.value, rate=self.rate)
        return out

    def describe(self) -> str:
        """One phrase: what limits (``contact 19-44``, ``pair 0-8 at r_cutoff·σ``, ``Hessian mode 0
        (λ = 0.03)``)."""
        if self.kind == "contact":
            pair = f"{self.pair[0]}-{self.pair[1]}"
            return f"contact {pair}" if self.radius == "contact" else f"pair {pair} at {self.radius}·σ"
        if self.kind == "mode":
            return f"Hessian mode {self.mode} (λ = {self.value:.3g})"
        return "nothing"


@dataclass(frozen=True)
class Validity:
    """The validity radius of a linearisation in both directions of one parameter direction.

    Attributes:
        contact_up, contact_down: the first zero crossing of a linearised gap for t > 0 and
            t < 0 (:class:`Limit` of kind ``contact`` or ``none``).
        mode_up, mode_down: the first zero of a linearised eigenvalue for t > 0 and t < 0.
    """

    contact_up: Limit
    contact_down: Limit
    mode_up: Limit
    mode_down: Limit

    @property
    def up(self) -> Limit:
        """What limits t > 0: the nearer of the contact and the mode limit."""
        return min(self.contact_up, self.mode_up, key=lambda limit: limit.distance)

    @property
    def down(self) -> Limit:
        """What limits t < 0."""
        return min(self.contact_down, self.mode_down, key=lambda limit: limit.distance)

    @property
    def radius_up(self) -> float:
        return self.up.distance

    @property
    def radius_down(self) -> float:
        return self.down.distance

    @property
    def radius(self) -> float:
        """The smaller of the two directions' radii."""
        return min(self.radius_up, self.radius_down)

    def to_json(self) -> dict:
        """A JSON-ready dict: both radii (null where infinite), what limits each, and all four
        components."""

        def finite(value):
            return value if math.isfinite(value) else None

        return {
            "radius_up": finite(self.radius_up),
            "radius_down": finite(self.radius_down),
            "limit_up": self.up.to_json(),
            "limit_down": self.down.to_json(),
            "contact_up": self.contact_up.to_json(),
            "contact_down": self.contact_down.to_json(),
            "mode_up": self.mode_up.to_json(),
            "mode_down": self.mode_down.to_json(),
        }


@dataclass(frozen=True)
class Modes:
    """The lowest eigenvalues of the Hessian off its null space, with their eigenvectors.

    Attributes:
        values: (k,), ascending.
        vectors: (k, N, d), orthonormal, orthogonal to the null space.
        groups: index ranges (start, stop) of degenerate eigenvalues (:data:`DEGENERATE`).
        method: ``dense``, ``lanczos`` or ``lanczos-lowest`` (:func:`lowest_mode_only`; ``none``
            when the null space is everything, or k = 0).
    """

    values: np.ndarray
    vectors: np.ndarray
    groups: tuple[tuple[int, int], ...]
    method: str


@dataclass(frozen=True)
class Crossing:
    """A pair whose linearised gap to a non-smooth radius reaches zero at ``t``."""

    t: float
    pair: tuple[int, int]
    radius: str


# A System hashes by identity (eq=False): one entry per system object.
@functools.lru_cache(maxsize=16)
def _compiled(system: System):
    """The jitted pieces for one system: pairs, gaps with their rates, the projected Hessian,
    and the derivative of the Hessian along a tangent."""
    types = jnp.asarray(system.types)
    metric = jax.vmap(metric_from(system.displacement))
    potential = system.potential

    def pairs(x, params):
        """(i, j, followed): candidate pairs and whether each is followed (neither a rattler)."""
        i, j, valid, _ = candidate_pairs(system, x)
        rattler = system.rattlers(x, params)
        return i, j, valid & ~rattler[i] & ~rattler[j]

    def gaps(x, params, i, j):
        values = pair_values_at(potential, params, system.overridden, types, i, j)
        radii = potential.non_smooth_radii(values, system.settings)
        r = metric(x[i], x[j])
        # A potential without contacts or cutoff (Lennard-Jones with r_cutoff = inf) has none.
        return jnp.stack([r - radius for radius in radii.values()]) if radii else jnp.zeros((0, r.size))

    def gap_rates(x, params, dx, tangent, i, j):
        return jax.jvp(lambda y, p: gaps(y, p, i, j), (x, params), (dx, tangent))

    def hvp(x, params, v):
        return jax.jvp(lambda y: jax.grad(system.energy_fn)(y, params), (x,), (v,))[1]

    def projected_matvec(x, params, basis, v):
        v = project_out(basis, v)
        return project_out(basis, hvp(x, params, v.reshape(x.shape)).ravel())

    def projected_matrix(x, params, basis):
        # Columns in batches, as mdsens.spectrum does: a vmap over all n would hold n products.
        column = functools.partial(projected_matvec, x, params, basis)
        return jax.lax.map(column, jnp.eye(x.size, dtype=x.dtype), batch_size=32)

    def hessian_rates(x, params, dx, tangent, vectors):
        """(k, k): vₐᵀ (dH/dt) v_b along (dx, tangent) for the (k, N, d) ``vectors``."""

        def moved(v):
            return jax.jvp(lambda y, p: hvp(y, p, v), (x, params), (dx, tangent))[1]

        w = jax.vmap(moved)(vectors)
        return jnp.einsum("aid,bid->ab", vectors, w)

    return {
        "pairs": jax.jit(pairs),
        "gap_rates": jax.jit(gap_rates),
        "matrix": jax.jit(projected_matrix),
        "matvec": jax.jit(projected_matvec),
        "hessian_rates": jax.jit(hessian_rates),
        "nullspace": jax.jit(system.nullspace),
    }


def _groups(values: np.ndarray, scale: float) -> list[tuple[int, int]]:
    """Runs of eigenvalues within :data:`DEGENERATE` × ``scale`` of their neighbour."""
    groups, start = [], 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] - values[k - 1] > DEGENERATE * scale:
            groups.append((start, k))
            start = k
    return groups


def _in_nullspace(basis: NullSpace, vectors: np.ndarray) -> np.ndarray:
    """(k,) whether each of the (n, k) ``vectors`` lies (mostly) in the null space."""
    kept = jax.vmap(lambda v: project_out(basis, v))(jnp.asarray(vectors.T))
    return np.linalg.norm(np.asarray(kept), axis=1) < 0.5


def lowest_modes(system: System, x, params, k: int = 4, *, dense_limit: int = DENSE_SPECTRUM_LIMIT) -> Modes:
    """The ``k`` lowest eigenvalues of the Hessian at (``x``, ``params``) off its null space, and
    their eigenvectors; more than ``k`` where the ``k``-th is degenerate (the whole eigenspace).

    Dense up to ``dense_limit`` degrees of freedom; beyond, Lanczos on P H P + c (I − P) with c
    twice the largest eigenvalue (the null space moved out of the way, as
    :func:`mdsens.spectrum.lowest_eigenvalues` does), ``k`` + 3 eigenpairs of which a trailing
    degenerate group that may be incomplete is dropped. ``k`` = 0 computes nothing and returns
    no mode (method ``none``).
    """
    x = jnp.asarray(x, dtype=jnp.float64)
    if k <= 0:
        return Modes(np.zeros(0), np.zeros((0, *x.shape)), (), "none")
    system = system.for_params(params, x)
    parts = _compiled(system)
    basis = parts["nullspace"](x, params)
    n = x.size
    if n <= dense_limit:
        matrix = np.asarray(parts["matrix"](x, params, basis))
        values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
        keep = ~_in_nullspace(basis, vectors)
        values, vectors = values[keep], vectors[:, keep]
        method, complete = "dense", len(values)
    else:

        def matvec(v):
            return np.asarray(parts["matvec"](x, params, basis, jnp.asarray(v.ravel())))

        operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        largest = float(scipy.sparse.linalg.eigsh(operator, k=1, which="LA", return_eigenvectors=False)[0])
        shift = 2.0 * largest

        def shifted(v):
            v = jnp.asarray(v.ravel())
            return np.asarray(parts["matvec"](x, params, basis, v) + shift * (v - project_out(basis, v)))

        operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=shifted, dtype=np.float64)
        count = min(k + 3, n - 1)
        # lanczos_basis, not ARPACK's 2k + 1: fewer restarts (1.9× faster at N = 1024).
        values, vectors = scipy.sparse.linalg.eigsh(
            operator, k=count, which="SA", tol=1e-12, ncv=lanczos_basis(count, n)
        )
        order = np.argsort(values)
        values, vectors = values[order], vectors[:, order]
        keep = ~_in_nullspace(basis, vectors)
        values, vectors = values[keep], vectors[:, keep]
        method, complete = "lanczos", len(values) - 1  # the last one's group may go on beyond
    if len(values) == 0:
        return Modes(np.zeros(0), np.zeros((0, *x.shape)), (), "none")
    scale = max(abs(float(values[-1])), abs(float(values[0])))
    groups = []
    for start, stop in _groups(values, scale):
        if start >= k or (stop > complete and groups):
            break
        groups.append((start, stop))
    stop = groups[-1][1]
    return Modes(
        values=values[:stop],
        vectors=vectors[:, :stop].T.reshape(stop, *x.shape),
        groups=tuple(groups),
        method=method,
    )


def lowest_mode_only(mode: LowestMode, shape: tuple[int, ...]) -> Modes:
    """The one mode of :func:`mdsens.spectrum.lowest_mode` as :class:`Modes`, to follow the lowest
    eigenvalue only (the cheap default of :class:`mdsens.sensitivity.Sensitivity`). Taken as
    simple: were the lowest eigenvalue degenerate, its derivative would be that of one vector of
    the eigenspace, not the group's (:func:`lowest_modes` follows the whole group)."""
    return Modes(
        values=np.array([mode.value]),
        vectors=np.asarray(mode.vector).reshape(1, *shape),
        groups=((0, 1),),
        method="lanczos-lowest",
    )


def _first(distances: np.ndarray) -> int | None:
    """Index of the smallest finite distance; None if there is none."""
    if distances.size == 0 or not np.isfinite(distances).any():
        return None
    return int(np.argmin(distances))


def _gaps(system: System, x, params, tangent, dx):
    """(i, j, names, gaps, rates): the followed pairs and, per non-smooth radius (rows), their
    gaps r − R at θ₀ and d/dt of them along (dx, tangent)."""
    parts = _compiled(system)
    i, j, followed = parts["pairs"](x, params)
    gaps, rates = parts["gap_rates"](x, params, jnp.asarray(dx), tangent, i, j)
    followed = np.asarray(followed)
    i, j = np.asarray(i)[followed], np.asarray(j)[followed]
    names = tuple(system.potential.non_smooth_radii(system.pair_values(params), system.settings))
    return i, j, names, np.asarray(gaps)[:, followed], np.asarray(rates)[:, followed]


def _crossing_times(gaps: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """t at which each linearised gap g + t·ġ is zero (± inf where ġ = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        times = -gaps / rates
    return np.where(rates != 0, times, np.inf)


def _contact_limits(system: System, x, params, tangent, dx) -> tuple[Limit, Limit]:
    i, j, names, gaps, rates = _gaps(system, x, params, tangent, dx)
    times = _crossing_times(gaps, rates)
    limits = []
    for sign in (1.0, -1.0):
        ahead = np.where(sign * times >= 0, sign * times, np.inf).ravel()
        best = _first(ahead)
        if best is None:
            limits.append(Limit())
            continue
        row, column = np.unravel_index(best, times.shape)
        a, b = int(i[column]), int(j[column])
        limits.append(
            Limit(
                distance=float(ahead[best]),
                kind="contact",
                pair=(min(a, b), max(a, b)),
                radius=names[row],
                value=float(gaps[row, column]),
                rate=float(rates[row, column]),
            )
        )
    return limits[0], limits[1]


def mode_rates(system: System, x, params, tangent, dx, modes: Modes) -> np.ndarray:
    """dλ/dt of every mode of ``modes`` along (dx, ``tangent``): for a simple eigenvalue
    vᵀ(dH/dt)v, for each degenerate group the eigenvalues of Vᵀ(dH/dt)V, ascending (how the
    group splits: the derivatives of its eigenvalues in ascending order for t > 0)."""
    system = system.for_params(params, x)
    x = jnp.asarray(x, dtype=jnp.float64)
    parts = _compiled(system)
    rates = np.zeros(len(modes.values))
    for start, stop in modes.groups:
        vectors = jnp.asarray(modes.vectors[start:stop])
        matrix = np.asarray(parts["hessian_rates"](x, params, jnp.asarray(dx), tangent, vectors))
        rates[start:stop] = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return rates


def _mode_limits(system: System, x, params, tangent, dx, modes: Modes) -> tuple[Limit, Limit]:
    rates = mode_rates(system, x, params, tangent, dx, modes)
    times = _crossing_times(modes.values, rates)
    limits = []
    for sign in (1.0, -1.0):
        ahead = np.where(sign * times >= 0, sign * times, np.inf)
        best = _first(ahead)
        if best is None:
            limits.append(Limit())
            continue
        limits.append(
            Limit(
                distance=float(ahead[best]),
                kind="mode",
                mode=best,
                value=float(modes.values[best]),
                rate=float(rates[best]),
            )
        )
    return limits[0], limits[1]


def validity_along(
    system: System, x, params, tangent, dx, modes: Modes | None = None, k: int = 4
) -> Validity:
    """The validity radius along θ₀ + t·``tangent`` of the state ``x`` relaxed at ``params``.

    Args:
        system: the system.
        x: relaxed positions, (N, d).
        params: θ₀.
        tangent: a pytree like ``params``: a unit direction
            (:func:`mdsens.parameters.unit_tangent`) or a whole step Δθ (radii then come in
            units of the step).
        dx: dx*/dt along ``tangent``, (N, d), zero modes removed (as
            :class:`mdsens.sensitivity.Sensitivity` and :func:`mdsens.prediction.predict` give it).
        modes: the lowest Hessian modes at (x, θ₀) (:func:`lowest_modes`; computed here if None:
            pass them when calling for many tangents).
        k: how many modes to follow when computing them here (0: none; the mode limits are
            then ``none``, and only contacts limit the radius).
    """
    system = system.for_params(params, x)
    x = jnp.asarray(x, dtype=jnp.float64)
    modes = lowest_modes(system, x, params, k) if modes is None else modes
    contact_up, contact_down = _contact_limits(system, x, params, tangent, dx)
    mode_up, mode_down = _mode_limits(system, x, params, tangent, dx, modes)
    return Validity(contact_up, contact_down, mode_up, mode_down)


def validity_radii(
    system: System, x, params, dx_by_name: dict[str, np.ndarray], modes: Modes | None = None, k: int = 4
) -> dict[str, Validity]:
    """:func:`validity_along` for each scalar parameter: name → :class:`Validity` in units of
    that parameter.

    Args:
        system, x, params: the relaxed state (θ₀ = ``params``).
        dx_by_name: parameter name (``diameter.B``, ``epsilon``, ``diameter[17]``) → dx*/dθ for
            it, (N, d) (``SensitivityResult.parameters[name].dx``).
        modes: the lowest Hessian modes (computed once here if None).
        k: how many modes to follow when computing them here (0: none).

    Raises:
        UserError: an unknown parameter name.
    """
    system = system.for_params(params, x)
    x = jnp.asarray(x, dtype=jnp.float64)
    modes = lowest_modes(system, x, params, k) if modes is None else modes
    return {
        name: validity_along(system, x, params, unit_tangent(system, name, params), dx, modes)
        for name, dx in dx_by_name.items()
    }


def predicted_crossings(system: System, x, params, tangent, dx, within: float = 1.0) -> list[Crossing]:
    """The pairs whose linearised gaps reach zero for t in (0, ``within``] along θ₀ + t·tangent
    (t ≤ 0 with ``within`` < 0), nearest first: the contacts a step of ``within`` tangents is
    predicted to open or close (pairs with a rattler left out, as in :func:`validity_along`)."""
    system = system.for_params(params, x)
    i, j, names, gaps, rates = _gaps(system, jnp.asarray(x, dtype=jnp.float64), params, tangent, dx)
    times = _crossing_times(gaps, rates) * np.sign(within)
    rows, columns = np.nonzero((times >= 0) & (times <= abs(within)))
    found = [
        Crossing(float(times[r, c]) * np.sign(within), (int(min(i[c], j[c])), int(max(i[c], j[c]))), names[r])
        for r, c in zip(rows, columns, strict=True)
    ]
    return sorted(found, key=lambda crossing: abs(crossing.t))
