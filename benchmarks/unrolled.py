"""Implicit differentiation against reverse mode through the unrolled minimiser: time and memory.

Reverse mode through K minimiser steps (``jax.vjp`` of a ``lax.scan`` of FIRE steps from the
initial positions, K = the steps the relaxation needed to converge) must keep what the backward
pass needs of every step, so its memory grows with K; implicit differentiation needs one linear
solve at x* whatever K. Both differentiate the same observable, c · x* with c random, with
respect to every parameter. Peak memory is XLA's plan for one compiled call (nothing is run to
measure it); the unrolled gradient is then run in a child process under a memory cap, so that an
out-of-memory is recorded as a data point and cannot take the machine down.

    python benchmarks/unrolled.py            # N = 128, 512, 2048
    python benchmarks/unrolled.py --smoke    # N = 16, into a temporary folder
"""

from __future__ import annotations

import time

import common
import numpy as np

SIZES = (128, 512, 2048)
CAP = 16 * 2**30
COLUMNS = (
    "N",
    "K",
    "relax_MiB",
    "implicit_rev_MiB",
    "unrolled_rev_MiB",
    "unrolled/implicit",
    "implicit/relax",
    "implicit_rev_s",
    "unrolled_rev_s",
    "unrolled_error",
)


def _setup(n: int, fmax: float | None):
    import jax
    import jax.numpy as jnp

    from mdsens.relaxation import Relaxer
    from mdsens.system import load_system

    overrides = [f"n_particles={n}"] + ([f"minimizer.fmax={fmax}"] if fmax else [])
    system = load_system("binary-packing", overrides)
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    # The engine whose neighbour list has room for the pairs at x* (this one, or a longer list).
    relaxer = relaxer.for_params(system.params, relaxed.positions)
    cotangent = jax.random.normal(jax.random.PRNGKey(0), relaxed.positions.shape, dtype=jnp.float64)
    return system, relaxer, relaxed, cotangent


def _unrolled_pullback(relaxer, steps: int):
    """``pullback(params, cotangent)``: reverse mode through ``steps`` FIRE steps, jitted."""
    import jax

    from mdsens.references import unrolled_vjp

    return jax.jit(lambda params, cotangent: unrolled_vjp(relaxer, params, cotangent, steps))


def _flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def unrolled_gradient(n: int, steps: int, fmax: float | None = None) -> dict:
    """In a child process: run the unrolled reverse-mode gradient once compiled, and time it."""
    system, relaxer, _, cotangent = _setup(n, fmax)
    pullback = _unrolled_pullback(relaxer, steps)
    compiled = pullback.lower(system.params, cotangent).compile()
    grad, wall = common.best_time(lambda: compiled(system.params, cotangent), 1)
    return {"wall_s": wall, "gradient": _flat(grad).tolist(), "rss_MiB": common.mib(common.peak_rss())}


def measure(n: int, fmax: float | None = None, cap: int = CAP) -> dict:
    import jax
    import jax.numpy as jnp

    from mdsens import implicit
    from mdsens.references import relative_error
    from mdsens.sensitivity import linear_solve_from_recipe, optimality_fn

    system, relaxer, relaxed, cotangent = _setup(n, fmax)
    system = relaxer.system
    x = jnp.asarray(relaxed.positions)
    solve = linear_solve_from_recipe(system)
    condition = optimality_fn(system)
    reverse = jax.jit(lambda x, p, c: implicit.root_vjp(condition, x, p, c, solve, system.nullspace))
    forward = jax.jit(lambda x, p, t: implicit.root_jvp(condition, x, p, t, solve, system.nullspace))
    tangent = jax.tree_util.tree_map(jnp.ones_like, system.params)
    compiled = reverse.lower(x, system.params, cotangent).compile()
    (grad, info), reverse_time = common.best_time(lambda: compiled(x, system.params, cotangent), 3)
    relax_memory = common.peak_memory(jax.jit(relaxer.solve), system.params, jnp.asarray(system.positions))
    reverse_memory = common.peak_memory(reverse, x, system.params, cotangent)
    forward_memory = common.peak_memory(forward, x, system.params, tangent)
    unrolled_memory = common.peak_memory(_unrolled_pullback(relaxer, relaxed.steps), system.params, cotangent)
    row = {
        "N": n,
        "K": relaxed.steps,
        "relax_MiB": common.mib(relax_memory),
        "implicit_fwd_MiB": common.mib(forward_memory),
        "implicit_rev_MiB": common.mib(reverse_memory),
        "unrolled_rev_MiB": common.mib(unrolled_memory),
        "implicit_rev_s": reverse_time,
        "implicit_iterations": int(info.iterations),
    }
    if unrolled_memory and reverse_memory:
        row["unrolled/implicit"] = unrolled_memory / reverse_memory
    if reverse_memory and relax_memory:
        row["implicit/relax"] = reverse_memory / relax_memory
    if unrolled_memory and unrolled_memory > cap:
        row["unrolled_rev_s"] = f"needs {unrolled_memory / 2**30:.1f} GiB > cap {cap / 2**30:.0f} GiB"
        return row
    child = common.in_child(
        "unrolled", "unrolled_gradient", {"n": n, "steps": relaxed.steps, "fmax": fmax}, cap, 1800
    )
    if "failed" in child:
        row["unrolled_rev_s"] = child["failed"]
        return row
    unrolled = np.asarray(child["gradient"])
    expected = _flat(grad)
    row["unrolled_rev_s"] = child["wall_s"]
    row["unrolled_error"] = relative_error(unrolled, expected)
    return row


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    sizes, fmax = ((16,), 1e-4) if args.smoke else (SIZES, None)
    rows = []
    for n in sizes:
        start = time.perf_counter()
        rows.append(measure(n, fmax))
        print(common.table(rows[-1:], COLUMNS), f"({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(common.table(rows, COLUMNS))
    common.write(args.out, "unrolled", {"cap_bytes": CAP, "rows": rows})
    plot(rows, args.out / "unrolled.png")


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    n = [r["N"] for r in rows]
    for key, label in (
        ("relax_MiB", "relaxation"),
        ("implicit_rev_MiB", "implicit reverse mode"),
        ("unrolled_rev_MiB", "reverse mode through the unrolled FIRE"),
    ):
        ax.loglog(n, [r[key] for r in rows], "o-", label=label)
    ax.set(xlabel="N", ylabel="peak memory, XLA plan (MiB)", title="memory of one gradient")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
