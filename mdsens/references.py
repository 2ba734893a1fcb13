"""Reference derivatives that implicit differentiation is checked against, implemented once.

* :func:`relative_error`: ‖value − reference‖ / ‖reference‖, the one measure of disagreement;
* :func:`central_difference`: (x*(θ + h t) − x*(θ − h t)) / 2h from two relaxations
  warm-started at x*(θ), with the pairs that cross a non-smooth radius of the potential between
  the two ends (:func:`crossings`: a contact of soft spheres, either end of the Lennard-Jones or
  Morse switch), across which a finite difference measures a kink, not a derivative;
* :func:`unrolled_jvp`, :func:`unrolled_trajectory_jvp` and :func:`unrolled_vjp`: autodiff
  through K steps of the minimiser, from its start (what implicit differentiation avoids).

``mdsens check``, the paper experiment, the benchmarks and the tests all use these.
Derivatives are compared with the Hessian's zero modes (:meth:`System.nullspace`) projected
out, as the implicit derivative has them: :func:`without_null_space`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.contacts import candidate_pairs
from mdsens.potentials import metric_from
from mdsens.relaxation import Relaxer, RelaxResult
from mdsens.system import System


def relative_error(value, reference) -> float:
    """‖value − reference‖ / ‖reference‖ (Frobenius norms of the whole arrays).

    0.0 when both are zero (they agree exactly), ``inf`` when only the reference is zero (no
    relative scale exists, and they disagree); NaN anywhere gives NaN.
    """
    value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    difference = float(np.linalg.norm(value - reference))
    norm = float(np.linalg.norm(reference))
    if norm == 0.0:
        return 0.0 if difference == 0.0 else np.inf
    return difference / norm


class _Identity:
    """A system as a cache key by identity (systems hold arrays: they have no value hash)."""

    def __init__(self, system: System):
        self.system = system

    def __hash__(self) -> int:
        return id(self.system)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Identity) and other.system is self.system


def _within_radii(system: System, x, params):
    """(i, j, {radius name: (M,) bool}): the candidate pairs (all pairs i < j, or the neighbour
    list's at ``x``) and, for each non-smooth radius of the potential
    (:meth:`mdsens.potentials.Potential.non_smooth_radii`), which of them are closer than it."""
    i, j, valid, _ = candidate_pairs(system, x)
    r = jax.vmap(metric_from(system.displacement))(x[i], x[j])
    types = jnp.asarray(system.types)
    ti, tj = types[i], types[j]
    radii = system.potential.non_smooth_radii(system.pair_values(params), system.settings)
    return i, j, {name: valid & (r < radius[ti, tj]) for name, radius in radii.items()}


@functools.lru_cache(maxsize=16)
def _compiled(key: _Identity):
    """(difference, project, within_radii) of one system, compiled once: every h and every stack
    reuses them."""
    system = key.system
    difference = jax.jit(jax.vmap(system.displacement))

    def project(x, params, dxs):
        basis = system.nullspace(x, params)
        return jax.vmap(lambda v: implicit.project_out(basis, v.ravel()).reshape(v.shape))(dxs)

    return difference, jax.jit(project), jax.jit(functools.partial(_within_radii, system))


def without_null_space(system: System, x, params, dx) -> np.ndarray:
    """``dx`` (N, d), or a stack of them (K, N, d), with the zero modes of the Hessian at ``x``
    projected out: rigid motions of the non-rattlers and every rattler degree of freedom."""
    dx = jnp.asarray(dx)
    _, project, _ = _compiled(_Identity(system))
    stack = dx if dx.ndim == 3 else dx[None]
    out = np.asarray(project(jnp.asarray(x), params, stack))
    return out if dx.ndim == 3 else out[0]


def shifted(params, tangent, step: float):
    """θ + step · t, leaf by leaf."""
    return jax.tree_util.tree_map(lambda p, t: p + step * t, params, tangent)


def crossings(system: System, x_a, params_a, x_b, params_b) -> tuple[np.ndarray, tuple[str, ...]]:
    """(particles, radii): the (N,) mask of particles in a pair that is on different sides of a
    non-smooth radius of the potential in the two states, and the names of the radii crossed
    (``contact``, ``r_onset``, ``r_cutoff``: see
    :meth:`mdsens.potentials.Potential.non_smooth_radii`). Both the distances and the radii
    (which scale with θ) move. For soft spheres these are the contact changes. Not jittable."""
    _, _, within = _compiled(_Identity(system))
    sides = []
    for x, params in ((x_a, params_a), (x_b, params_b)):
        i, j, inside = within(jnp.asarray(x), params)
        i, j = np.asarray(i), np.asarray(j)
        low, high = np.minimum(i, j), np.maximum(i, j)
        sides.append(
            {name: set(zip(low[m].tolist(), high[m].tolist(), strict=True)) for name, m in inside.items()}
        )
    particles = np.zeros(system.n_particles, dtype=bool)
    crossed = []
    # In the potential's order (a jitted dict comes back with its keys sorted).
    for name in system.potential.non_smooth_radii(system.pair_values(params_a), system.settings):
        pairs = sides[0][name] ^ sides[1][name]
        if pairs:
            crossed.append(name)
            particles[np.array(sorted(pairs)).ravel()] = True
    return particles, tuple(crossed)


@dataclass(frozen=True)
class FiniteDifference:
    """A central finite difference of the relaxed positions.

    Attributes:
        dx: (N, d) minimum-image (x₊ − x₋) / 2h, null-space modes at x*(θ) projected out.
        raw_dx: the same before the projection (what the relaxations did, rattlers included).
        plus, minus: the relaxations at θ + h t and θ − h t.
        changed: (N,) particles in a pair that crosses a non-smooth radius of the potential
            between the two ends (:func:`crossings`; for soft spheres: whose contacts change).
        crossed: the names of the radii crossed (``contact``, ``r_onset``, ``r_cutoff``).
        converged: both relaxations reached their force tolerance.
    """

    h: float
    dx: np.ndarray
    raw_dx: np.ndarray
    plus: RelaxResult
    minus: RelaxResult
    changed: np.ndarray
    crossed: tuple[str, ...]
    converged: bool

    @property
    def wall_time(self) -> float:
        """Seconds of the two relaxations: what a finite difference costs."""
        return self.plus.wall_time + self.minus.wall_time


def central_difference(
    relaxer: Relaxer, x_star, params, tangent, h: float, *, fmax: float | None = None
) -> FiniteDifference:
    """(x*(θ + h t) − x*(θ − h t)) / 2h, both relaxations warm-started from ``x_star`` = x*(θ).

    Args:
        relaxer: the engine (its ``fmax`` unless ``fmax`` is given).
        x_star: relaxed positions at ``params``.
        params: θ.
        tangent: t, a pytree like ``params`` (e.g. :func:`mdsens.sensitivity.unit_tangent`).
        h: the step.
        fmax: force tolerance of the two relaxations (a finite difference is only as exact as
            x*(θ ± h t): tighter than the signal h · dx).

    Never raises on non-convergence: see ``converged``.
    """
    system = relaxer.system
    ends = [shifted(params, tangent, sign * h) for sign in (1.0, -1.0)]
    plus, minus = (relaxer.relax(p, x0=x_star, fmax=fmax) for p in ends)
    difference, _, _ = _compiled(_Identity(system))
    raw = np.asarray(difference(jnp.asarray(plus.positions), jnp.asarray(minus.positions))) / (2 * h)
    changed, crossed = crossings(system, plus.positions, ends[0], minus.positions, ends[1])
    return FiniteDifference(
        h=h,
        dx=without_null_space(system, x_star, params, raw),
        raw_dx=raw,
        plus=plus,
        minus=minus,
        changed=changed,
        crossed=crossed,
        converged=bool(plus.converged and minus.converged),
    )


# -- autodiff through the unrolled minimiser ------------------------------------------------------


def _start(relaxer: Relaxer, x0):
    return jnp.asarray(relaxer.system.positions if x0 is None else x0)


def unrolled_positions(relaxer: Relaxer, params, steps, x0=None):
    """x_K: the positions after ``steps`` minimiser steps from ``x0`` (default: the system's
    initial positions, where :meth:`Relaxer.relax` starts). ``steps`` may be traced: one
    compilation serves every K (forward mode only; reverse mode needs a fixed K)."""
    init, step, positions_of = relaxer.unrolled()
    state = jax.lax.fori_loop(0, steps, lambda _, s: step(s, params), init(_start(relaxer, x0), params))
    return positions_of(state)


def unrolled_jvp(relaxer: Relaxer, params, tangent, steps, x0=None):
    """(x_K, dx_K/dθ · t): forward-mode autodiff through K steps. Its memory does not grow with
    K (the tangent is carried along; no trajectory is stored). Jittable."""
    return jax.jvp(lambda p: unrolled_positions(relaxer, p, steps, x0), (params,), (tangent,))


def unrolled_trajectory_jvp(relaxer: Relaxer, params, tangent, length: int, x0=None):
    """(xs, dxs), each (length, N, d): x_K and dx_K/dθ · t after every K = 1 … ``length``, from
    one forward-mode pass. Jittable."""

    def trajectory(p):
        init, step, positions_of = relaxer.unrolled()

        def body(state, _):
            state = step(state, p)
            return state, positions_of(state)

        _, xs = jax.lax.scan(body, init(_start(relaxer, x0), p), None, length=length)
        return xs

    return jax.jvp(trajectory, (params,), (tangent,))


def unrolled_vjp(relaxer: Relaxer, params, cotangent, steps: int, x0=None):
    """d(c · x_K)/dθ, a pytree like ``params``: reverse-mode autodiff through K = ``steps``
    (fixed) minimiser steps. ``lax.scan`` keeps what the backward pass needs of every step, as
    reverse mode through any unrolled loop must (without checkpointing): memory grows with K.
    Jittable."""

    def positions(p):
        init, step, positions_of = relaxer.unrolled()
        state, _ = jax.lax.scan(
            lambda s, _: (step(s, p), None), init(_start(relaxer, x0), p), None, length=steps
        )
        return positions_of(state)

    _, pullback = jax.vjp(positions, params)
    return pullback(cotangent)[0]
