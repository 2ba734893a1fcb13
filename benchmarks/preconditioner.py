"""Does a Jacobi or block-Jacobi preconditioner pay off for the CG solve of dx*/dθ near jamming?

The implicit derivative of a relaxed packing solves H v = b with matrix-free conjugate gradients
(``mdsens.implicit.cg``) on the deflated operator v ↦ P H P v + (I − P) v, P removing the
translations and the rattlers' coordinates. Near jamming (binary-packing, 2-D, φ = 0.98) H is
badly conditioned and CG needs many Hessian-vector products. The cheapest preconditioners a
pair potential offers are H's diagonal (Jacobi) and its per-particle d × d diagonal blocks
(block Jacobi); both are built here matrix-free from the neighbour list in one pass over the
pairs, and checked once against the dense Hessian (N = 128).

For the right-hand side of dx*/d diameter.B (b = −∂F/∂θ · t, F = ∇ₓE, as in
``mdsens.implicit.root_jvp``) the table compares, each compiled, then timed best of 3 with the
repeats taken round-robin over the methods:

* ``cg``: mdsens's own solver (``implicit.cg`` with the recipe's tolerances),
* ``pcg(I)``: this file's preconditioned CG with M = I (the same method as ``cg``: it isolates
  the cost of this implementation from the effect of preconditioning),
* ``jacobi`` and ``block-jacobi``: this file's preconditioned CG with M⁻¹ = P D⁻¹ P, D the
  diagonal or the diagonal blocks (identity on the rattlers' coordinates).

All solvers stop on the same rule: ‖r‖ ≤ max(tol ‖P b‖, atol), tol = 1e-12 and
atol = fmax √(N d), as ``mdsens.sensitivity.linear_solve_from_recipe``. ``setup_s`` is the cost of
building and inverting the preconditioner, ``total_s`` adds it to the solve, and ``speedup`` is
cg's solve time over ``total_s``. ``iteration_bound`` is cg's iterations over the method's: the
speedup a preconditioner would give if it cost nothing per iteration, an upper bound on
``speedup`` (a preconditioned iteration does strictly more work) that timing noise cannot move.
``vs_cg`` is ‖v − v_cg‖ / ‖v_cg‖; ``residual`` is ‖A v − P b‖ / ‖P b‖ recomputed from the
returned v. The verdict: a preconditioner pays off when its wall-time speedup reaches 1.3 at
N = 8192 (the largest size run). Timings on a shared two-core machine are noisy (tens of per
cent between runs); iteration counts are not.

    python benchmarks/preconditioner.py            # N = 1024, 8192 (and the check at 128)
    python benchmarks/preconditioner.py --smoke    # N = 128, into a temporary folder
"""

from __future__ import annotations

import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from mdsens.implicit import NullSpace, hessian_matvec, project_out
from mdsens.parameters import unit_tangent
from mdsens.potentials import pair_tables
from mdsens.references import relative_error
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import linear_solve_from_recipe, optimality_fn
from mdsens.system import System, load_system

SIZES = (1024, 8192)
SMOKE_SIZES = (128,)
CHECK_SIZE = 128
PARAMETER = "diameter.B"
REPEATS = 3
PAYS_OFF = 1.3
METHODS = ("cg", "pcg(I)", "jacobi", "block-jacobi")
COLUMNS = (
    "N",
    "method",
    "iterations",
    "iteration_bound",
    "setup_s",
    "solve_s",
    "total_s",
    "ms_per_iteration",
    "speedup",
    "vs_cg",
    "residual",
)


# --- The Hessian's diagonal blocks, matrix-free -------------------------------------------------


