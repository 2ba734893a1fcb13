"""Relaxed structures and energies at nearby parameters, predicted from one implicit solve.

Along a parameter change Δθ = θ₁ − θ₀ of a state x* relaxed at θ₀, the path θ(t) = θ₀ + tΔθ has
relaxed states x*(t) with, by the implicit function theorem,

    dx*/dt = −H⁺ ∂²E/∂x∂θ · Δθ                     (one forward solve, :func:`mdsens.implicit.root_jvp`)
    dE*/dt = ∂E/∂θ · Δθ                            (envelope theorem: ∂E/∂x = 0 at x*)
    d²E*/dt² = ∂²E/∂θ²[Δθ, Δθ] + ∂²E/∂θ∂x[Δθ, dx*/dt]

(differentiate dE*/dt = ∂_θE(x*(t), θ(t))·Δθ once more). The last line is computed as the
second derivative of s ↦ E(x* + s·dx, θ₀ + sΔθ) at s = 0, which equals it at the exact dx
(the x–x term E_xx[dx, dx] = −E_θx[Δθ, dx] cancels one of the two cross terms) and is
stationary in dx: an error e in the linear solve changes it by eᵀHe only, second order.

:func:`predict` returns x₁ ≈ x* + dx (first order; error O(Δθ²)) and E₁ = E* + dE*/dt,
E₂ = E₁ + ½ d²E*/dt² (errors O(Δθ²) and O(Δθ³)). :func:`verify` re-relaxes at θ₁ from the
prediction and from x* and measures both. :func:`parameter_step` turns ``--set`` overrides of a
system's recipe into Δθ, refusing overrides that change anything but potential parameters.

All of it holds only while no pair crosses a non-smooth radius of the potential and the Hessian
stays positive: see :mod:`mdsens.validity` for how far that is.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.errors import NotConvergedError, UserError
from mdsens.parameters import directional, parameter_names, parameter_value
from mdsens.potentials import PAIR, mix, pair_tables
from mdsens.recipe import apply_overrides
from mdsens.references import crossings, without_null_space
from mdsens.relaxation import Relaxer, RelaxResult
from mdsens.sensitivity import linear_solve_from_recipe, optimality_fn
from mdsens.system import System, build_system

# Recipe keys that name a value rather than the physics: they may differ freely.
_DESCRIPTIVE = {("name",), ("description",)}
_MISSING = object()


@dataclass(frozen=True)
class ParameterStep:
    """A change of a system's potential parameters, θ₀ → θ₁.

    Attributes:
        params: θ₁, a pytree like ``system.params`` in the system's own convention (its
            pair-override masks: a pair value set only in θ₁ is an offset from the mixing rule).
        delta: Δθ = θ₁ − θ₀, leaf by leaf.
        changes: parameter name → (θ₀ value, θ₁ value), for every scalar parameter that changes
            (species values, global values, and pair values set explicitly in either).
    """

    params: dict
    delta: dict
    changes: dict[str, tuple[float, float]]


def _flatten(table: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _is_parameter(system: System, key: tuple) -> bool:
    """Whether a recipe key holds a value of a potential parameter (not a setting, not the
    name of the potential, not anything about positions, minimiser or solver)."""
    names = system.potential.parameters
    return (
        (len(key) == 2 and key[0] == "potential" and key[1] in names)
        or (len(key) == 3 and key[0] == "species" and key[2] in names)
        or (len(key) == 3 and key[0] == "pairs" and key[2] in names)
    )


def parameter_step(system: System, overrides: list[str] | tuple[str, ...]) -> ParameterStep:
    """Δθ from ``KEY=VALUE`` overrides of the system's recipe (``species.B.diameter=0.62``).

    The recipe with the overrides is built into a system of its own (so every value is checked
    as ``mdsens relax --set`` checks it); its parameters are then expressed in ``system``'s
    convention. Positions, cell and species stay ``system``'s: the prediction is at the fixed
    cell the derivatives are taken at, even where the recipe derives its box from the diameters
    (``box.packing_fraction``), whose rebuilt box is not used.

    Args:
        system: the system of the relaxed state; θ₀ is ``system.params``.
        overrides: the ``--set`` strings; every key must name a potential parameter value
            (``potential.epsilon``, ``species.B.diameter``, ``pairs.A-B.diameter``).

    Raises:
        UserError: a malformed override or invalid value, a key that is not a potential
            parameter (a setting, the box, the positions, the minimiser, ...), a different
            number or kind of particles, or no parameter that changes.
    """
    params = system.params
    if not overrides:
        raise UserError("give the parameter change with --set KEY=VALUE (e.g. --set species.B.diameter=0.62)")
    recipe = apply_overrides(system.recipe, list(overrides))
    before, after = _flatten(system.recipe), _flatten(recipe)
    names = ", ".join(system.potential.parameters)
    for key in sorted(set(before) | set(after), key=str):
        if key in _DESCRIPTIVE or before.get(key, _MISSING) == after.get(key, _MISSING):
            continue
        if not _is_parameter(system, key):
            raise UserError(
                f"--set {'.'.join(map(str, key))}: predict changes potential parameters only"
                f" ({names}, as potential.NAME, species.S.NAME or pairs.A-B.NAME), at the run's"
                " positions and cell"
            )
    other = build_system(recipe)
    if other.species != system.species or not np.array_equal(other.types, system.types):
        raise UserError(
            "the overrides change the particles or their species: predict changes parameters only"
        )
    params1 = _in_convention(system, other)
    delta = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a) - jnp.asarray(b), params1, params)
    changes = {}
    for name in parameter_names(other):
        old, new = parameter_value(system, params, name), parameter_value(other, other.params, name)
        if old != new:
            changes[name] = (old, new)
    if not changes:
        raise UserError(f"--set {' '.join(overrides)} changes no parameter value: nothing to predict")
    return ParameterStep(params=params1, delta=delta, changes=changes)


def _in_convention(system: System, other: System) -> dict:
    """``other.params`` in ``system``'s convention: a pair value that ``other`` sets explicitly and
    ``system`` mixes becomes the offset from ``system``'s mixing rule, so that both systems' pair
    tables (and energies) are the same at these parameters."""
    n_species = len(system.species)
    tables = pair_tables(other.potential, other.params, other.overridden, n_species)
    pair = {}
    for name, spec in system.potential.parameters.items():
        same = system.overridden[name] | ~other.overridden[name]
        mixed = jnp.broadcast_to(mix(spec.mixing, other.params[name]), (n_species, n_species))
        pair[name] = jnp.where(same, other.params[PAIR][name], tables[name] - mixed)
    return {**{k: v for k, v in other.params.items() if k != PAIR}, PAIR: pair}


@dataclass(frozen=True)
class Prediction:
    """The relaxed state and energy at θ₀ + Δθ, predicted from x* at θ₀.

    Attributes:
        positions: x* + dx, the first-order prediction (shifted by the system's space: wrapped
            into a periodic cell).
        dx: dx*/dt · 1 along θ₀ + tΔθ, shape (N, d), zero modes removed (rigid motions, and
            rattlers' rows are 0).
        energy: E* = E(x*, θ₀).
        energy_first: E* + ∂E/∂θ·Δθ.
        energy_second: energy_first + ½ d²E*/dt² (see the module docstring).
        slope: dE*/dt = ∂E/∂θ·Δθ.
        curvature: d²E*/dt².
        energy_by_name: ∂E/∂θ_name · Δθ_name for each name given to :func:`predict`: the
            first-order energy change split by parameter (every entry of Δθ belongs to one
            name, so over all the names that change these sum to ``slope``).
        iterations, residual, converged: the linear solve's diagnostics.
        wall_time: seconds, compilation included.
    """

    positions: np.ndarray
    dx: np.ndarray
    energy: float
    energy_first: float
    energy_second: float
    slope: float
    curvature: float
    energy_by_name: dict[str, float]
    iterations: int
    residual: float
    converged: bool
    wall_time: float


# A System hashes by identity (eq=False): one entry per system object.
@functools.lru_cache(maxsize=8)
def _compiled(system: System, solver: str | None):
    """(solve, energies, max force, rattlers) of one system, compiled once for every step."""
    condition = optimality_fn(system)
    linear_solve = linear_solve_from_recipe(system, solver)

    def solve(x, params, delta):
        return implicit.root_jvp(condition, x, params, delta, linear_solve, system.nullspace)

    def energies(x, params, delta, dx):
        def along(s):
            shifted = jax.tree_util.tree_map(lambda p, t: p + s * t, params, delta)
            return system.energy_fn(x + s * dx, shifted)

        def slope(s):
            return jax.jvp(along, (s,), (1.0,))[1]

        curvature = jax.jvp(slope, (0.0,), (1.0,))[1]
        return system.energy_fn(x, params), jax.grad(system.energy_fn, argnums=1)(x, params), curvature

    def force(x, params):
        return jnp.max(jnp.linalg.norm(system.force_fn(x, params), axis=-1))

    return jax.jit(solve), jax.jit(energies), jax.jit(force), jax.jit(system.rattlers)


def predict(
    system: System,
    x,
    params: dict,
    delta: dict,
    *,
    names: dict[str, dict] | None = None,
    solver: str | None = None,
    allow_unconverged: bool = False,
) -> Prediction:
    """Predict x*(θ₀ + Δθ) and E*(θ₀ + Δθ) from the state ``x`` relaxed at ``params`` = θ₀.

    One linear solve (the recipe's, or ``solver``), whatever the number of parameters that
    change. Where the system keeps a neighbour list, the list must reach for ``params`` and hold
    the pairs at ``x`` (``system.for_params(params, x)``, done here).

    Args:
        system: the system.
        x: relaxed positions at ``params``, (N, d).
        params: θ₀.
        delta: Δθ, a pytree like ``params`` (:attr:`ParameterStep.delta`).
        names: parameter name → its unit tangent (:func:`mdsens.parameters.unit_tangent`), for
            :attr:`Prediction.energy_by_name`; default none.
        solver: ``cg`` or ``dense`` (default: the recipe's).
        allow_unconverged: predict from a state whose max|F| exceeds the recipe's ``fmax``.

    Raises:
        NotConvergedError: ``x`` is not relaxed to the recipe's ``fmax`` (unless allowed).
        FloatingPointError: the linear solve did not converge or gave non-finite values.
    """
    start = time.perf_counter()
    system = system.for_params(params, x)
    solve, energies, force, _ = _compiled(system, solver)
    x = jnp.asarray(x, dtype=jnp.float64)
    fmax = system.recipe["minimizer"]["fmax"]
    worst = float(force(x, params))
    if not worst <= fmax and not allow_unconverged:
        raise NotConvergedError(
            f"the state is not relaxed: max force {worst:.3g} > fmax {fmax:.3g}; a prediction"
            " from it would be wrong (relax again, or allow it explicitly)"
        )
    dx, info = solve(x, params, delta)
    dx = np.asarray(dx)
    if not (np.all(np.isfinite(dx)) and bool(info.converged)):
        raise FloatingPointError(
            f"the linear solve along Δθ did not converge: relative residual {float(info.residual):.3g}"
            f" after {int(info.iterations)} iterations (try --solver dense, or relax to a smaller fmax)"
        )
    energy, gradient, curvature = energies(x, params, delta, jnp.asarray(dx))
    slope = directional(gradient, delta)
    by_name = {
        name: directional(gradient, tangent) * directional(delta, tangent) / directional(tangent, tangent)
        for name, tangent in (names or {}).items()
    }
    energy, curvature = float(energy), float(curvature)
    return Prediction(
        positions=np.asarray(system.shift(x, jnp.asarray(dx))),
        dx=dx,
        energy=energy,
        energy_first=energy + slope,
        energy_second=energy + slope + 0.5 * curvature,
        slope=slope,
        curvature=curvature,
        energy_by_name=by_name,
        iterations=int(info.iterations),
        residual=float(info.residual),
        converged=bool(info.converged),
        wall_time=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class Verification:
    """A prediction against re-relaxations at θ₁.

    Position errors are over the particles that are not rattlers (at θ₀ or θ₁), after removing
    the Hessian's zero modes at x* (rigid translations; rotations of a free cluster), as the
    prediction has them removed: per-particle vector norms, their maximum and root mean square.

    Attributes:
        relaxed: the relaxation at θ₁ started from the prediction (the reference).
        from_start: the relaxation at θ₁ started from x*.
        position_error_max, position_error_rms: prediction − reference.
        baseline_error_max, baseline_error_rms: x* − reference (what no prediction gives).
        energy_error_first, energy_error_second: E₁ − E and E₂ − E, E the reference's energy.
        steps_saved: minimiser steps from x* minus those from the prediction.
        contact_changes: particles whose set of contacts differs between x* at θ₀ and the
            reference at θ₁ (:meth:`mdsens.system.System.contact_changes`).
        crossed: the non-smooth radii some pair crossed between the two states (``contact``,
            ``r_onset``, ``r_cutoff``: :func:`mdsens.references.crossings`).
        crossed_particles: particles in such a pair.
        converged: both relaxations reached their force tolerance.
    """

    relaxed: RelaxResult
    from_start: RelaxResult
    position_error_max: float
    position_error_rms: float
    baseline_error_max: float
    baseline_error_rms: float
    energy_error_first: float
    energy_error_second: float
    steps_saved: int
    contact_changes: int
    crossed: tuple[str, ...]
    crossed_particles: int
    converged: bool


def _errors(system: System, x, params, reference, params1, other) -> tuple[float, float]:
    """(max, rms) of the per-particle minimum-image difference other − reference, zero modes at
    (x, params) removed and rattlers at either state left out."""
    difference = np.asarray(jax.vmap(system.displacement)(jnp.asarray(other), jnp.asarray(reference)))
    difference = without_null_space(system, x, params, difference)
    rattlers = _compiled(system, None)[3]
    free = np.asarray(rattlers(jnp.asarray(x), params)) | np.asarray(
        rattlers(jnp.asarray(reference), params1)
    )
    norms = np.linalg.norm(difference, axis=-1)[~free]
    if norms.size == 0:
        return 0.0, 0.0
    return float(np.max(norms)), float(np.sqrt(np.mean(norms**2)))


def verify(
    system: System,
    x,
    params: dict,
    params1: dict,
    prediction: Prediction,
    *,
    relaxer: Relaxer | None = None,
    fmax: float | None = None,
) -> Verification:
    """Re-relax at θ₁ = ``params1`` from the prediction and from ``x`` (both warm starts) and
    measure the prediction's errors against the first.

    Args:
        system, x, params: the state the prediction was made from.
        params1: θ₁.
        prediction: :func:`predict`'s result for θ₁ − θ₀.
        relaxer: the engine (default ``Relaxer(system)``); one that covers θ₁ is built from it.
        fmax: force tolerance of both relaxations (default: the engine's). The position error
            of a prediction is measured against a reference relaxed this far: its own error is
            about fmax / (lowest Hessian eigenvalue).

    Never raises on non-convergence: see ``converged``.
    """
    relaxer = (Relaxer(system) if relaxer is None else relaxer).for_params(params1, prediction.positions)
    relaxed = relaxer.relax(params1, prediction.positions, fmax=fmax)
    from_start = relaxer.relax(params1, np.asarray(x), fmax=fmax)
    reference = relaxed.positions
    predicted = _errors(system, x, params, reference, params1, prediction.positions)
    baseline = _errors(system, x, params, reference, params1, x)
    crossed_particles, crossed = crossings(system, x, params, reference, params1)
    return Verification(
        relaxed=relaxed,
        from_start=from_start,
        position_error_max=predicted[0],
        position_error_rms=predicted[1],
        baseline_error_max=baseline[0],
        baseline_error_rms=baseline[1],
        energy_error_first=prediction.energy_first - relaxed.energy,
        energy_error_second=prediction.energy_second - relaxed.energy,
        steps_saved=from_start.steps - relaxed.steps,
        contact_changes=int(np.sum(system.contact_changes(x, params, reference, params1))),
        crossed=crossed,
        crossed_particles=int(np.sum(crossed_particles)),
        converged=bool(relaxed.converged and from_start.converged),
    )
