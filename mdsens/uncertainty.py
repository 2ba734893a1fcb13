"""Uncertainty of a relaxed structure and its observables from uncertain parameters: first-order
propagation, and the Monte Carlo check of it.

Parameters θ with covariance Σθ (over scalar names such as ``diameter.B``, ``epsilon``; see
:mod:`mdsens.parameters`) move the relaxed positions, to first order, by x*(θ₀ + δ) − x* ≈ J δ
with J = dx*/dθ (one forward solve per parameter, :class:`mdsens.sensitivity.Sensitivity`).
So, to first order:

* atom i's positional covariance is the d × d block C_i = Σ_pq J_ip Σθ_pq J_iqᵀ, its standard
  deviation σ_i = √(tr C_i) (and √(C_i)_aa per axis);
* an observable q (:mod:`mdsens.observables`) has σ_q² = g Σθ gᵀ with g = dq/dθ, the total
  derivative ∂q/∂θ + ∂q/∂x · J (:mod:`mdsens.observable_gradients`, reusing J: no new solve).

J is the minimum-norm derivative: it has no rigid translation (or rotation of a free cluster),
and rattlers' rows are 0 (masked: their positions are not determined by θ, so no uncertainty is
reported for them).

:func:`monte_carlo` checks the linearisation: it draws K parameter sets θ₀ + δ, δ ~ N(0, Σθ)
(seeded; a positive semi-definite Σθ is fine), relaxes each from x*, and compares the sample
standard deviations with the linear ones (:func:`compare`): with Σθ, and with the sample
covariance of the δ drawn, which takes the draws' own sampling error out of the comparison. Each
sample's displacement is taken minimum-image, with the same zero modes removed as from J (rigid
motions of the non-rattlers, rattlers' coordinates), so that both describe the same thing. A
sample whose relaxation does not converge is recorded and left out, never averaged. Samples that
change the contact network are counted: there the relaxed structure is not a smooth function of
θ, and the linearisation stops holding. A standard deviation estimated from K samples has a
relative sampling error of about 1/√(2(K − 1)) (:attr:`Comparison.sampling_error`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import UserError
from mdsens.observable_gradients import observable_gradients
from mdsens.observables import Observable, parse_observable
from mdsens.parameters import expand_parameters, parameter_value, unit_tangent
from mdsens.references import shifted, without_null_space
from mdsens.relaxation import Relaxer, RelaxResult
from mdsens.sensitivity import Sensitivity
from mdsens.system import System

# A covariance matrix is symmetric when |Σ − Σᵀ| ≤ this × max|Σ| (entries read from a file carry
# rounding), and positive semi-definite when no eigenvalue is below −this × the largest.
SYMMETRY_TOLERANCE = 1e-8
PSD_TOLERANCE = 1e-10
# Ratios of standard deviations are summarised over atoms by these percentiles.
PERCENTILES = (5.0, 50.0, 95.0)


@dataclass(frozen=True)
class ParameterCovariance:
    """Σθ over named scalar parameters.

    Attributes:
        names: scalar parameter names (``diameter.B``), no repeats.
        values: θ₀ of each, at the system's parameters.
        matrix: (P, P) covariance, symmetric positive semi-definite, in the parameters' units².
    """

    names: tuple[str, ...]
    values: np.ndarray
    matrix: np.ndarray

    @property
    def std(self) -> np.ndarray:
        """(P,) standard deviations √Σθ_pp."""
        return np.sqrt(np.diag(self.matrix))


def parse_std(spec: str) -> tuple[str, float, bool]:
    """``NAME=VALUE`` or ``NAME=VALUE%`` → (name, value, relative): the value as given, a
    relative one as a fraction (1% → 0.01). The name is not checked here.

    Raises:
        UserError: no ``=``, an empty name or value, or a value that is not a finite number >= 0.
    """
    name, equals, text = spec.partition("=")
    name, text = name.strip(), text.strip()
    if not equals or not name or not text:
        raise UserError(f"--std {spec!r}: give NAME=VALUE (diameter.B=0.01) or NAME=VALUE% (diameter.B=1%)")
    relative = text.endswith("%")
    try:
        value = float(text[:-1] if relative else text)
    except ValueError:
        raise UserError(f"--std {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--std {spec!r}: a standard deviation must be finite and >= 0, not {text}")
    return name, value / 100 if relative else value, relative


def covariance_from_std(system: System, specs: Sequence[str]) -> ParameterCovariance:
    """Independent standard deviations, each ``NAME=VALUE`` (absolute, in the parameter's units)
    or ``NAME=VALUE%`` (relative to |θ₀|). A bare per-species name (``diameter=1%``) gives every
    species that standard deviation, independently.

    Raises:
        UserError: a malformed, negative or non-finite value, an unknown parameter, or a
            parameter given twice.
    """
    names, values, variances = [], [], []
    for spec in specs:
        name, value, relative = parse_std(spec)
        for scalar in expand_parameters(system, [name]):
            if scalar in names:
                raise UserError(f"--std {spec!r}: {scalar} is given a standard deviation twice")
            theta = parameter_value(system, system.params, scalar)
            std = value * abs(theta) if relative else value
            names.append(scalar)
            values.append(theta)
            variances.append(std**2)
    return ParameterCovariance(
        tuple(names), np.asarray(values, dtype=float), np.diag(variances).astype(float)
    )


def _scalar_name(system: System, name: object) -> str:
    """``name`` as the one scalar parameter it names (``sigma.Kr-Ar`` → ``sigma.Ar-Kr``)."""
    if not isinstance(name, str):
        raise UserError(f"covariance: parameter names must be strings, not {name!r}")
    expanded = expand_parameters(system, [name])
    if len(expanded) != 1:
        raise UserError(
            f"covariance: {name!r} names {len(expanded)} parameters ({', '.join(expanded)}); a covariance"
            " matrix needs one scalar parameter per row"
        )
    return expanded[0]


def covariance_from_matrix(system: System, names: Sequence[str], matrix) -> ParameterCovariance:
    """Σθ given as a matrix over scalar parameter names (rows and columns in the order of ``names``).

    Raises:
        UserError: an unknown, non-scalar or repeated name; a matrix that is not square of the
            names' size, not finite, not symmetric (to :data:`SYMMETRY_TOLERANCE` × its largest
            entry) or not positive semi-definite (an eigenvalue below −:data:`PSD_TOLERANCE` ×
            the largest).
    """
    scalars = [_scalar_name(system, name) for name in names]
    repeated = sorted({name for name in scalars if scalars.count(name) > 1})
    if repeated:
        raise UserError(f"covariance: parameter {', '.join(repeated)} appears more than once")
    try:
        array = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        raise UserError("covariance: the matrix must be rows of numbers") from None
    p = len(scalars)
    if array.shape != (p, p):
        raise UserError(f"covariance: the matrix has shape {array.shape}, but {p} names need ({p}, {p})")
    if not np.all(np.isfinite(array)):
        raise UserError("covariance: the matrix has non-finite entries")
    scale = float(np.max(np.abs(array))) if array.size else 0.0
    asymmetry = float(np.max(np.abs(array - array.T))) if array.size else 0.0
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise UserError(
            f"covariance: the matrix is not symmetric (max |S - S^T| = {asymmetry:.3g}, largest"
            f" entry {scale:.3g})"
        )
    array = 0.5 * (array + array.T)
    eigenvalues = np.linalg.eigvalsh(array) if p else np.zeros(0)
    if p and eigenvalues[0] < -PSD_TOLERANCE * max(float(eigenvalues[-1]), 0.0):
        raise UserError(
            f"covariance: the matrix is not positive semi-definite (eigenvalue {eigenvalues[0]:.3g};"
            f" largest {eigenvalues[-1]:.3g})"
        )
    values = [parameter_value(system, system.params, name) for name in scalars]
    return ParameterCovariance(tuple(scalars), np.asarray(values, dtype=float), array)


def block_diagonal(parts: Sequence[ParameterCovariance]) -> ParameterCovariance:
    """Independent covariances joined into one (no correlation between the parts).

    Raises:
        UserError: no parameter at all, a parameter in two parts, or every variance zero.
    """
    names = [name for part in parts for name in part.names]
    if not names:
        raise UserError("no uncertain parameter: give --std NAME=VALUE or --cov FILE")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"parameter {', '.join(repeated)} is given an uncertainty twice (--std and --cov)")
    matrix = np.zeros((len(names), len(names)))
    start = 0
    for part in parts:
        stop = start + len(part.names)
        matrix[start:stop, start:stop] = part.matrix
        start = stop
    if not np.any(matrix):
        raise UserError("every standard deviation is zero: nothing is uncertain")
    values = np.concatenate([part.values for part in parts])
    return ParameterCovariance(tuple(names), values, matrix)


@dataclass(frozen=True)
class ObservableUncertainty:
    """An observable's value at x* and its first-order standard deviation.

    Attributes:
        name, units, value: as :class:`mdsens.observable_gradients.ObservableGradient` has them.
        gradient: dq/dθ (total) by parameter name.
        sigma: √(g Σθ gᵀ).
    """

    name: str
    units: str
    value: float
    gradient: dict[str, float]
    sigma: float


@dataclass(frozen=True)
class LinearUncertainty:
    """First-order uncertainty of a relaxed state.

    Attributes:
        covariance: Σθ.
        jacobian: (P, N, d) dx*/dθ per parameter, in ``covariance.names`` order.
        blocks: (N, d, d) per-atom positional covariance C_i (zeros for rattlers).
        rattlers: (N,) particles whose rows are masked (positions not determined).
        observables: by name.
        observable_covariance: (Q, Q) G Σθ Gᵀ between the observables, in ``observables`` order.
        warnings: what the sensitivities warned about (rattlers, unresolved derivatives).
        wall_time: seconds, compilation included.
    """

    covariance: ParameterCovariance
    jacobian: np.ndarray
    blocks: np.ndarray
    rattlers: np.ndarray
    observables: dict[str, ObservableUncertainty]
    observable_covariance: np.ndarray
    warnings: list[str]
    wall_time: float

    @property
    def sigma(self) -> np.ndarray:
        """(N,) σ_i = √(tr C_i)."""
        return np.sqrt(np.maximum(np.trace(self.blocks, axis1=1, axis2=2), 0.0))

    @property
    def sigma_axes(self) -> np.ndarray:
        """(N, d) σ of each coordinate, √(C_i)_aa."""
        return np.sqrt(np.maximum(np.diagonal(self.blocks, axis1=1, axis2=2), 0.0))


def position_blocks(jacobian: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, d, d) blocks C_i = Σ_pq J_ip Σ_pq J_iqᵀ of ``jacobian`` (P, N, d) and Σ (P, P)."""
    return np.einsum("pia,pq,qib->iab", jacobian, matrix, jacobian)


