"""The seed paper's experiment, reproduced: ``python -m mdsens.experiments.paper``.

Blondel et al. (NeurIPS 2022) differentiate the relaxed positions x*(θ) of a 2-D bidisperse
soft-sphere packing (128 particles, φ = 0.98, after JAX-MD's meta-optimisation notebook) with
respect to θ = the diameter of the small species (0.6), by forward-mode implicit differentiation.
This script regenerates, from nothing, into ``results/paper/``:

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

Every error is ‖dx − dx_ref‖ / ‖dx_ref‖ against the dense direct solve (the Hessian
diagonalised), after projecting rigid translations out of dx. Lengths are in units of the large
diameter, energies in ε, forces in ε per length.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from mdsens import atomic, implicit
from mdsens.measure import best_time, compiled_memory
from mdsens.plot import plot_run
from mdsens.relaxation import Relaxer, max_force
from mdsens.run import save_relaxation, save_sensitivity, versions
from mdsens.sensitivity import (
    Sensitivity,
    directional,
    linear_solve_from_recipe,
    optimality_fn,
    unit_tangent,
)
from mdsens.system import System, load_system

SYSTEM = "binary-packing"
PARAMETER = "diameter.B"
OUT_DIR = "results/paper"
# Central finite-difference steps (half-decades). On this packing one pair sits 7e-5 from
# contact (REFERENCE.md), so the larger steps change the contact network.
FD_STEPS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
QUICK_FD_STEPS = (1e-4, 1e-5, 1e-6)
DPI = 120
MiB = 2.0**20

UNROLLED_COLUMNS = ("steps", "error", "max_force", "wall_time_s", "reverse_peak_memory_bytes")
TRACE_COLUMNS = ("steps", "error", "max_force")
FD_COLUMNS = ("h", "error", "wall_time_s", "contact_changes", "converged", "steps_plus", "steps_minus")
COST_COLUMNS = ("method", "wall_time_s", "peak_memory_bytes", "error", "note")

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


def _relative(dx: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(dx - reference) / np.linalg.norm(reference))


class _Experiment:
    """Everything compiled once for the system, the parameter and its relaxed state."""

    def __init__(self, system: System, relaxer: Relaxer, x_star: np.ndarray, reference: np.ndarray):
        self.system = system
        self.relaxer = relaxer
        self.params = system.params
        self.tangent = unit_tangent(system, PARAMETER)
        self.x = jnp.asarray(x_star)
        self.x0 = jnp.asarray(system.positions)
        self.reference = reference
        self.basis = jax.jit(system.nullspace)(self.x, self.params)
        self._project = jax.jit(
            jax.vmap(lambda v: implicit.project_out(self.basis, v.ravel()).reshape(v.shape))
        )
        self._max_force = jax.jit(
            lambda xs, p: jax.lax.map(lambda x: max_force(system.force_fn(x, p)), xs, batch_size=64)
        )
        # A fixed cotangent for reverse mode: the gradient of Σ c·x, c random.
        self.cotangent = jax.random.normal(jax.random.PRNGKey(0), self.x.shape, dtype=self.x.dtype)
        self.init, self.step, self.positions_of = relaxer.unrolled()

    def errors(self, dxs, reference: np.ndarray | None = None) -> np.ndarray:
        """Relative error of each dx in the stack ``dxs`` (K, N, d) against ``reference`` (default:
        the dense solve at x*), translations projected out."""
        reference = self.reference if reference is None else reference
        projected = np.asarray(self._project(jnp.asarray(dxs)))
        diff = np.linalg.norm((projected - reference[None]).reshape(len(projected), -1), axis=1)
        return diff / np.linalg.norm(reference)

    def max_forces(self, xs, params=None) -> np.ndarray:
        return np.asarray(self._max_force(jnp.asarray(xs), self.params if params is None else params))

    # -- implicit -------------------------------------------------------------------------
    def implicit(self) -> dict:
        system, condition = self.system, optimality_fn(self.system)
        solve = linear_solve_from_recipe(system)
        forward = _compile(
            lambda x, p, t: implicit.root_jvp(condition, x, p, t, solve, system.nullspace),
            self.x,
            self.params,
            self.tangent,
        )
        (dx, info), forward_time = best_time(lambda: forward(self.x, self.params, self.tangent))
        reverse = _compile(
            lambda x, p, c: implicit.root_vjp(condition, x, p, c, solve, system.nullspace),
            self.x,
            self.params,
            self.cotangent,
        )
        (params_bar, reverse_info), reverse_time = best_time(
            lambda: reverse(self.x, self.params, self.cotangent)
        )
        # Reverse mode gives d(c·x*)/dθ; forward mode gives c·dx*/dθ (c projected: the
        # translation part of c is not determined by the implicit derivative).
        c = np.asarray(self._project(self.cotangent[None]))[0]
        expected = float(np.sum(c * self.reference))
        got = directional(params_bar, self.tangent)
        return {
            "dx": np.asarray(dx),
            "error": float(self.errors(np.asarray(dx)[None])[0]),
            "forward_wall_time_s": forward_time,
            "forward_peak_memory_bytes": compiled_memory(forward),
            "forward_iterations": int(info.iterations),
            "forward_residual": float(info.residual),
            "reverse_wall_time_s": reverse_time,
            "reverse_peak_memory_bytes": compiled_memory(reverse),
            "reverse_iterations": int(reverse_info.iterations),
            "reverse_error": abs(got - expected) / abs(expected),
        }

    # -- unrolled -------------------------------------------------------------------------
    def _positions_after(self, params, steps):
        state = jax.lax.fori_loop(0, steps, lambda _, s: self.step(s, params), self.init(self.x0, params))
        return self.positions_of(state)

    def unrolled_forward(self, steps_list: Sequence[int], repeats: int = 1):
        """Forward mode through K steps from the initial positions, for each K, from scratch.

        K is a run-time argument: one compilation serves every K, and its memory cannot depend
        on K (forward mode carries the tangent along, it stores no trajectory). Returns the rows,
        the peak memory, and (x_K, dx_K) of the last K.
        """
        compiled = _compile(
            lambda p, t, k: jax.jvp(lambda q: self._positions_after(q, k), (p,), (t,)),
            self.params,
            self.tangent,
            jnp.asarray(1),
        )
        memory = compiled_memory(compiled)
        rows = []
        for steps in steps_list:
            k = jnp.asarray(steps)
            (x, dx), wall = best_time(lambda k=k: compiled(self.params, self.tangent, k), repeats)
            rows.append(
                {
                    "steps": int(steps),
                    "error": float(self.errors(np.asarray(dx)[None])[0]),
                    "max_force": float(self.max_forces(np.asarray(x)[None])[0]),
                    "wall_time_s": wall,
                }
            )
        return rows, memory, (np.asarray(x), np.asarray(dx))

    def unrolled_trace(self, length: int) -> dict[str, np.ndarray]:
        """Error and max|F| after every K = 1 … ``length`` steps, from one forward-mode pass."""

        def trajectory(params):
            def body(state, _):
                state = self.step(state, params)
                return state, self.positions_of(state)

            _, xs = jax.lax.scan(body, self.init(self.x0, params), None, length=length)
            return xs

        xs, dxs = jax.jit(lambda p, t: jax.jvp(trajectory, (p,), (t,)))(self.params, self.tangent)
        return {
            "steps": np.arange(1, length + 1),
            "error": self.errors(dxs),
            "max_force": self.max_forces(xs),
        }

    def unrolled_reverse_memory(self, steps: int) -> int | None:
        """Peak memory of reverse mode (a VJP) through ``steps`` unrolled steps: compiled only.

        ``lax.scan`` keeps what the backward pass needs of every step, as reverse-mode autodiff of
        any unrolled loop must (without checkpointing).
        """

        def positions(params):
            def body(state, _):
                return self.step(state, params), None

            state, _ = jax.lax.scan(body, self.init(self.x0, params), None, length=steps)
            return self.positions_of(state)

        def pullback(params, cotangent):
            _, vjp = jax.vjp(positions, params)
            return vjp(cotangent)[0]

        return compiled_memory(_compile(pullback, self.params, self.cotangent))

    # -- finite differences -----------------------------------------------------------------
    def finite_differences(self, steps: Sequence[float], repeats: int = 1) -> tuple[list[dict], int | None]:
        """Central differences, both sides re-relaxed from x* (warm start) to the run's fmax;
        the wall time is the best of ``repeats``."""
        system = self.system
        difference = jax.jit(jax.vmap(system.displacement))
        rows = []
        for h in steps:
            shifted = [
                jax.tree_util.tree_map(lambda p, t, s=s, h=h: p + s * h * t, self.params, self.tangent)
                for s in (1, -1)
            ]
            wall = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                plus, minus = (self.relaxer.relax(p, x0=self.x) for p in shifted)
                dx = difference(jnp.asarray(plus.positions), jnp.asarray(minus.positions)) / (2 * h)
                dx = np.asarray(dx)
                wall = min(wall, time.perf_counter() - start)
            changed = system.contact_changes(plus.positions, shifted[0], minus.positions, shifted[1])
            rows.append(
                {
                    "h": h,
                    "error": float(self.errors(dx[None])[0]),
                    "wall_time_s": wall,
                    "contact_changes": int(np.sum(np.asarray(changed))),
                    "converged": bool(plus.converged and minus.converged),
                    "steps_plus": plus.steps,
                    "steps_minus": minus.steps,
                }
            )
        memory = compiled_memory(_compile(self.relaxer.solve, self.params, self.x))
        return rows, memory


def _csv(rows: list[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else _format(row.get(k))) for k in columns})
    return buffer.getvalue()


def _format(value):
    if isinstance(value, float):
        return repr(value)
    return value


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_paper(
    out_dir: str | os.PathLike = OUT_DIR,
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
    first_relax_time = relaxed.wall_time
    # Wall times are the best of `repeats` calls after compilation (the machine may be shared).
    repeats = 1 if quick else 3
    relax_time = min(relaxer.relax().wall_time for _ in range(repeats))
    converged_steps = relaxed.steps
    save_relaxation(out, system, relaxed)

    say(f"implicit sensitivity to {PARAMETER} (CG) and the dense reference")
    sensitivity = Sensitivity(system).compute(relaxed, [PARAMETER], spectrum=not quick)
    save_sensitivity(out, system, sensitivity)
    entry = sensitivity.parameters[PARAMETER]
    dense_solver = Sensitivity(system, solver="dense")
    dense = dense_solver.compute(relaxed, [PARAMETER], spectrum=False)
    reference = dense.parameters[PARAMETER].dx

    say("figures of the run (configuration with dx*/dθ arrows)")
    run_figures = [p.name for p in plot_run(out, params=[PARAMETER])]

    experiment = _Experiment(system, relaxer, relaxed.positions, reference)
    say("implicit forward and reverse mode: wall time and peak memory")
    implicit_result = experiment.implicit()
    saved_error = float(experiment.errors(entry.dx[None])[0])

    if steps_list is None:
        steps_list = quick_steps(converged_steps) if quick else default_steps(converged_steps)
    steps_list = sorted({int(k) for k in steps_list} | {converged_steps})
    if steps_list[0] < 1:
        raise ValueError(f"numbers of unrolled steps must be positive: {steps_list}")
    say(f"unrolled forward mode through K = {', '.join(map(str, steps_list))} FIRE steps")
    unrolled, unrolled_forward_memory, (x_last, dx_last) = experiment.unrolled_forward(steps_list, repeats)
    # The reference is only as exact as x* (max|F| <= fmax): re-derived at the state the longest
    # unrolled run reached (relaxed further), it moves by about what unrolling converges to.
    moved = dense_solver.compute(x_last, [PARAMETER], allow_unconverged=True, spectrum=False)
    moved_reference = moved.parameters[PARAMETER].dx
    reference_floor = {
        "steps": steps_list[-1],
        "max_force": moved.max_force,
        "reference_shift": _relative(moved_reference, reference),
        "unrolled_error_vs_reference_at_that_state": float(
            experiment.errors(dx_last[None], moved_reference)[0]
        ),
    }
    if quick:  # the timed runs only
        trace = {key: np.array([r[key] for r in unrolled]) for key in TRACE_COLUMNS}
    else:
        trace = experiment.unrolled_trace(max(steps_list))
    for row in unrolled:
        # A compilation each (seconds): the smoke version measures the converged K alone.
        if quick and row["steps"] != converged_steps:
            row["reverse_peak_memory_bytes"] = None
            continue
        say(f"reverse mode through {row['steps']} unrolled steps: compiling for its memory")
        row["reverse_peak_memory_bytes"] = experiment.unrolled_reverse_memory(row["steps"])

    fd_steps = tuple(fd_steps) if fd_steps is not None else (QUICK_FD_STEPS if quick else FD_STEPS)
    say(f"central finite differences, h = {', '.join(f'{h:g}' for h in fd_steps)}")
    fd_rows, fd_memory = experiment.finite_differences(fd_steps, repeats)
    trusted = [r for r in fd_rows if r["converged"]] or fd_rows
    best_fd = min(trusted, key=lambda r: r["error"])

    at_converged = next(r for r in unrolled if r["steps"] == converged_steps)
    memory_rows = [r for r in unrolled if r["reverse_peak_memory_bytes"] is not None]
    bytes_per_step = None
    if len(memory_rows) >= 2:
        ks = np.array([r["steps"] for r in memory_rows], dtype=float)
        ms = np.array([r["reverse_peak_memory_bytes"] for r in memory_rows], dtype=float)
        bytes_per_step = float(np.polyfit(ks, ms, 1)[0])

    costs = [
        {
            "method": "relaxation",
            "wall_time_s": relax_time,
            "peak_memory_bytes": fd_memory,
            "error": None,
            "note": f"FIRE from the random start to max|F| <= {relaxed.fmax:g}, {converged_steps} steps;"
            " needed before the implicit solve",
        },
        {
            "method": "implicit forward",
            "wall_time_s": implicit_result["forward_wall_time_s"],
            "peak_memory_bytes": implicit_result["forward_peak_memory_bytes"],
            "error": implicit_result["error"],
            "note": f"one CG solve (Hessian-vector products), {implicit_result['forward_iterations']}"
            " iterations; after the relaxation",
        },
        {
            "method": "implicit reverse",
            "wall_time_s": implicit_result["reverse_wall_time_s"],
            "peak_memory_bytes": implicit_result["reverse_peak_memory_bytes"],
            "error": implicit_result["reverse_error"],
            "note": "one CG solve for the gradient of c.x* w.r.t. all parameters; error of its"
            " diameter.B component vs c.dx_ref",
        },
        {
            "method": f"unrolled forward (K={converged_steps})",
            "wall_time_s": at_converged["wall_time_s"],
            "peak_memory_bytes": unrolled_forward_memory,
            "error": at_converged["error"],
            "note": "jax.jvp through K FIRE steps from the random start (includes the relaxation);"
            " memory independent of K",
        },
        {
            "method": f"unrolled reverse (K={converged_steps})",
            "wall_time_s": None,
            "peak_memory_bytes": at_converged["reverse_peak_memory_bytes"],
            "error": None,
            "note": "jax.vjp through lax.scan of K FIRE steps; compiled for its memory, not run",
        },
        {
            "method": f"finite differences (h={best_fd['h']:g})",
            "wall_time_s": best_fd["wall_time_s"],
            "peak_memory_bytes": fd_memory,
            "error": best_fd["error"],
            "note": "two FIRE relaxations warm-started from x* (central difference); after the relaxation",
        },
    ]

    lowest = sensitivity.spectrum.lowest[0] if sensitivity.spectrum is not None else None
    summary = {
        "experiment": "Blondel et al. 2022 (Efficient and Modular Implicit Differentiation), molecular"
        " dynamics: dx*/dθ of a relaxed bidisperse soft-sphere packing",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "system": {
            "name": system.name,
            "n_particles": system.n_particles,
            "dimension": system.dimension,
            "box": system.box.tolist(),
            "packing_fraction": system.recipe["box"].get("packing_fraction"),
            "rattlers": int(np.sum(sensitivity.rattlers)),
            "lowest_hessian_eigenvalue": lowest,
        },
        "parameter": {"name": PARAMETER, "value": entry.value, "denergy": entry.denergy},
        "relaxation": {
            "steps": converged_steps,
            "max_force": relaxed.max_force,
            "fmax": relaxed.fmax,
            "energy": relaxed.energy,
            "wall_time_s": relax_time,
            "wall_time_with_compilation_s": first_relax_time,
        },
        "reference": {
            "method": "dense direct solve (Hessian diagonalised, pseudo-inverse)",
            "norm": float(np.linalg.norm(reference)),
            "max_abs": float(np.max(np.abs(reference))),
        },
        "implicit": {
            "solver": entry.solver,
            "error": implicit_result["error"],
            "saved_error": saved_error,
            "iterations": implicit_result["forward_iterations"],
            "residual": implicit_result["forward_residual"],
            "forward_wall_time_s": implicit_result["forward_wall_time_s"],
            "forward_peak_memory_bytes": implicit_result["forward_peak_memory_bytes"],
            "reverse_wall_time_s": implicit_result["reverse_wall_time_s"],
            "reverse_peak_memory_bytes": implicit_result["reverse_peak_memory_bytes"],
            "reverse_error": implicit_result["reverse_error"],
        },
        "unrolled": {
            "start": "the relaxation's random initial positions",
            "forward_peak_memory_bytes": unrolled_forward_memory,
            "reverse_bytes_per_step": bytes_per_step,
            "reference_at_last_state": reference_floor,
            "rows": unrolled,
            "trace": {
                "steps": trace["steps"].tolist(),
                "error": trace["error"].tolist(),
                "max_force": trace["max_force"].tolist(),
            },
        },
        "finite_differences": {
            "start": "x* (warm start), both sides relaxed to fmax",
            "peak_memory_bytes": fd_memory,
            "best": best_fd,
            "rows": fd_rows,
        },
        "costs": costs,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
        },
        "versions": versions(),
        "recipe": system.recipe,
        "files": [],
    }

    say("writing tables and figures")
    figures = {
        out / "unrolled-error.png": _unrolled_figure(summary),
        out / "finite-differences.png": _fd_figure(summary),
        out / "costs.png": _costs_figure(summary),
    }
    tables = {
        out / "unrolled.csv": _csv(unrolled, UNROLLED_COLUMNS),
        out / "unrolled_trace.csv": _csv(
            [
                {"steps": int(k), "error": float(e), "max_force": float(f)}
                for k, e, f in zip(trace["steps"], trace["error"], trace["max_force"], strict=True)
            ],
            TRACE_COLUMNS,
        ),
        out / "finite_differences.csv": _csv(fd_rows, FD_COLUMNS),
        out / "costs.csv": _csv(costs, COST_COLUMNS),
    }
    summary["files"] = sorted(
        [p.name for p in (*tables, *figures)]
        + run_figures
        + ["paper.json"]
        + ["system.toml", "relaxed.npz", "relaxed.extxyz"]
        + ["sensitivity.npz", "sensitivity.json", "sensitivity.extxyz"]
    )
    summary["total_wall_time_s"] = time.perf_counter() - started
    text = json.dumps(summary, indent=2, default=_json_default, allow_nan=False) + "\n"
    writers = {
        path: (lambda tmp, content=content: tmp.write_text(content)) for path, content in tables.items()
    }
    writers.update({path: (lambda tmp, fig=fig: fig.savefig(tmp, dpi=DPI)) for path, fig in figures.items()})
    writers[out / "paper.json"] = lambda tmp: tmp.write_text(text)
    atomic.write_all(writers)
    say(f"done in {summary['total_wall_time_s']:.0f} s: {out}")
    return summary


# -- figures ---------------------------------------------------------------------------------


def _subtitle(summary: dict) -> str:
    s, p = summary["system"], summary["parameter"]
    return (
        f"{s['n_particles']} harmonic soft spheres, 2-D periodic box, φ = {s['packing_fraction']:g};"
        f" θ = diameter of species B = {p['value']:g}"
    )


def _unrolled_figure(summary: dict) -> Figure:
    unrolled, trace = summary["unrolled"], summary["unrolled"]["trace"]
    implicit_error = summary["implicit"]["error"]
    best = summary["finite_differences"]["best"]
    converged = summary["relaxation"]["steps"]
    rows = unrolled["rows"]
    fig = Figure(figsize=(7.5, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    ks = np.array(trace["steps"])
    if not summary["quick"]:  # the smoke version has no per-step trace
        top.plot(ks, trace["error"], color="0.6", lw=1, label="unrolled forward mode, every K")
        bottom.plot(ks, trace["max_force"], color="0.6", lw=1)
    top.plot(
        [r["steps"] for r in rows],
        [r["error"] for r in rows],
        "o",
        color="C0",
        label="unrolled forward mode, timed runs (unrolled.csv)",
    )
    top.axhline(
        implicit_error, color="C1", lw=2, label=f"implicit (CG, at the relaxed state): {implicit_error:.1e}"
    )
    top.axhline(
        best["error"],
        color="C2",
        ls="--",
        label=f"central finite differences, best h = {best['h']:g}: {best['error']:.1e}",
    )
    floor = unrolled["reference_at_last_state"]
    top.axhline(
        floor["reference_shift"],
        color="0.3",
        ls=":",
        label=f"dense reference at x_K, K = {floor['steps']} (max|F| {floor['max_force']:.0e}) vs at x*:"
        f" {floor['reference_shift']:.1e}\n(x* is relaxed to fmax only; unrolled vs that reference:"
        f" {floor['unrolled_error_vs_reference_at_that_state']:.1e})",
    )
    for ax in (top, bottom):
        ax.axvline(converged, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    top.text(
        converged,
        0.98,
        f" relaxation converged\n K = {converged}",
        transform=top.get_xaxis_transform(),
        va="top",
        fontsize=8,
    )
    top.set_ylabel("relative error of dx*/dθ\n‖dx − dx_ref‖ / ‖dx_ref‖")
    top.set_title("Error vs the dense direct solve (translations projected out)", fontsize=10)
    top.legend(fontsize=8, loc="lower left")
    bottom.plot([r["steps"] for r in rows], [r["max_force"] for r in rows], "o", color="C0")
    fmax = summary["relaxation"]["fmax"]
    bottom.axhline(fmax, color="k", ls="--", lw=1, label=f"fmax = {fmax:g}")
    bottom.set_ylabel("max |F_i| after K steps\n(ε / length)")
    bottom.set_xlabel("K: FIRE steps unrolled from the random start")
    bottom.legend(fontsize=8, loc="lower left")
    fig.suptitle("Unrolled FIRE vs implicit differentiation\n" + _subtitle(summary), fontsize=11)
    return fig


def _fd_figure(summary: dict) -> Figure:
    rows = summary["finite_differences"]["rows"]
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    hs = np.array([r["h"] for r in rows])
    errors = np.array([r["error"] for r in rows])
    changed = np.array([r["contact_changes"] > 0 for r in rows])
    ax.plot(hs, errors, "-", color="C2", lw=1)
    ax.plot(hs[~changed], errors[~changed], "o", color="C2", label="contacts unchanged between θ ± h")
    if changed.any():
        ax.plot(hs[changed], errors[changed], "s", color="C3", label="contact network changes between θ ± h")
        for r in rows:
            if r["contact_changes"]:
                ax.annotate(
                    f"{r['contact_changes']}\nparticles",
                    (r["h"], r["error"]),
                    textcoords="offset points",
                    xytext=(0, -8),
                    ha="center",
                    va="top",
                    fontsize=7,
                )
    implicit_error = summary["implicit"]["error"]
    ax.axhline(implicit_error, color="C1", lw=2, label=f"implicit (CG): {implicit_error:.1e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("h: step in the diameter of species B (length)")
    ax.set_ylabel("relative error of dx*/dθ\n‖dx − dx_ref‖ / ‖dx_ref‖")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        "Central finite differences (warm-started from x*, relaxed to max|F| ≤ "
        f"{summary['relaxation']['fmax']:g})\n" + _subtitle(summary),
        fontsize=9,
    )
    return fig


def _bar_labels(ax, bars, values, fmt):
    for bar, value in zip(bars, values, strict=True):
        if value is None or not np.isfinite(value):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                ax.get_ylim()[0],
                " not run",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=8,
            )
        else:
            ax.text(
                bar.get_x() + bar.get_width() / 2, value, fmt(value), ha="center", va="bottom", fontsize=8
            )


def _costs_figure(summary: dict) -> Figure:
    costs = summary["costs"]
    fig = Figure(figsize=(14, 5.2), layout="constrained")
    time_ax, memory_ax, scaling_ax = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    labels = [c["method"].replace(" (", "\n(") for c in costs]
    colours = ["0.5", "C1", "C1", "C0", "C0", "C2"]
    x = np.arange(len(costs))

    times = [np.nan if c["wall_time_s"] is None else c["wall_time_s"] for c in costs]
    bars = time_ax.bar(x, np.nan_to_num(times, nan=0.0), color=colours)
    time_ax.set_yscale("log")
    time_ax.set_ylim(min(t for t in times if np.isfinite(t)) / 3, max(t for t in times if np.isfinite(t)) * 5)
    _bar_labels(time_ax, bars, times, lambda v: f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s")
    time_ax.set_ylabel("wall time (s), after compilation")
    time_ax.set_title(f"Wall time ({summary['machine']['cpu_count']} CPU cores)", fontsize=10)

    memory = [np.nan if c["peak_memory_bytes"] is None else c["peak_memory_bytes"] / MiB for c in costs]
    bars = memory_ax.bar(x, np.nan_to_num(memory, nan=0.0), color=colours)
    memory_ax.set_yscale("log")
    finite = [m for m in memory if np.isfinite(m)]
    if finite:
        memory_ax.set_ylim(min(finite) / 3, max(finite) * 5)
    _bar_labels(memory_ax, bars, memory, lambda v: f"{v / 1024:.3g} GiB" if v >= 1024 else f"{v:.3g} MiB")
    memory_ax.set_ylabel("peak memory (MiB)")
    memory_ax.set_title("Peak memory (XLA compiled memory analysis)", fontsize=10)
    for ax in (time_ax, memory_ax):
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)

    rows = [r for r in summary["unrolled"]["rows"] if r["reverse_peak_memory_bytes"] is not None]
    ks = [r["steps"] for r in rows]
    scaling_ax.plot(
        ks,
        [r["reverse_peak_memory_bytes"] / MiB for r in rows],
        "o-",
        color="C0",
        label="unrolled reverse mode (jax.vjp through K steps)",
    )
    per_step = summary["unrolled"]["reverse_bytes_per_step"]
    if per_step:
        scaling_ax.text(
            0.03,
            0.97,
            f"≈ {per_step / MiB:.2f} MiB per step",
            transform=scaling_ax.transAxes,
            va="top",
            fontsize=9,
            color="C0",
        )
    for value, style, label in (
        (summary["unrolled"]["forward_peak_memory_bytes"], ("C0", "--"), "unrolled forward mode (any K)"),
        (summary["implicit"]["reverse_peak_memory_bytes"], ("C1", "-"), "implicit reverse (CG)"),
        (summary["implicit"]["forward_peak_memory_bytes"], ("C1", ":"), "implicit forward (CG)"),
    ):
        if value is not None:
            scaling_ax.axhline(value / MiB, color=style[0], ls=style[1], label=label)
    scaling_ax.axvline(summary["relaxation"]["steps"], color="k", ls=":", lw=1)
    scaling_ax.set_xscale("log")
    scaling_ax.set_yscale("log")
    scaling_ax.set_xlabel("K: FIRE steps unrolled")
    scaling_ax.set_ylabel("peak memory (MiB)")
    scaling_ax.set_title("Memory vs number of minimiser steps\n(dotted: relaxation converged)", fontsize=10)
    scaling_ax.grid(True, which="major", alpha=0.3)
    scaling_ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.1))
    fig.suptitle("Cost of dx*/dθ per method — " + _subtitle(summary), fontsize=11)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mdsens.experiments.paper",
        description="Reproduce the seed paper's experiment (Blondel et al. 2022) into a directory.",
    )
    parser.add_argument("--out", default=OUT_DIR, help=f"output directory (default: {OUT_DIR})")
    parser.add_argument(
        "--quick", action="store_true", help="smoke version: fewer unroll lengths and steps h"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    summary = run_paper(args.out, progress=progress, quick=args.quick)
    implicit_result, best = summary["implicit"], summary["finite_differences"]["best"]
    print(f"implicit (CG) error vs dense: {implicit_result['error']:.2e}")
    for row in summary["unrolled"]["rows"]:
        print(f"unrolled K = {row['steps']:5d}: error {row['error']:.2e}, max|F| {row['max_force']:.1e}")
    print(f"finite differences best: error {best['error']:.2e} at h = {best['h']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
