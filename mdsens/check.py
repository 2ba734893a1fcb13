"""Checking an implicit sensitivity against independent references: ``mdsens check``.

For one parameter θ the implicit dx*/dθ is compared with

* central finite differences: re-relaxations at θ ± h, warm-started from x* and relaxed to a
  tight force tolerance, for several h; the spread over h says how far they can be trusted.
  Where the contact network differs between θ − h and θ + h, finite differences measure a jump,
  not a derivative: those particles are counted, and the comparison on the particles whose
  contacts did not change is shown too, but such a step is no reference (the whole network
  follows the jump);
* a direct solve: the dense Hessian, diagonalised, when it fits in memory;
* autodiff through the unrolled minimiser (forward mode, from the run's initial positions,
  for a few numbers of steps), for small systems.

The verdict rests on what can be trusted: the linear solve's residual, finite differences at the
best step h that changes no contact (re-relaxations converged), and the direct solve; when every
h changes contacts, the direct solve alone decides. Peak memory is XLA's own accounting of each
compiled computation (arguments, outputs and temporaries).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.measure import compiled_memory, peak_memory
from mdsens.relaxation import Relaxer, RelaxResult, max_force
from mdsens.sensitivity import (
    Sensitivity,
    expand_parameters,
    linear_solve_from_recipe,
    optimality_fn,
    unit_tangent,
)
from mdsens.system import System

STEPS = (1e-4, 1e-5, 1e-6)
TOLERANCE = 1e-5
DENSE_LIMIT = 2048  # degrees of freedom up to which the direct solve runs
UNROLL_LIMIT = 1024  # degrees of freedom up to which unrolled autodiff runs


@dataclass
class Row:
    """One comparison: ``error`` is ‖dx − dx_implicit‖ / ‖dx‖ over all particles,
    ``error_unchanged`` over the particles whose contacts did not change (finite differences)."""

    method: str
    error: float
    wall_time: float
    peak_memory: int | None = None
    h: float | None = None
    steps: int | None = None
    error_unchanged: float | None = None
    contact_changes: int | None = None


@dataclass
class ParameterCheck:
    """Every comparison for one parameter, and the verdict."""

    name: str
    rows: list[Row] = field(default_factory=list)
    passed: bool = False
    reason: str = ""


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def _untrusted(rows: list[Row]) -> str:
    """Why none of the finite-difference rows is a reference."""
    if not rows:
        return "no finite-difference step"
    if all(r.contact_changes for r in rows):
        return "contacts change at every h"
    return "at every h contacts change or a re-relaxation did not converge"


class Checker:
    """Compares implicit sensitivities of one relaxed run with independent references.

    Args:
        system: the system.
        relaxed: its relaxed state.
        steps: finite-difference steps h.
        fmax: force tolerance of the finite-difference re-relaxations (default: the tighter of
            the run's and 1e-12, so that an under-relaxed run is caught).
    """

    def __init__(self, system: System, relaxed: RelaxResult, steps=STEPS, fmax: float | None = None):
        self.system = system
        self.relaxed = relaxed
        self.steps = tuple(steps)
        fmax = min(system.recipe["minimizer"]["fmax"], 1e-12) if fmax is None else fmax
        self.relaxer = Relaxer(system, fmax=fmax)
        self.x = jnp.asarray(relaxed.positions)
        self.sensitivity = Sensitivity(system)
        metric_pairs = jax.vmap(system.displacement)
        self._difference = jax.jit(lambda a, b: metric_pairs(a, b))
        self._nullspace = jax.jit(system.nullspace)
        self._direct = Sensitivity(system, solver="dense")
        self._memories: dict[str, int | None] = {}

    def _memory(self, key: str, fn, *args) -> int | None:
        """Peak memory of ``fn(*args)``, compiled once per ``key``: it depends on the shapes of the
        arguments, which are the same for every parameter and every h."""
        if key not in self._memories:
            self._memories[key] = peak_memory(fn, *args)
        return self._memories[key]

    def _project(self, dx) -> np.ndarray:
        basis = self._nullspace(self.x, self.system.params)
        return np.asarray(implicit.project_out(basis, jnp.asarray(dx).ravel()).reshape(dx.shape))

    def check(self, name: str, tolerance: float = TOLERANCE, unroll=None) -> ParameterCheck:
        """Run every comparison for the scalar parameter ``name``."""
        system, params = self.system, self.system.params
        result = ParameterCheck(name)
        start = time.perf_counter()
        implicit_result = self.sensitivity.compute(
            self.relaxed, [name], allow_unconverged=True, spectrum=False
        )
        entry = implicit_result.parameters[name]
        tangent = unit_tangent(system, name)
        reference = entry.dx
        condition = optimality_fn(system)
        solve = linear_solve_from_recipe(system)
        memory = self._memory(
            "implicit",
            lambda x, p, t: implicit.root_jvp(condition, x, p, t, solve, system.nullspace),
            self.x,
            params,
            tangent,
        )
        result.rows.append(
            Row(
                "implicit (CG)" if entry.solver == "cg" else "implicit",
                0.0,
                time.perf_counter() - start,
                memory,
            )
        )
        residual_ok = entry.converged

        if self.x.size <= DENSE_LIMIT:
            start = time.perf_counter()
            direct, _ = self._dense(name)
            result.rows.append(
                Row("direct (dense)", _relative(reference, direct), time.perf_counter() - start)
            )

        fd_rows = [self._finite_difference(tangent, h, reference) for h in self.steps]
        result.rows += fd_rows

        if unroll is None:
            unroll = self._default_unroll()
        for steps in unroll:
            result.rows.append(self._unrolled(tangent, steps, reference))

        trusted = [
            r
            for r in fd_rows
            if r.contact_changes == 0 and r.error_unchanged is not None and np.isfinite(r.error_unchanged)
        ]
        best = min(trusted, key=lambda r: r.error_unchanged, default=None)
        direct_rows = [r for r in result.rows if r.method.startswith("direct")]
        problems = []
        if not residual_ok:
            problems.append(f"the linear solve did not converge (residual {entry.residual:.2g})")
        if any(r.error > tolerance for r in direct_rows):
            problems.append(f"the direct solve disagrees ({direct_rows[0].error:.2g})")
        if best is not None and best.error_unchanged > tolerance:
            problems.append(
                f"finite differences disagree (best {best.error_unchanged:.2g} at h = {best.h:g}, a step"
                " that changes no contact)"
            )
        if problems:
            force = implicit_result.max_force
            hint = f"; max|F| at the state is {force:.2g}: relax to a smaller fmax" if force > 1e-10 else ""
            result.reason = "; ".join(problems) + hint
        elif best is not None:
            result.passed = True
            result.reason = (
                f"finite differences agree to {best.error_unchanged:.2g} (h = {best.h:g}, no contact changes)"
            )
        elif direct_rows:
            result.passed = True
            result.reason = (
                f"{_untrusted(fd_rows)}: finite differences cannot judge; the direct solve agrees"
                f" ({direct_rows[0].error:.2g})"
            )
        else:
            result.reason = (
                f"no trusted reference: {_untrusted(fd_rows)} and the system is too large for a direct solve"
            )
        return result

    def _dense(self, name: str):
        out = self._direct.compute(self.relaxed, [name], allow_unconverged=True, spectrum=False)
        return out.parameters[name].dx, out.parameters[name]

    def _finite_difference(self, tangent, h: float, reference: np.ndarray) -> Row:
        system = self.system
        start = time.perf_counter()
        shifted = [
            jax.tree_util.tree_map(lambda p, t, s=s: p + s * h * t, system.params, tangent) for s in (1, -1)
        ]
        plus, minus = (self.relaxer.relax(p, x0=self.x) for p in shifted)
        dx = np.asarray(self._difference(jnp.asarray(plus.positions), jnp.asarray(minus.positions))) / (2 * h)
        dx = self._project(dx)
        wall = time.perf_counter() - start
        changed = system.contact_changes(plus.positions, shifted[0], minus.positions, shifted[1])
        unchanged = ~changed
        error_unchanged = _relative(reference[unchanged], dx[unchanged]) if unchanged.any() else None
        converged = plus.converged and minus.converged
        return Row(
            "finite differences" + ("" if converged else " (re-relaxation not converged)"),
            _relative(reference, dx),
            wall,
            self._memory("finite differences", lambda x, p: self.relaxer.solve(p, x), self.x, system.params),
            h=h,
            error_unchanged=error_unchanged if converged else None,
            contact_changes=int(changed.sum()),
        )

    def _default_unroll(self) -> tuple[int, ...]:
        if self.x.size > UNROLL_LIMIT or not self.relaxed.steps:
            return ()
        n = max(self.relaxed.steps, 1)
        return tuple(sorted({max(n // 4, 1), max(n // 2, 1), n, 2 * n}))

    def _unrolled(self, tangent, steps: int, reference: np.ndarray) -> Row:
        """Forward-mode autodiff through ``steps`` minimiser steps from the initial positions."""
        system = self.system
        init, step, positions_of = self.relaxer.unrolled()
        x0 = jnp.asarray(system.positions)

        def positions(params):
            state = jax.lax.fori_loop(0, steps, lambda _, s: step(s, params), init(x0, params))
            return positions_of(state)

        start = time.perf_counter()
        # Compiled once, both to run and for its memory accounting.
        run = jax.jit(lambda p, t: jax.jvp(positions, (p,), (t,))).lower(system.params, tangent).compile()
        x, dx = run(system.params, tangent)
        dx = self._project(np.asarray(dx))
        wall = time.perf_counter() - start
        memory = compiled_memory(run)
        final = float(max_force(system.force_fn(x, system.params)))
        return Row(
            f"unrolled forward ({steps} steps, max|F| {final:.1e})",
            _relative(reference, dx),
            wall,
            memory,
            steps=steps,
        )


def check_run(
    system: System,
    relaxed: RelaxResult,
    names,
    tolerance: float = TOLERANCE,
    steps=STEPS,
    unroll=None,
    progress=None,
) -> list[ParameterCheck]:
    """``mdsens check``: every comparison for every parameter name (``diameter`` expands)."""
    checker = Checker(system, relaxed, steps)
    out = []
    for name in expand_parameters(system, names):
        out.append(checker.check(name, tolerance, unroll))
        if progress is not None:
            progress(name)
    return out


def to_json(checks: list[ParameterCheck], tolerance: float) -> dict:
    """The content of ``RUN/check.json``."""
    return {
        "tolerance": tolerance,
        "passed": all(c.passed for c in checks),
        "parameters": {
            c.name: {"passed": c.passed, "reason": c.reason, "rows": [asdict(r) for r in c.rows]}
            for c in checks
        },
    }
