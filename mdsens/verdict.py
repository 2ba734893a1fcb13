"""The verdict of ``mdsens check``: from its comparisons and a tolerance, pass or fail and why.

Pure: nothing runs here but the rules (the measurements are :mod:`mdsens.check`'s). What can be
trusted:

* the implicit derivative's own linear solve must have converged, to a finite answer;
* a direct solve, where there is one, must agree;
* a finite difference is a reference only at a step h across which no pair crosses a non-smooth
  radius of the potential (a soft-sphere contact, either end of a Lennard-Jones or Morse switch:
  :func:`mdsens.references.crossings`) and whose two re-relaxations converged; the best such step
  must agree. Across a crossing a finite difference measures a jump or a kink, not the
  derivative: it is reported, never trusted, and never blamed on the implicit answer;
* when no step h is trusted, the direct solve alone decides; without one, nothing can (fail);
* autodiff through the unrolled minimiser is the derivative of the state the minimiser reached:
  reported, never deciding.

The tolerance and the steps h must be positive finite numbers (:func:`require_positive`); an
error that is not a number (NaN) never agrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mdsens.errors import UserError

IMPLICIT = "implicit"
DIRECT = "direct"
FINITE_DIFFERENCES = "finite differences"
UNROLLED = "unrolled"

# Below this max|F| the state is as relaxed as float64 allows: no hint to relax further.
RELAXED_ENOUGH = 1e-10

# How a reason names each non-smooth radius (mdsens.potentials.Potential.non_smooth_radii).
RADII = {
    "contact": "the contact distance",
    "r_onset": "the switch onset r_onset·σ",
    "r_cutoff": "the cutoff r_cutoff·σ",
}


def require_positive(what: str, value) -> float:
    """``value`` as a float, or a :class:`UserError` unless it is a positive finite number (a
    NaN tolerance would compare false everywhere; a zero or infinite step h measures nothing)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise UserError(f"{what} must be a positive finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class Comparison:
    """The implicit dx*/dθ against one other method.

    Attributes:
        kind: :data:`IMPLICIT` (the answer itself), :data:`DIRECT`, :data:`FINITE_DIFFERENCES`
            or :data:`UNROLLED`.
        method: a short label, e.g. ``implicit CG``, ``FD``, ``unrolled``.
        error: ‖dx_implicit − dx‖ / ‖dx‖ over all particles (for the implicit row 0, or NaN
            when its answer is not finite).
        wall_time: seconds of the compiled computation for this row, compilation excluded.
        compile_time: seconds this method spent compiling (tracing included); for the implicit,
            direct and finite-difference rows once per system, shared by every parameter and h.
        peak_memory: XLA's plan for the compiled computation, bytes (``None``: not measured).
        h: the finite-difference step.
        steps: the number of unrolled minimiser steps.
        error_unchanged: finite differences: the error over the particles in no crossing pair
            (``None`` when every particle is in one or a re-relaxation did not converge).
        crossings: finite differences: particles in a pair that crosses a non-smooth radius of
            the potential between θ − h and θ + h (for soft spheres: whose contacts change).
        crossed: finite differences: which radii were crossed (``contact``, ``r_onset``,
            ``r_cutoff``).
        converged: implicit: its linear solve converged; finite differences: both
            re-relaxations reached their force tolerance.
        residual: implicit: the linear solve's relative residual.
        note: what else the row says (iterations, the unrolled state's max|F|, ...).
    """

    kind: str
    method: str
    error: float
    wall_time: float
    compile_time: float | None = None
    peak_memory: int | None = None
    h: float | None = None
    steps: int | None = None
    error_unchanged: float | None = None
    crossings: int | None = None
    crossed: tuple[str, ...] = ()
    converged: bool | None = None
    residual: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def trusted(row: Comparison) -> bool:
    """Whether a finite-difference row is a reference: no crossing, both re-relaxations
    converged, a finite error."""
    return (
        row.kind == FINITE_DIFFERENCES
        and row.converged is True
        and row.crossings == 0
        and row.error_unchanged is not None
        and math.isfinite(row.error_unchanged)
    )


def _agrees(error: float, tolerance: float) -> bool:
    return error <= tolerance  # False for NaN


def _radii(rows: Sequence[Comparison]) -> str:
    """The radii crossed in ``rows``, in words: ``the switch onset r_onset·σ or the cutoff r_cutoff·σ``."""
    names = list(dict.fromkeys(name for r in rows for name in r.crossed))
    return " or ".join(RADII.get(name, name) for name in names) or "a non-smooth radius"


def _untrusted(rows: Sequence[Comparison]) -> str:
    """Why none of the finite-difference rows is a reference."""
    if not rows:
        return "no finite-difference step"
    if all(r.crossings for r in rows):
        return f"a pair crosses {_radii(rows)} at every h"
    return (
        "at every h a pair crosses a non-smooth radius, a re-relaxation did not converge or the error"
        " is not a number"
    )


def judge(rows: Sequence[Comparison], tolerance: float, max_force: float) -> Verdict:
    """Pass or fail, and why, for the comparisons of one parameter.

    Args:
        rows: every comparison, the implicit row among them.
        tolerance: the largest relative disagreement with a trusted reference that passes
            (positive and finite, else :class:`UserError`).
        max_force: max|F| at the state the derivative was taken at (a failure suggests relaxing
            further when it is above :data:`RELAXED_ENOUGH`).
    """
    tolerance = require_positive("the tolerance", tolerance)
    implicit_rows = [r for r in rows if r.kind == IMPLICIT]
    direct_rows = [r for r in rows if r.kind == DIRECT]
    fd_rows = [r for r in rows if r.kind == FINITE_DIFFERENCES]
    best = min((r for r in fd_rows if trusted(r)), key=lambda r: r.error_unchanged, default=None)

    problems = []
    if not implicit_rows:
        problems.append("no implicit result")
    for row in implicit_rows:
        if row.converged is False:
            problems.append(f"the linear solve did not converge (residual {row.residual:.2g})")
        if not math.isfinite(row.error):
            problems.append("the implicit result is not finite")
    for row in direct_rows:
        if not _agrees(row.error, tolerance):
            problems.append(f"the direct solve disagrees ({row.error:.2g})")
    if best is not None and not _agrees(best.error_unchanged, tolerance):
        problems.append(
            f"finite differences disagree (best {best.error_unchanged:.2g} at h = {best.h:g}, a step"
            " without crossings)"
        )
    if problems:
        hint = (
            f"; max|F| at the state is {max_force:.2g}: relax to a smaller fmax"
            if max_force > RELAXED_ENOUGH
            else ""
        )
        return Verdict(False, "; ".join(problems) + hint)
    if best is not None:
        return Verdict(
            True,
            f"finite differences agree to {best.error_unchanged:.2g} (h = {best.h:g}, no pair crosses"
            " a non-smooth radius)",
        )
    if direct_rows:
        return Verdict(
            True,
            f"{_untrusted(fd_rows)}: finite differences cannot judge; the direct solve agrees"
            f" ({direct_rows[0].error:.2g})",
        )
    return Verdict(
        False, f"no trusted reference: {_untrusted(fd_rows)} and the system is too large for a direct solve"
    )