# Compiled once per system (a System hashes by identity).
_rattlers = jax.jit(lambda system, x, params: system.rattlers(x, params), static_argnums=0)
_difference = jax.jit(lambda system, a, b: jax.vmap(system.displacement)(a, b), static_argnums=0)


def _observables(system: System, names: Sequence[str]) -> list[Observable]:
    return [parse_observable(system, name) for name in names]


def propagate(
    system: System,
    relaxed: RelaxResult | np.ndarray,
    covariance: ParameterCovariance,
    observables: Sequence[str] = (),
    *,
    dx: dict[str, np.ndarray] | None = None,
    solver: str | None = None,
) -> LinearUncertainty:
    """First-order uncertainty of the relaxed state ``relaxed`` (at the system's θ₀).

    Args:
        system: the system.
        relaxed: its relaxed state (a :class:`RelaxResult` or (N, d) positions).
        covariance: Σθ (:func:`covariance_from_std`, :func:`covariance_from_matrix`).
        observables: observable names (:func:`mdsens.observables.parse_observable`).
        dx: dx*/dθ already solved, by parameter name (the others are solved here).
        solver: ``cg`` or ``dense`` (default: the recipe's).

    Raises:
        UserError: an unknown observable.
        NotConvergedError: the state is not relaxed to the recipe's fmax.
        FloatingPointError: a derivative is not finite or a linear solve failed.
    """
    start = time.perf_counter()
    parsed = _observables(system, observables)
    positions = relaxed.positions if isinstance(relaxed, RelaxResult) else np.asarray(relaxed)
    names = list(covariance.names)
    dx = dict(dx or {})
    missing = [name for name in names if name not in dx]
    warnings: list[str] = []
    rattlers = None
    if missing:
        result = Sensitivity(system, solver).compute(relaxed, missing, spectrum=False)
        dx.update({name: entry.dx for name, entry in result.parameters.items()})
        warnings = result.warnings
        rattlers = result.rattlers
    if rattlers is None:
        rattlers = np.asarray(_rattlers(system, jnp.asarray(positions), system.params))
        if rattlers.any():
            warnings.append(f"{int(rattlers.sum())} rattler(s): their positions are not determined")
    jacobian = np.stack([np.asarray(dx[name], dtype=float) for name in names])
    blocks = position_blocks(jacobian, covariance.matrix)
    out: dict[str, ObservableUncertainty] = {}
    gradients = np.zeros((len(parsed), len(names)))
    if parsed:
        result = observable_gradients(
            system, positions, system.params, parsed, names, dx={n: dx[n] for n in names}, solver=solver
        )
        for k, observable in enumerate(parsed):
            entry = result.observables[observable.name]
            gradients[k] = [entry.gradient[name] for name in names]
            variance = float(gradients[k] @ covariance.matrix @ gradients[k])
            out[observable.name] = ObservableUncertainty(
                observable.name, entry.units, entry.value, dict(entry.gradient), math.sqrt(max(variance, 0.0))
            )
    return LinearUncertainty(
        covariance=covariance,
        jacobian=jacobian,
        blocks=blocks,
        rattlers=np.asarray(rattlers, dtype=bool),
        observables=out,
        observable_covariance=gradients @ covariance.matrix @ gradients.T,
        warnings=list(warnings),
        wall_time=time.perf_counter() - start,
    )