def diagonal_blocks(system: System, x, params):
    """H_ii = ∂²E/∂x_i², shape (N, d, d), from one pass over the neighbour list's pairs.

    E = Σ_p φ_p(dr_p) with dr_p = displacement(x_i, x_j), so ∂dr_p/∂x_i = I = −∂dr_p/∂x_j and
    H_ii = Σ_{p ∋ i} K_p with K_p = ∂²φ_p/∂dr_p². The Hessian of G(dr) = Σ_p φ_p(dr_p) with
    respect to all the pair vectors is block diagonal, so d forward-over-reverse products with
    the all-pairs unit vectors e_a give every K_p at once (no vmap over pairs).
    """
    if system.pair_list is None:
        raise ValueError("diagonal_blocks needs a neighbour list (N ≥ 64 in an orthorhombic cell)")
    n, d = x.shape
    i, j = system.pair_list.at(x).idx
    valid = i < n
    dr = jax.vmap(system.displacement)(x[i], x[j])
    # Padded slots pair the last particle with itself (r = 0): a distance of 1 keeps them finite.
    dr = jnp.where(valid[:, None], dr, jnp.eye(d, dtype=x.dtype)[0])
    potential = system.potential
    tables = pair_tables(potential, params, system.overridden, len(system.species))
    types = jnp.asarray(system.types)
    ti, tj = types[jnp.where(valid, i, 0)], types[jnp.where(valid, j, 0)]
    values = {k: t[ti, tj] for k, t in tables.items()}
    settings = {k: system.recipe["potential"][k] for k in potential.settings}

    def pair_energy(dr):
        r = jnp.sqrt(jnp.sum(dr**2, axis=-1))
        return jnp.sum(jnp.where(valid, potential.pair_fn(r, **values, **settings), 0.0))

    gradient = jax.grad(pair_energy)
    columns = [jax.jvp(gradient, (dr,), (jnp.zeros_like(dr).at[:, a].set(1.0),))[1] for a in range(d)]
    k_pairs = jnp.stack(columns, axis=-1)  # (M, d, d): K_p[:, b, a] = ∂²φ_p / ∂dr_b ∂dr_a
    k_pairs = jnp.where(valid[:, None, None], k_pairs, 0.0)
    ends = jnp.concatenate([i, j])
    return jax.ops.segment_sum(jnp.concatenate([k_pairs, k_pairs]), ends, num_segments=n + 1)[:n]


def check_blocks(system: System, x, params) -> float:
    """Largest |H_ii (matrix-free) − H_ii (dense)| relative to the largest dense entry."""
    n, d = x.shape
    dense = jax.jit(jax.hessian(system.energy_fn))(x, params).reshape(n * d, n * d)
    blocks = np.asarray(jax.jit(diagonal_blocks, static_argnums=0)(system, x, params))
    dense = np.asarray(dense)
    reference = np.stack([dense[k * d : (k + 1) * d, k * d : (k + 1) * d] for k in range(n)])
    return float(np.max(np.abs(blocks - reference)) / np.max(np.abs(dense)))


# --- Preconditioners: (N, d) or (N, d, d) inverses, identity for the rattlers -----------------


def jacobi_inverse(system: System, x, params, nullspace: NullSpace):
    """1 / diag(H) per coordinate, shape (N, d); 1 on the rattlers' coordinates."""
    diagonal = jnp.diagonal(diagonal_blocks(system, x, params), axis1=1, axis2=2)
    rattler = nullspace.mask.reshape(x.shape) > 0
    return jnp.where(rattler, 1.0, 1.0 / jnp.where(rattler, 1.0, diagonal))


def block_inverse(system: System, x, params, nullspace: NullSpace):
    """H_ii⁻¹ per particle, shape (N, d, d); the identity for the rattlers (whose blocks may be
    singular: fewer than d + 1 contacts)."""
    blocks = diagonal_blocks(system, x, params)
    n, d = x.shape
    rattler = (nullspace.mask.reshape(x.shape) > 0).any(axis=1)[:, None, None]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), (n, d, d))
    return jnp.where(rattler, eye, jnp.linalg.inv(jnp.where(rattler, eye, blocks)))


def apply_inverse(inverse, r):
    """M⁻¹ r on a flat vector: elementwise for (N, d), per-particle blocks for (N, d, d)."""
    n, d = inverse.shape[:2]
    if inverse.ndim == 2:
        return (inverse * r.reshape(n, d)).ravel()
    return jnp.einsum("nab,nb->na", inverse, r.reshape(n, d)).ravel()


# --- Solvers ------------------------------------------------------------------------------------


def deflated(matvec, nullspace):
    """A v = P H P v + (v − P v): the operator mdsens's ``cg`` iterates on."""

    def op(v):
        pv = project_out(nullspace, v)
        return project_out(nullspace, matvec(pv)) + (v - pv)

    return op


