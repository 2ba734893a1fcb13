"""The measurements of ``mdsens check``: an implicit sensitivity against independent references.

For one parameter θ the implicit dx*/dθ is compared with

* central finite differences (:func:`mdsens.references.central_difference`): re-relaxations at
  θ ± h, warm-started from x* and relaxed to a tight force tolerance, for several h, with the
  particles counted whose pairs cross a non-smooth radius of the potential between θ − h and
  θ + h (a soft-sphere contact, either end of a Lennard-Jones or Morse switch);
* a direct solve: the dense Hessian, diagonalised, when it fits in memory;
* autodiff through the unrolled minimiser (forward mode, from the run's initial positions, for a
  few numbers of steps), for small systems.

Which of them can be trusted, and whether the implicit answer agrees, is
:func:`mdsens.verdict.judge`'s (pure). Times are those of compiled calls: each method is
compiled (or run once to warm up) before it is timed, and its compilation is reported apart.
Peak memory is XLA's own accounting of each compiled computation (arguments, outputs and
temporaries).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.measure import compiled_memory, peak_memory
from mdsens.parameters import expand_parameters, unit_tangent
from mdsens.references import central_difference, relative_error, unrolled_jvp, without_null_space
from mdsens.relaxation import Relaxer, RelaxResult, max_force
from mdsens.sensitivity import Sensitivity, linear_solve_from_recipe, optimality_fn
from mdsens.system import System
from mdsens.verdict import (
    DIRECT,
    FINITE_DIFFERENCES,
    IMPLICIT,
    UNROLLED,
    Comparison,
    judge,
    require_positive,
)

STEPS = (1e-4, 1e-5, 1e-6)
TOLERANCE = 1e-5
DIRECT_SOLVE_LIMIT = 2048  # degrees of freedom up to which the dense direct solve runs
UNROLL_LIMIT = 1024  # degrees of freedom up to which unrolled autodiff runs


@dataclass(frozen=True)
class ParameterCheck:
    """Every comparison for one parameter, and the verdict."""

    name: str
    rows: list[Comparison]
    passed: bool
    reason: str


class Checker:
    """Compares implicit sensitivities of one relaxed run with independent references.

    Everything that compiles (relaxations, solves, memory accounting) is built once here and
    serves every parameter and every step h.

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
        self.steps = _steps(steps)
        # Seconds each method spent compiling, measured at its first use (see _warm).
        self.compile_times: dict[str, float] = {}
        self.fmax = min(system.recipe["minimizer"]["fmax"], 1e-12) if fmax is None else fmax
        self.x = jnp.asarray(relaxed.positions)
        self.relaxer = Relaxer(system).for_params(system.params, self.x)
        self.sensitivity = Sensitivity(system)
        self.direct = Sensitivity(system, solver="dense")
        # Memory depends on the shapes of the arguments only: the same for every parameter and h.
        condition, solve = optimality_fn(system), linear_solve_from_recipe(system)
        zero_tangent = jax.tree_util.tree_map(jnp.zeros_like, system.params)
        self.implicit_memory = peak_memory(
            lambda x, p, t: implicit.root_jvp(condition, x, p, t, solve, system.nullspace),
            self.x,
            system.params,
            zero_tangent,
        )
        self.relaxation_memory = peak_memory(lambda x, p: self.relaxer.solve(p, x), self.x, system.params)

    def check(self, name: str, tolerance: float = TOLERANCE, unroll=None, steps=None) -> ParameterCheck:
        """Every comparison for the scalar parameter ``name``, and the verdict.

        Args:
            name: the parameter.
            tolerance: the largest relative disagreement with a trusted reference that passes
                (positive and finite).
            unroll: numbers of unrolled minimiser steps (default: :meth:`default_unroll`).
            steps: finite-difference steps h (default: the checker's; positive and finite).

        Raises:
            UserError: a tolerance or step h that is not a positive finite number.
        """
        tolerance = require_positive("the tolerance", tolerance)
        steps = self.steps if steps is None else _steps(steps)
        result, entry, compile_time = self._warm(
            IMPLICIT,
            lambda: self.sensitivity.compute(self.relaxed, [name], allow_unconverged=True, spectrum=False),
            name,
        )
        rows = [
            Comparison(
                IMPLICIT,
                f"implicit {entry.solver}",
                0.0,
                entry.wall_time,
                compile_time,
                self.implicit_memory,
                converged=entry.converged,
                residual=entry.residual,
                note=f"{entry.iterations} it, residual {entry.residual:.1e}",
            )
        ]
        if self.x.size <= DIRECT_SOLVE_LIMIT:
            rows.append(self._direct(name, entry.dx))
        tangent = unit_tangent(self.system, name)
        if steps:
            self._warm_relaxation()
        rows += [self._finite_difference(tangent, h, entry.dx) for h in steps]
        for k in self.default_unroll() if unroll is None else unroll:
            rows.append(self._unrolled(tangent, k, entry.dx))
        verdict = judge(rows, tolerance, result.max_force)
        return ParameterCheck(name, rows, verdict.passed, verdict.reason)

    def _warm(self, kind: str, compute, name: str):
        """(result, entry, compile seconds) of ``compute()``: the first time for ``kind`` run twice,
        so that the entry's time is the compiled call's and the difference is compilation."""
        first = compute()
        if kind in self.compile_times:
            return first, first.parameters[name], self.compile_times[kind]
        again = compute()
        entry = again.parameters[name]
        self.compile_times[kind] = max(first.parameters[name].wall_time - entry.wall_time, 0.0)
        return again, entry, self.compile_times[kind]

    def _warm_relaxation(self) -> None:
        """Compile the re-relaxations before any is timed: relax at θ from x* twice; the first
        call's extra time is compilation."""
        if FINITE_DIFFERENCES in self.compile_times:
            return
        first, again = (
            self.relaxer.relax(self.system.params, x0=self.x, fmax=self.fmax).wall_time for _ in range(2)
        )
        self.compile_times[FINITE_DIFFERENCES] = max(first - again, 0.0)

    def _direct(self, name: str, dx: np.ndarray) -> Comparison:
        _, entry, compile_time = self._warm(
            DIRECT,
            lambda: self.direct.compute(self.relaxed, [name], allow_unconverged=True, spectrum=False),
            name,
        )
        return Comparison(DIRECT, "direct", relative_error(dx, entry.dx), entry.wall_time, compile_time)

    def _finite_difference(self, tangent, h: float, dx: np.ndarray) -> Comparison:
        system = self.system
        fd = central_difference(self.relaxer, self.x, system.params, tangent, h, fmax=self.fmax)
        unchanged = ~fd.changed
        error_unchanged = None
        if fd.converged and unchanged.any():
            error_unchanged = relative_error(dx[unchanged], fd.dx[unchanged])
        return Comparison(
            FINITE_DIFFERENCES,
            "FD",
            relative_error(dx, fd.dx),
            fd.wall_time,
            self.compile_times[FINITE_DIFFERENCES],
            self.relaxation_memory,
            h=h,
            error_unchanged=error_unchanged,
            crossings=int(fd.changed.sum()),
            crossed=fd.crossed,
            converged=fd.converged,
            note=f"{fd.plus.steps} + {fd.minus.steps} steps"
            + ("" if fd.converged else ", re-relaxation not converged"),
        )

    def default_unroll(self) -> tuple[int, ...]:
        """A quarter, half, once and twice the relaxation's steps, for systems of at most
        :data:`UNROLL_LIMIT` degrees of freedom; none otherwise."""
        if self.x.size > UNROLL_LIMIT or not self.relaxed.steps:
            return ()
        n = max(self.relaxed.steps, 1)
        return tuple(sorted({max(n // 4, 1), max(n // 2, 1), n, 2 * n}))

    def _unrolled(self, tangent, steps: int, dx: np.ndarray) -> Comparison:
        """Forward-mode autodiff through ``steps`` minimiser steps from the initial positions."""
        system = self.system
        start = time.perf_counter()
        # Compiled once, both to run and for its memory accounting.
        run = (
            jax.jit(lambda p, t: unrolled_jvp(self.relaxer, p, t, steps))
            .lower(system.params, tangent)
            .compile()
        )
        compiled = time.perf_counter()
        x, unrolled = jax.block_until_ready(run(system.params, tangent))
        wall = time.perf_counter() - compiled
        unrolled = without_null_space(system, self.x, system.params, unrolled)
        final = float(max_force(system.force_fn(x, system.params)))
        return Comparison(
            UNROLLED,
            "unrolled",
            relative_error(dx, unrolled),
            wall,
            compiled - start,
            compiled_memory(run),
            steps=steps,
            note=f"forward mode; max|F| {final:.1e} at the end",
        )


def _steps(steps) -> tuple[float, ...]:
    return tuple(require_positive("a finite-difference step h", h) for h in steps)


def check_run(
    system: System,
    relaxed: RelaxResult,
    names,
    tolerance: float = TOLERANCE,
    steps=STEPS,
    unroll=None,
    progress=None,
) -> list[ParameterCheck]:
    """``mdsens check``: every comparison for every parameter name (``diameter`` expands).

    Raises:
        UserError: a tolerance or step h that is not a positive finite number (before anything
            runs), or an unknown parameter.
    """
    tolerance = require_positive("the tolerance", tolerance)
    names = expand_parameters(system, names)
    checker = Checker(system, relaxed, steps)
    out = []
    for name in names:
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
