"""The seed paper's experiment, reproduced: ``mdsens paper`` calls :func:`run_paper`.

Blondel et al. (NeurIPS 2022) differentiate the relaxed positions x*(θ) of a 2-D bidisperse
soft-sphere packing (128 particles, φ = 0.98, after JAX-MD's meta-optimisation notebook) with
respect to θ = the diameter of the small species (0.6), by forward-mode implicit differentiation.
:func:`run_paper` regenerates, from nothing, into a directory (the committed ``results/paper/``
comes from ``mdsens paper --out results/paper``):

* the run (``system.toml``, ``relaxed.*``, ``sensitivity.*``) and its figures, among them the
  configuration with dx*/dθ arrows (``sensitivity-diameter.B.png``);
* ``unrolled.csv`` / ``unrolled_trace.csv`` / ``unrolled-error.png``: the error of forward-mode
  autodiff through K unrolled FIRE steps (from the same random start as the relaxation) against
  K, next to the implicit result, with max|F| after K steps; and the peak memory of reverse mode
  through K unrolled steps (XLA's compiled memory analysis; compiled, not run);
* ``finite_differences.csv`` / ``finite-differences.png``: central finite differences,
  warm-started from x*, for h from 1e-3 to 1e-7;
* ``costs.csv`` / ``costs.png``: wall time (after compilation) and peak memory per method;
* ``paper.json``: every number, the resolved recipe, package versions and the machine.

Every error is :func:`mdsens.references.relative_error` against the dense direct solve (the
Hessian diagonalised), after projecting the Hessian's zero modes out of dx. Lengths are in units
of the large diameter, energies in ε, forces in ε per length. The reference derivatives come from
:mod:`mdsens.references`, the tables and figures from :mod:`~mdsens.experiments.paper_files`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.experiments.paper_files import TRACE_COLUMNS, summarise, write_outputs
from mdsens.measure import best_time, compiled_memory
from mdsens.parameters import directional, unit_tangent
from mdsens.plot import plot_run
from mdsens.references import (
    central_difference,
    relative_error,
    unrolled_jvp,
    unrolled_trajectory_jvp,
    unrolled_vjp,
    without_null_space,
)
from mdsens.relaxation import Relaxer, RelaxResult, max_force
from mdsens.run import save_relaxation, save_sensitivity
from mdsens.sensitivity import Sensitivity, linear_solve_from_recipe, optimality_fn
from mdsens.system import System, load_system

SYSTEM = "binary-packing"
PARAMETER = "diameter.B"
# Central finite-difference steps (half-decades). On this packing one pair sits 7e-5 from
# contact, so the larger steps change the contact network.
FD_STEPS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
QUICK_FD_STEPS = (1e-4, 1e-5, 1e-6)

Progress = Callable[[str], None]


def default_steps(converged: int) -> list[int]:
    """Unroll lengths: 10, 20, 50, 100, … up to twice ``converged``, and ``converged`` itself."""
    top = 2 * converged
    grid = {m * 10**e for e in range(1, 9) for m in (1, 2, 5) if m * 10**e <= top}
    return sorted(grid | {converged, top})


def quick_steps(converged: int) -> list[int]:
    """Unroll lengths of the smoke version: 10, 100 and ``converged``."""
    return sorted({10, 100, converged})


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


@dataclass(frozen=True)
class Setting:
    """The relaxed packing, the parameter and the dense reference every method is measured against."""

    system: System
    relaxer: Relaxer
    relaxed: RelaxResult
    reference: np.ndarray  # dx*/dθ by the dense direct solve at x*
    tangent: dict
    cotangent: jax.Array  # reverse mode differentiates c · x*, c random and fixed

    @property
    def x(self) -> jax.Array:
        return jnp.asarray(self.relaxed.positions)

    def errors(self, dxs, reference: np.ndarray | None = None) -> np.ndarray:
        """Relative error of each dx in the stack ``dxs`` (K, N, d) against ``reference``
        (default: the dense solve at x*), zero modes projected out."""
        reference = self.reference if reference is None else reference
        projected = without_null_space(self.system, self.x, self.system.params, np.asarray(dxs))
        return np.array([relative_error(dx, reference) for dx in projected])

    def max_forces(self, xs) -> np.ndarray:
        """max|F| at each state of the stack ``xs`` (K, N, d), at θ."""
        return np.asarray(_max_forces(self.system.force_fn, jnp.asarray(xs), self.system.params))


@functools.partial(jax.jit, static_argnums=0)
def _max_forces(force_fn, xs, params):
    # Compiled once per system (a bound method compares equal for the same system).
    return jax.lax.map(lambda x: max_force(force_fn(x, params)), xs, batch_size=64)


def measure_implicit(s: Setting) -> dict:
    """Forward (dx*/dθ) and reverse (d(c · x*)/dθ) implicit differentiation: errors, CG
    iterations, wall time after compilation and peak memory."""
    system, params = s.system, s.system.params
    condition, solve = optimality_fn(system), linear_solve_from_recipe(system)
    forward = _compile(
        lambda x, p, t: implicit.root_jvp(condition, x, p, t, solve, system.nullspace), s.x, params, s.tangent
    )
    (dx, info), forward_time = best_time(lambda: forward(s.x, params, s.tangent))
    reverse = _compile(
        lambda x, p, c: implicit.root_vjp(condition, x, p, c, solve, system.nullspace),
        s.x,
        params,
        s.cotangent,
    )
    (params_bar, reverse_info), reverse_time = best_time(lambda: reverse(s.x, params, s.cotangent))
    # Reverse mode gives d(c·x*)/dθ; forward mode gives c·dx*/dθ (c projected: the null-space
    # part of c is not determined by the implicit derivative).
    c = without_null_space(system, s.x, params, s.cotangent)
    expected = float(np.sum(c * s.reference))
    got = directional(params_bar, s.tangent)
    return {
        "error": float(s.errors(np.asarray(dx)[None])[0]),
        "forward_wall_time_s": forward_time,
        "forward_peak_memory_bytes": compiled_memory(forward),
        "forward_iterations": int(info.iterations),
        "forward_residual": float(info.residual),
        "reverse_wall_time_s": reverse_time,
        "reverse_peak_memory_bytes": compiled_memory(reverse),
        "reverse_iterations": int(reverse_info.iterations),
        "reverse_error": abs(got - expected) / abs(expected),
    }


def measure_unrolled_forward(s: Setting, steps_list: Sequence[int], repeats: int = 1):
    """Forward mode through K steps from the initial positions, for each K, from scratch.

    K is a run-time argument: one compilation serves every K, and its memory cannot depend on K
    (forward mode carries the tangent along, it stores no trajectory). Returns the rows, the
    peak memory, and (x_K, dx_K) of the last K.
    """
    params = s.system.params
    compiled = _compile(lambda p, t, k: unrolled_jvp(s.relaxer, p, t, k), params, s.tangent, jnp.asarray(1))
    rows = []
    for steps in steps_list:
        k = jnp.asarray(steps)
        (x, dx), wall = best_time(lambda k=k: compiled(params, s.tangent, k), repeats)
        rows.append(
            {
                "steps": int(steps),
                "error": float(s.errors(np.asarray(dx)[None])[0]),
                "max_force": float(s.max_forces(np.asarray(x)[None])[0]),
                "wall_time_s": wall,
            }
        )
    return rows, compiled_memory(compiled), (np.asarray(x), np.asarray(dx))


def unrolled_trace(s: Setting, length: int) -> dict[str, np.ndarray]:
    """Error and max|F| after every K = 1 … ``length`` steps, from one forward-mode pass."""
    trajectory = jax.jit(lambda p, t: unrolled_trajectory_jvp(s.relaxer, p, t, length))
    xs, dxs = trajectory(s.system.params, s.tangent)
    return {"steps": np.arange(1, length + 1), "error": s.errors(dxs), "max_force": s.max_forces(xs)}


def unrolled_reverse_memory(s: Setting, steps: int) -> int | None:
    """Peak memory of reverse mode through ``steps`` unrolled steps: compiled, not run."""
    pullback = _compile(lambda p, c: unrolled_vjp(s.relaxer, p, c, steps), s.system.params, s.cotangent)
    return compiled_memory(pullback)


def reference_floor(s: Setting, dense: Sensitivity, steps: int, x_last, dx_last) -> dict:
    """How exact the reference itself is. x* is relaxed to fmax only: re-derived at the state the
    longest unrolled run reached (relaxed further), the reference moves by about what unrolling
    converges to."""
    moved = dense.compute(x_last, [PARAMETER], allow_unconverged=True, spectrum=False)
    moved_reference = moved.parameters[PARAMETER].dx
    return {
        "steps": steps,
        "max_force": moved.max_force,
        "reference_shift": relative_error(moved_reference, s.reference),
        "unrolled_error_vs_reference_at_that_state": float(s.errors(dx_last[None], moved_reference)[0]),
    }


def measure_finite_differences(s: Setting, steps: Sequence[float], repeats: int = 1):
    """Central differences, both sides re-relaxed from x* (warm start) to the run's fmax; the
    wall time (of the two relaxations) is the best of ``repeats``. Returns the rows and the
    peak memory of one relaxation."""
    rows = []
    for h in steps:
        fds = [central_difference(s.relaxer, s.x, s.system.params, s.tangent, h) for _ in range(repeats)]
        fd = fds[-1]
        rows.append(
            {
                "h": h,
                "error": float(s.errors(fd.dx[None])[0]),
                "wall_time_s": min(f.wall_time for f in fds),
                "contact_changes": int(np.sum(fd.changed)),
                "converged": fd.converged,
                "steps_plus": fd.plus.steps,
                "steps_minus": fd.minus.steps,
            }
        )
    return rows, compiled_memory(_compile(s.relaxer.solve, s.system.params, s.x))


def reverse_bytes_per_step(rows: list[dict]) -> float | None:
    """Slope of unrolled reverse-mode memory against K (a line through the measured K)."""
    measured = [r for r in rows if r["reverse_peak_memory_bytes"] is not None]
    if len(measured) < 2:
        return None
    ks = np.array([r["steps"] for r in measured], dtype=float)
    memory = np.array([r["reverse_peak_memory_bytes"] for r in measured], dtype=float)
    return float(np.polyfit(ks, memory, 1)[0])


def run_paper(
    out_dir: str | os.PathLike,
    steps_list: Sequence[int] | None = None,
    progress: Progress | None = None,
    quick: bool = False,
    fd_steps: Sequence[float] | None = None,
) -> dict:
    """Regenerate the seed paper's experiment into ``out_dir``; return what ``paper.json`` holds.

    Args:
        out_dir: output directory (created; its previous run files and figures are replaced).
        steps_list: numbers of unrolled FIRE steps K; default 10, 20, 50, … up to twice the
            steps the relaxation needed (:func:`default_steps`), or 10, 100 and the converged
            count with ``quick``. The converged count is always added.
        progress: called with a one-line message as each stage starts.
        quick: the smoke version: fewer unroll lengths and finite-difference steps, reverse-mode
            memory at the converged K only, no per-step trace and no Hessian spectrum.
        fd_steps: finite-difference steps h; default :data:`FD_STEPS` (:data:`QUICK_FD_STEPS`
            with ``quick``).

    Raises:
        NotConvergedError: the relaxation did not reach the recipe's fmax.
    """
    say = progress if progress is not None else (lambda message: None)
    out = Path(out_dir)
    started = time.perf_counter()

    say(f"relaxing {SYSTEM}")
    system = load_system(SYSTEM)
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    # Wall times are the best of `repeats` calls after compilation (the machine may be shared).
    repeats = 1 if quick else 3
    relax_time = min(relaxer.relax().wall_time for _ in range(repeats))
    converged_steps = relaxed.steps
    save_relaxation(out, system, relaxed)

    say(f"implicit sensitivity to {PARAMETER} (CG) and the dense reference")
    sensitivity = Sensitivity(system).compute(relaxed, [PARAMETER], spectrum=not quick)
    save_sensitivity(out, system, sensitivity)
    dense = Sensitivity(system, solver="dense")
    x = jnp.asarray(relaxed.positions)
    setting = Setting(
        system=system,
        relaxer=relaxer,
        relaxed=relaxed,
        reference=dense.compute(relaxed, [PARAMETER], spectrum=False).parameters[PARAMETER].dx,
        tangent=unit_tangent(system, PARAMETER),
        cotangent=jax.random.normal(jax.random.PRNGKey(0), x.shape, dtype=x.dtype),
    )

    say("figures of the run (configuration with dx*/dθ arrows)")
    run_figures = [p.name for p in plot_run(out, params=[PARAMETER])]

    say("implicit forward and reverse mode: wall time and peak memory")
    implicit_result = measure_implicit(setting)
    saved_error = float(setting.errors(sensitivity.parameters[PARAMETER].dx[None])[0])

    if steps_list is None:
        steps_list = quick_steps(converged_steps) if quick else default_steps(converged_steps)
    steps_list = sorted({int(k) for k in steps_list} | {converged_steps})
    if steps_list[0] < 1:
        raise ValueError(f"numbers of unrolled steps must be positive: {steps_list}")
    say(f"unrolled forward mode through K = {', '.join(map(str, steps_list))} FIRE steps")
    unrolled, forward_memory, (x_last, dx_last) = measure_unrolled_forward(setting, steps_list, repeats)
    floor = reference_floor(setting, dense, steps_list[-1], x_last, dx_last)
    if quick:  # the timed runs only
        trace = {key: np.array([r[key] for r in unrolled]) for key in TRACE_COLUMNS}
    else:
        trace = unrolled_trace(setting, max(steps_list))
    for row in unrolled:
        # A compilation each (seconds): the smoke version measures the converged K alone.
        if quick and row["steps"] != converged_steps:
            row["reverse_peak_memory_bytes"] = None
            continue
        say(f"reverse mode through {row['steps']} unrolled steps: compiling for its memory")
        row["reverse_peak_memory_bytes"] = unrolled_reverse_memory(setting, row["steps"])

    fd_steps = tuple(fd_steps) if fd_steps is not None else (QUICK_FD_STEPS if quick else FD_STEPS)
    say(f"central finite differences, h = {', '.join(f'{h:g}' for h in fd_steps)}")
    fd_rows, fd_memory = measure_finite_differences(setting, fd_steps, repeats)

    summary = summarise(
        quick=quick,
        system=system,
        relaxed=relaxed,
        relax_time=relax_time,
        sensitivity=sensitivity,
        reference=setting.reference,
        implicit_result={**implicit_result, "saved_error": saved_error},
        unrolled={
            "forward_peak_memory_bytes": forward_memory,
            "reverse_bytes_per_step": reverse_bytes_per_step(unrolled),
            "reference_at_last_state": floor,
            "rows": unrolled,
            "trace": {key: np.asarray(value).tolist() for key, value in trace.items()},
        },
        fd_rows=fd_rows,
        fd_memory=fd_memory,
    )
    say("writing tables and figures")
    write_outputs(out, summary, run_figures, started)
    say(f"done in {summary['total_wall_time_s']:.0f} s: {out}")
    return summary