def pcg(matvec, b, nullspace, inverse, tol: float, atol: float, maxiter: int):
    """Preconditioned CG on the deflated operator, stopping as ``implicit.cg`` does.

    The preconditioner is M̃⁻¹ = P M⁻¹ P + (I − P), symmetric positive definite when M⁻¹ is; the
    residuals stay in P's range, so it is applied as r ↦ P M⁻¹ r. Returns (v, iterations).
    """
    op = deflated(matvec, nullspace)
    b = project_out(nullspace, b)
    threshold = jnp.maximum(tol * jnp.linalg.norm(b), atol)

    def precondition(r):
        return project_out(nullspace, apply_inverse(inverse, r))

    def cond(state):
        _, r, _, _, k = state
        return (jnp.linalg.norm(r) > threshold) & (k < maxiter)

    def body(state):
        x, r, p, rz, k = state
        ap = op(p)
        step = rz / jnp.vdot(p, ap)
        x = x + step * p
        r = r - step * ap
        z = precondition(r)
        rz_new = jnp.vdot(r, z)
        p = z + (rz_new / rz) * p
        return x, r, p, rz_new, k + 1

    z = precondition(b)
    x, _, _, _, k = jax.lax.while_loop(cond, body, (jnp.zeros_like(b), b, z, jnp.vdot(b, z), 0))
    return project_out(nullspace, x), k


# --- One size -----------------------------------------------------------------------------------


def relaxed_state(n: int):
    """The relaxed packing of N particles: (system, x*, θ, relaxation row)."""
    relaxer = Relaxer(load_system("binary-packing", [f"n_particles={n}"]))
    result = relaxer.relax()
    result.require_converged()
    # The engine whose neighbour list has room for the pairs at x* (this one, or a longer list).
    system = relaxer.for_params(relaxer.system.params, result.positions).system
    x = jnp.asarray(result.positions)
    return system, x, system.params, {"relax_steps": result.steps, "relax_s": result.wall_time}


def measure(n: int, state=None) -> tuple[list[dict], dict]:
    """Every method at one size (``state``: its :func:`relaxed_state`, if already relaxed)."""
    system, x, params, relaxation = relaxed_state(n) if state is None else state
    size = x.size
    settings = system.recipe["sensitivity"]
    tol = float(settings["tol"])
    atol = float(system.recipe["minimizer"]["fmax"] * np.sqrt(size))
    maxiter = int(settings["maxiter"]) or 10 * size
    condition = optimality_fn(system)
    tangent = unit_tangent(system, PARAMETER)

    nullspace = jax.jit(system.nullspace)(x, params)
    rhs = jax.jit(lambda x, p, t: -jax.jvp(lambda q: condition(x, q), (p,), (t,))[1].ravel())
    b = rhs(x, params, tangent)

    plain_cg = linear_solve_from_recipe(system, "cg")

    @jax.jit
    def solve_cg(x, params, b, nullspace):
        v, info = plain_cg(hessian_matvec(condition, x, params), b, nullspace)
        return v, info.iterations

    @jax.jit
    def solve_pcg(x, params, b, nullspace, inverse):
        return pcg(hessian_matvec(condition, x, params), b, nullspace, inverse, tol, atol, maxiter)

    @jax.jit
    def residual(x, params, b, nullspace, v):
        op = deflated(hessian_matvec(condition, x, params), nullspace)
        pb = project_out(nullspace, b)
        return jnp.linalg.norm(op(v) - pb) / jnp.linalg.norm(pb)

    setups = {
        "pcg(I)": jax.jit(lambda x, params, nullspace: jnp.ones_like(x)),
        "jacobi": jax.jit(lambda x, params, ns: jacobi_inverse(system, x, params, ns)),
        "block-jacobi": jax.jit(lambda x, params, ns: block_inverse(system, x, params, ns)),
    }

    def setup(method):
        return (lambda: None) if method == "cg" else (lambda: setups[method](x, params, nullspace))

    def solve(method, inverse):
        if method == "cg":
            return lambda: solve_cg(x, params, b, nullspace)
        return lambda: solve_pcg(x, params, b, nullspace, inverse)

    # Compile everything, then time round-robin: a burst of load from other processes on the
    # shared machine then hits every method alike instead of one of them.
    inverses = {method: setup(method)() for method in METHODS}
    outputs = {method: jax.block_until_ready(solve(method, inverses[method])()) for method in METHODS}
    setup_s = {method: [] for method in METHODS}
    solve_s = {method: [] for method in METHODS}
    for _ in range(REPEATS):
        for method in METHODS:
            inverse, seconds = common.best_time(setup(method), 1)
            setup_s[method].append(0.0 if method == "cg" else seconds)
            solve_s[method].append(common.best_time(solve(method, inverse), 1)[1])

    reference, cg_iterations = outputs["cg"]
    cg_s = min(solve_s["cg"])
    rows = []
    for method in METHODS:
        v, iterations = outputs[method]
        total = min(setup_s[method]) + min(solve_s[method])
        rows.append(
            {
                "N": n,
                "method": method,
                "iterations": int(iterations),
                "iteration_bound": int(cg_iterations) / int(iterations),
                "setup_s": min(setup_s[method]),
                "solve_s": min(solve_s[method]),
                "total_s": total,
                "ms_per_iteration": 1e3 * min(solve_s[method]) / int(iterations),
                "speedup": cg_s / total,
                "vs_cg": relative_error(v, reference),
                "residual": float(residual(x, params, b, nullspace, v)),
                "solve_s_all": solve_s[method],
            }
        )
    print(common.table(rows, COLUMNS), flush=True)
    summary = {
        "N": n,
        **relaxation,
        "rattlers": int(nullspace.mask.sum()) // x.shape[1],
        "pairs": int(jnp.sum(system.pair_list.at(x).idx[0] < n)),
        "rhs_norm": float(jnp.linalg.norm(project_out(nullspace, b))),
        "tol": tol,
        "atol": atol,
    }
    return rows, summary