def draw(covariance: ParameterCovariance, samples: int, seed: int) -> np.ndarray:
    """(samples, P) offsets δ ~ N(0, Σθ) from NumPy's default generator seeded with ``seed``,
    as V √Λ z from the eigendecomposition Σθ = V Λ Vᵀ (semi-definite Σθ: Λ clipped at 0)."""
    rng = np.random.default_rng(seed)
    eigenvalues, vectors = np.linalg.eigh(covariance.matrix)
    factor = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
    return rng.standard_normal((samples, len(covariance.names))) @ factor.T


@dataclass(frozen=True)
class MonteCarlo:
    """K re-relaxations at parameters drawn from N(θ₀, Σθ).

    Attributes:
        seed: the generator's seed.
        deltas: (K, P) parameter offsets δ drawn.
        converged: (K,) whether each relaxation converged (only those enter the statistics).
        reasons: (K,) why a sample is left out ("" for the converged ones).
        steps: (K,) minimiser steps of each relaxation (0 where none ran).
        contact_changes: (K,) particles whose set of contacts differs from that at x* (0 for
            samples left out).
        prediction_error: (K,) ‖Δx − J δ‖ / ‖J δ‖ of each converged sample (NaN for the
            others): how far the first-order prediction is from the re-relaxed state.
        observable_names: the observables, in the order of ``observables``' columns.
        observables: (K, Q) each observable at each sample (NaN for samples left out).
        mean: (N, d) mean displacement of the converged samples from x*.
        blocks: (N, d, d) sample covariance of each atom's displacement (ddof 1).
        wall_time: seconds, compilation included.
    """

    seed: int
    deltas: np.ndarray
    converged: np.ndarray
    reasons: list[str]
    steps: np.ndarray
    contact_changes: np.ndarray
    prediction_error: np.ndarray
    observable_names: tuple[str, ...]
    observables: np.ndarray
    mean: np.ndarray
    blocks: np.ndarray
    wall_time: float

    @property
    def used(self) -> int:
        """Samples that converged (those the statistics are over)."""
        return int(self.converged.sum())

    @property
    def changed(self) -> int:
        """Converged samples whose contact network differs from that at x*."""
        return int(np.sum(self.contact_changes[self.converged] > 0))

    @property
    def sigma(self) -> np.ndarray:
        """(N,) √(tr) of the sample covariance blocks."""
        return np.sqrt(np.maximum(np.trace(self.blocks, axis1=1, axis2=2), 0.0))

    @property
    def observable_sigma(self) -> np.ndarray:
        """(Q,) sample standard deviation of each observable (ddof 1; NaN below 2 samples)."""
        values = self.observables[self.converged]
        if len(values) < 2:
            return np.full(len(self.observable_names), np.nan)
        return np.std(values, axis=0, ddof=1)


