"""The verdict of ``mdsens check``: from its comparisons and a tolerance, pass or fail and why.

Pure: nothing runs here but the rules (the measurements are :mod:`mdsens.check`'s). What can be
trusted:

* the implicit derivative's own linear solve must have converged;
* a direct solve, where there is one, must agree;
* a finite difference is a reference only at a step h that changes no contact and whose two
  re-relaxations converged; the best such step must agree. Across a change of contacts a finite
  difference measures a jump, not a derivative: it is reported, never trusted;
* when no step h is trusted, the direct solve alone decides; without one, nothing can (fail);
* autodiff through the unrolled minimiser is the derivative of the state the minimiser reached:
  reported, never deciding.

An error that is not a number (NaN) never agrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

IMPLICIT = "implicit"
DIRECT = "direct"
FINITE_DIFFERENCES = "finite differences"
UNROLLED = "unrolled"

# Below this max|F| the state is as relaxed as float64 allows: no hint to relax further.
RELAXED_ENOUGH = 1e-10


@dataclass(frozen=True)
class Comparison:
    """The implicit dx*/dθ against one other method.

    Attributes:
        kind: :data:`IMPLICIT` (the answer itself), :data:`DIRECT`, :data:`FINITE_DIFFERENCES`
            or :data:`UNROLLED`.
        method: how it is shown, e.g. ``implicit (CG)`` or ``unrolled forward (40 steps, ...)``.
        error: ‖dx_implicit − dx‖ / ‖dx‖ over all particles (0 for the implicit row).
        wall_time: seconds.
        peak_memory: XLA's plan for the compiled computation, bytes (``None``: not measured).
        h: the finite-difference step.
        steps: the number of unrolled minimiser steps.
        error_unchanged: finite differences: the error over the particles whose contacts did
            not change (``None`` when no particle kept its contacts or a re-relaxation did not
            converge).
        contact_changes: finite differences: particles whose contacts differ between θ ± h.
        converged: implicit: its linear solve converged; finite differences: both
            re-relaxations reached their force tolerance.
        residual: implicit: the linear solve's relative residual.
    """

    kind: str
    method: str
    error: float
    wall_time: float
    peak_memory: int | None = None
    h: float | None = None
    steps: int | None = None
    error_unchanged: float | None = None
    contact_changes: int | None = None
    converged: bool | None = None
    residual: float | None = None


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def trusted(row: Comparison) -> bool:
    """Whether a finite-difference row is a reference: no contact change, both re-relaxations
    converged, a finite error."""
    return (
        row.kind == FINITE_DIFFERENCES
        and row.converged is True
        and row.contact_changes == 0
        and row.error_unchanged is not None
        and math.isfinite(row.error_unchanged)
    )


def _agrees(error: float, tolerance: float) -> bool:
    return error <= tolerance  # False for NaN


def _untrusted(rows: Sequence[Comparison]) -> str:
    """Why none of the finite-difference rows is a reference."""
    if not rows:
        return "no finite-difference step"
    if all(r.contact_changes for r in rows):
        return "contacts change at every h"
    return "at every h contacts change, a re-relaxation did not converge or the error is not a number"


def judge(rows: Sequence[Comparison], tolerance: float, max_force: float) -> Verdict:
    """Pass or fail, and why, for the comparisons of one parameter.

    Args:
        rows: every comparison, the implicit row among them.
        tolerance: the largest relative disagreement with a trusted reference that passes.
        max_force: max|F| at the state the derivative was taken at (a failure suggests relaxing
            further when it is above :data:`RELAXED_ENOUGH`).
    """
    implicit_rows = [r for r in rows if r.kind == IMPLICIT]
    direct_rows = [r for r in rows if r.kind == DIRECT]
    fd_rows = [r for r in rows if r.kind == FINITE_DIFFERENCES]
    best = min((r for r in fd_rows if trusted(r)), key=lambda r: r.error_unchanged, default=None)

    problems = []
    for row in implicit_rows:
        if row.converged is False:
            problems.append(f"the linear solve did not converge (residual {row.residual:.2g})")
    for row in direct_rows:
        if not _agrees(row.error, tolerance):
            problems.append(f"the direct solve disagrees ({row.error:.2g})")
    if best is not None and not _agrees(best.error_unchanged, tolerance):
        problems.append(
            f"finite differences disagree (best {best.error_unchanged:.2g} at h = {best.h:g}, a step"
            " that changes no contact)"
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
            f"finite differences agree to {best.error_unchanged:.2g} (h = {best.h:g}, no contact changes)",
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