def verdict(rows: list[dict], n: int) -> dict:
    """The best preconditioner's wall-time speedup over cg at N = n, and whether it pays off."""
    candidates = [r for r in rows if r["N"] == n and r["method"] in ("jacobi", "block-jacobi")]
    best = max(candidates, key=lambda r: r["speedup"])
    cg_iterations = next(r["iterations"] for r in rows if r["N"] == n and r["method"] == "cg")
    pays = best["speedup"] >= PAYS_OFF
    line = (
        f"N = {n}: best preconditioner {best['method']}, {best['speedup']:.2f}x cg's wall time "
        f"({best['iterations']} vs {cg_iterations} iterations, at most {best['iteration_bound']:.2f}x "
        f"at cg's cost per iteration): {'pays off' if pays else 'does not pay off'} (threshold {PAYS_OFF}x)"
    )
    if best["speedup"] > best["iteration_bound"]:
        line += "; the wall-time speedup exceeds the iteration bound: timing noise, rerun"
    return {
        "N": n,
        "method": best["method"],
        "speedup": best["speedup"],
        "iteration_bound": best["iteration_bound"],
        "pays_off": pays,
        "line": line,
    }


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    sizes = SMOKE_SIZES if args.smoke else SIZES
    start = time.perf_counter()

    checked = relaxed_state(CHECK_SIZE)
    block_error = check_blocks(*checked[:3])
    print(f"diagonal blocks at N = {CHECK_SIZE}: max relative error {block_error:.2e} against dense H")
    assert block_error <= 1e-10, f"matrix-free diagonal blocks are wrong ({block_error:.3g})"

    rows, summaries = [], []
    for n in sizes:
        size_rows, summary = measure(n, checked if n == CHECK_SIZE else None)
        rows += size_rows
        summaries.append(summary)
        print(f"N = {n}: {summary}", flush=True)
    print()
    print(common.table(rows, COLUMNS))
    decision = verdict(rows, max(sizes))
    print(decision["line"])
    elapsed = time.perf_counter() - start
    print(f"total wall time {elapsed:.0f} s")
    common.write(
        args.out,
        "preconditioner",
        {
            "parameter": PARAMETER,
            "block_check": {"N": CHECK_SIZE, "max_relative_error": block_error},
            "rows": rows,
            "sizes": summaries,
            "verdict": decision,
            "repeats": REPEATS,
            "wall_time_s": elapsed,
            "note": "shared two-core machine: wall times are noisy; iteration counts are not",
        },
    )
    plot(rows, args.out / "preconditioner.png")


def plot(rows: list[dict], path) -> None:
    """CG iterations per method and size."""
    sizes = sorted({r["N"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def draw(ax):
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            counts = [
                next(r["iterations"] for r in rows if r["N"] == n and r["method"] == method) for n in sizes
            ]
            ax.bar([i + k * width for i in range(len(sizes))], counts, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], [f"N = {n}" for n in sizes])
        ax.set(ylabel="CG iterations to 1e-12", title="preconditioners near jamming (φ = 0.98)")

    common.figure(path, draw)


if __name__ == "__main__":
    main()