def _sample_params(system: System, covariance: ParameterCovariance, delta: np.ndarray) -> dict:
    params = system.params
    for name, step in zip(covariance.names, delta, strict=True):
        params = shifted(params, unit_tangent(system, name), float(step))
    return params


class _Engines:
    """A relaxer, and the compiled observables of its system, for every list size the samples
    need (a longer neighbour list for parameters that reach further)."""

    def __init__(self, relaxer: Relaxer, observable_names: Sequence[str]):
        self.names = list(observable_names)
        self.relaxer = relaxer
        self._system = None

    def for_params(self, params: dict, x) -> Relaxer:
        engine = self.relaxer.for_params(params, x)
        # Keep the larger engine: it covers every sample the smaller one did.
        self.relaxer = engine
        if engine.system is not self._system:
            system = engine.system
            self._system = system
            self.observables = [jax.jit(o.fn) for o in _observables(system, self.names)]
        return engine


def monte_carlo(
    system: System,
    relaxed: RelaxResult | np.ndarray,
    linear: LinearUncertainty,
    samples: int,
    seed: int = 0,
    *,
    relaxer: Relaxer | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MonteCarlo:
    """Re-relax the system at ``samples`` parameter sets drawn from N(θ₀, Σθ) of ``linear``.

    Each relaxation starts from x* (``relaxed``) and runs to the recipe's fmax. Samples are
    relaxed in order of decreasing interaction range, so that one neighbour list (the longest
    needed) serves all. ``relaxer`` (default: a new one) is reused if given.
    ``progress(done, converged)`` is called after each sample.

    Raises:
        ValueError: ``samples`` is negative.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, not {samples}")
    start = time.perf_counter()
    covariance = linear.covariance
    x0 = np.asarray(relaxed.positions if isinstance(relaxed, RelaxResult) else relaxed, dtype=float)
    n, d = x0.shape
    deltas = draw(covariance, samples, seed)
    names = tuple(linear.observables)
    engines = _Engines(Relaxer(system) if relaxer is None else relaxer, names)
    converged = np.zeros(samples, dtype=bool)
    reasons = [""] * samples
    steps = np.zeros(samples, dtype=int)
    changes = np.zeros(samples, dtype=int)
    prediction_error = np.full(samples, np.nan)
    values = np.full((samples, len(names)), np.nan)
    mean, m2, count = np.zeros((n, d)), np.zeros((n, d, d)), 0
    params = [_sample_params(system, covariance, delta) for delta in deltas]
    order = sorted(range(samples), key=lambda k: -system.reach(params[k]))
    for done, k in enumerate(order, start=1):
        try:
            engine = engines.for_params(params[k], x0)
        except UserError as error:
            reasons[k] = str(error)
        else:
            result = engine.relax(params[k], x0)
            steps[k] = result.steps
            if not result.converged:
                reasons[k] = result.reason or "did not converge"
            else:
                converged[k] = True
                x = np.asarray(result.positions)
                moved = np.asarray(_difference(system, jnp.asarray(x), jnp.asarray(x0)))
                moved = without_null_space(system, x0, system.params, moved)
                predicted = np.tensordot(deltas[k], linear.jacobian, axes=1)
                scale = float(np.linalg.norm(predicted))
                prediction_error[k] = float(np.linalg.norm(moved - predicted)) / scale if scale else np.nan
                changes[k] = int(np.sum(engine.system.contact_changes(x0, system.params, x, params[k])))
                values[k] = [float(fn(jnp.asarray(x), params[k])) for fn in engines.observables]
                # Welford's update: no cancellation between the mean and the spread.
                count += 1
                delta = moved - mean
                mean += delta / count
                m2 += np.einsum("ia,ib->iab", delta, moved - mean)
        if progress is not None:
            progress(done, int(converged.sum()))
    blocks = m2 / (count - 1) if count > 1 else np.full((n, d, d), np.nan)
    return MonteCarlo(
        seed=seed,
        deltas=deltas,
        converged=converged,
        reasons=reasons,
        steps=steps,
        contact_changes=changes,
        prediction_error=prediction_error,
        observable_names=names,
        observables=values,
        mean=mean,
        blocks=blocks,
        wall_time=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class Ratios:
    """Monte Carlo standard deviations over first-order ones.

    Attributes:
        ratio: (N,) σ_MC,i / σ_linear,i (NaN for atoms not compared).
        percentiles: the ratio's :data:`PERCENTILES` over the compared atoms.
        rms_ratio: √(Σ σ_MC,i² / Σ σ_linear,i²) over the compared atoms: the ratio of the total
            root-mean-square displacements.
        observables: by name, σ_MC / σ_linear (NaN where σ_linear = 0).
    """

    ratio: np.ndarray
    percentiles: dict[float, float]
    rms_ratio: float
    observables: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    """Monte Carlo standard deviations against the first-order ones, twice: with Σθ (what
    :func:`propagate` reports), and with the sample covariance of the δ actually drawn.

    The first ratio carries the sampling error of the draws themselves; the second does not: where
    x* responds linearly, Δx = J δ for every sample and the sample covariance of the
    displacements is exactly J Σ̂δ Jᵀ, so its ratios are 1 whatever K, and what departs from 1
    is the response's nonlinearity alone.

    Attributes:
        atoms: (N,) the atoms compared: not rattlers, with a first-order σ > 0.
        nominal: ratios to the first order with Σθ.
        drawn: ratios to the first order with the draws' sample covariance Σ̂δ (ddof 1).
        sampling_error: 1/√(2(K − 1)) for the K converged samples: the relative standard error
            of one standard deviation estimated from them (Gaussian samples); NaN below 2.
    """

    atoms: np.ndarray
    nominal: Ratios
    drawn: Ratios
    sampling_error: float


def _ratios(
    atoms: np.ndarray, sampled: np.ndarray, reference: np.ndarray, observables: dict[str, tuple[float, float]]
) -> Ratios:
    ratio = np.full(len(reference), np.nan)
    ratio[atoms] = sampled[atoms] / reference[atoms]
    if atoms.any():
        percentiles = dict(zip(PERCENTILES, np.percentile(ratio[atoms], PERCENTILES).tolist(), strict=True))
        rms = math.sqrt(float(np.sum(sampled[atoms] ** 2)) / float(np.sum(reference[atoms] ** 2)))
    else:
        percentiles, rms = {p: math.nan for p in PERCENTILES}, math.nan
    quotients = {name: a / b if b > 0 else math.nan for name, (a, b) in observables.items()}
    return Ratios(ratio, percentiles, rms, quotients)


def compare(linear: LinearUncertainty, mc: MonteCarlo) -> Comparison:
    """:class:`Comparison` of ``mc``'s sample standard deviations with ``linear``'s."""
    sigma_mc = mc.sigma
    atoms = ~linear.rattlers & (linear.sigma > 0) & np.isfinite(sigma_mc)
    used = mc.used
    names = list(linear.covariance.names)
    drawn_covariance = (
        np.cov(mc.deltas[mc.converged].T, ddof=1).reshape(len(names), len(names))
        if used > 1
        else np.full((len(names), len(names)), np.nan)
    )
    drawn_sigma = np.sqrt(
        np.maximum(np.trace(position_blocks(linear.jacobian, drawn_covariance), axis1=1, axis2=2), 0.0)
    )
    nominal, drawn = {}, {}
    for name, sigma in zip(mc.observable_names, mc.observable_sigma, strict=True):
        entry = linear.observables[name]
        gradient = np.array([entry.gradient[n] for n in names])
        nominal[name] = (float(sigma), entry.sigma)
        drawn[name] = (float(sigma), math.sqrt(max(float(gradient @ drawn_covariance @ gradient), 0.0)))
    return Comparison(
        atoms=atoms,
        nominal=_ratios(atoms, sigma_mc, linear.sigma, nominal),
        drawn=_ratios(atoms, sigma_mc, drawn_sigma, drawn),
        sampling_error=1 / math.sqrt(2 * (used - 1)) if used > 1 else math.nan,
    )
