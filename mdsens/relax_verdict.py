"""When a relaxation has converged, diverged or failed: the checks and messages of mdsens.relaxation.

A minimiser only goes downhill when its step is stable, so an energy above the start means an
unstable step; a non-finite energy, force or position is never converged; the force tolerance
must be a positive finite number, or no state could honestly be called converged.
"""

from __future__ import annotations

import numpy as np

from mdsens.errors import NotConvergedError, UserError

DIVERGED_RISE = 0.01
"""An energy this fraction of the energy scale above the start is divergence (see :func:`far_above`)."""
UNSTABLE_HINT = "reduce minimizer.dt_max / dt_start, or minimizer.step_size"


def energy_rose(before: float, after: float) -> bool:
    """Whether an energy rose beyond round-off: a minimiser must not end above its start."""
    return after > before + 1e-9 * max(1.0, abs(before))


def far_above(initial: float, energy: float, lowest: float) -> bool:
    """Whether ``energy`` is so far above the ``initial`` one that the minimiser has diverged.

    FIRE and gradient descent only go downhill when their step is stable (FIRE's kinetic energy
    comes from the potential energy it lost), so an energy above the start by more than
    :data:`DIVERGED_RISE` × the energy scale (the larger of |E₀| and the largest |E| seen) is an
    unstable step, not a transient. NaN counts as far above.
    """
    scale = max(abs(initial), abs(lowest))
    return not energy <= initial + max(DIVERGED_RISE * scale, 1e-9 * max(1.0, abs(initial)))


def check_tolerances(fmax: float, max_steps: int) -> None:
    """Raise :class:`UserError` unless ``fmax`` is positive and finite and ``max_steps`` ≥ 0."""
    if not (np.isfinite(fmax) and fmax > 0):
        raise UserError(f"the force tolerance fmax must be a positive finite number, not {fmax!r}")
    if max_steps < 0:
        raise UserError(f"max_steps must be at least 0, not {max_steps!r}")


def divergence(
    steps: int, energy: float, force: float, positions, initial_energy: float, lowest: float
) -> str:
    """Why a relaxation has diverged after ``steps`` steps, or "" if it has not: a non-finite
    energy, force or position, or an energy :func:`far_above` the start."""
    finite = np.isfinite([initial_energy, energy, force]).all() and bool(
        np.all(np.isfinite(np.asarray(positions)))
    )
    if not finite:
        return f"diverged after {steps} steps: non-finite energy, forces or positions"
    if far_above(initial_energy, energy, lowest):
        return (
            f"diverged after {steps} steps: the energy rose from {initial_energy:.6g} to {energy:.6g}"
            f" (max|F| {force:.3g})"
        )
    return ""


def stop_reason(
    converged: bool, initial_energy: float, energy: float, force: float, fmax: float, steps: int
) -> str:
    """Why a relaxation that did not diverge stopped."""
    if converged:
        return f"converged: max|F| {force:.3g} <= fmax {fmax:.3g} after {steps} steps"
    if energy_rose(initial_energy, energy):
        return f"unstable: the energy rose from {initial_energy:.6g} to {energy:.6g}"
    return f"not converged: max|F| {force:.3g} > fmax {fmax:.3g} after {steps} steps"


def raise_if_unsolved(unconverged, missing, force, steps, *, fmax: float, max_steps: int) -> None:
    """Raise where :attr:`Relaxer.solve` returned its NaN sentinel (called from compiled code:
    JAX re-raises it as a runtime error carrying this message)."""
    if np.any(missing):
        raise NotConvergedError(
            "x*(θ): the neighbour list cannot hold the pairs at these parameters (their range exceeds"
            " its cutoff, or the list overflowed); build x*(θ) with relaxer.for_params(params, x)"
        )
    if np.any(unconverged):
        raise NotConvergedError(
            f"x*(θ): the relaxation did not converge (max|F| {np.max(force):.3g} vs fmax {fmax:.3g}"
            f" after {int(np.max(steps))} of {max_steps} steps); its derivative would be wrong:"
            " raise max_steps or warm-start from a relaxed state"
        )
