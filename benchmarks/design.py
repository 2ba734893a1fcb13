"""One outer step of inverse design: implicit gradient against reverse mode through the unrolled
FIRE and against central finite differences — time and peak memory per outer step.

The design problem: the binary packing's diameter.B (and, for P = 2, diameter.A too) fitted to a
target structure (loss: mean squared displacement). One outer step is: relax warm-started from
the previous x* at the new θ, then the gradient of the loss. Implicit: one adjoint solve.
Unrolled: reverse mode through the K FIRE steps that relaxation took (memory grows with K).
Finite differences: 2 more warm relaxations per parameter. Peak memory is XLA's plan of one
compiled call (mdsens.measure); the unrolled call is run only where its plan fits under CAP.

    python benchmarks/design.py            # N = 128, 1024
    python benchmarks/design.py --smoke    # N = 64, into a temporary folder
"""

from __future__ import annotations

import time

import common
import numpy as np

SIZES = (128, 1024)
CAP = 8 * 2**30
STEP = 1e-5
COLUMNS = (
    "N",
    "K",
    "implicit_s",
    "unrolled_s",
    "fd_s_P1",
    "fd_s_P2",
    "implicit_MiB",
    "unrolled_MiB",
    "fd_MiB",
    "unrolled/implicit_mem",
    "grad_rel_diff_unrolled",
    "grad_rel_diff_fd",
)


def measure(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from mdsens import design as engine
    from mdsens.references import relative_error
    from mdsens.relaxation import Relaxer
    from mdsens.sensitivity import relaxed_positions_fn
    from mdsens.system import load_system

    system = load_system("binary-packing", [f"n_particles={n}"])
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    relaxer = relaxer.for_params(system.params, relaxed.positions)
    system = relaxer.system
    var = engine.variables(system, ["diameter.B"])
    z0 = var.initial()
    target = relaxer.relax(var.params(z0 + 2e-4), relaxed.positions).positions
    loss = engine.target_loss(system, target)
    x_star = relaxed_positions_fn(system, relaxer)

    def objective(z, x0):
        p = var.params(z)
        return loss(x_star(p, x0), p)

    vg = jax.jit(jax.value_and_grad(objective))
    z1 = z0 + STEP
    x0 = jnp.asarray(relaxed.positions)

    def implicit_step():
        inner = relaxer.relax(var.params(z1), x0)
        return vg(z1, jnp.asarray(inner.positions)), inner.steps

    implicit_step()  # compile
    ((value, grad), k), implicit_s = common.best_time(implicit_step, 3)
    implicit_mem = common.peak_memory(jax.value_and_grad(objective), z1, x0)

    init, step, positions_of = relaxer.unrolled()

    def unrolled_objective(z, x_start):
        p = var.params(z)
        state, _ = jax.lax.scan(lambda s, _: (step(s, p), None), init(x_start, p), None, length=k)
        return loss(positions_of(state), p)

    unrolled_mem = common.peak_memory(jax.value_and_grad(unrolled_objective), z1, x0)
    row = {"N": n, "K": k, "implicit_s": implicit_s, "implicit_MiB": common.mib(implicit_mem)}
    row["unrolled_MiB"] = common.mib(unrolled_mem)
    if unrolled_mem and implicit_mem:
        row["unrolled/implicit_mem"] = unrolled_mem / implicit_mem
    if unrolled_mem is not None and unrolled_mem < CAP:
        unrolled = jax.jit(jax.value_and_grad(unrolled_objective))
        unrolled(z1, x0)
        (_, ugrad), row["unrolled_s"] = common.best_time(lambda: unrolled(z1, x0), 1)
        row["grad_rel_diff_unrolled"] = relative_error(np.asarray(ugrad), np.asarray(grad))
    row["fd_MiB"] = common.mib(common.peak_memory(relaxer.solve, var.params(z1), x0))

    def fd(names):
        fvar = engine.variables(system, names)
        zc = fvar.initial() + STEP
        out = []
        start = relaxer.relax(fvar.params(zc), x0)
        for i in range(len(names)):
            e = np.zeros(len(names))
            e[i] = STEP
            plus = relaxer.relax(fvar.params(zc + e), start.positions)
            minus = relaxer.relax(fvar.params(zc - e), start.positions)
            lp = float(loss(jnp.asarray(plus.positions), fvar.params(zc + e)))
            lm = float(loss(jnp.asarray(minus.positions), fvar.params(zc - e)))
            out.append((lp - lm) / (2 * STEP))
        return np.array(out)

    fd(["diameter.B"])
    fgrad, row["fd_s_P1"] = common.best_time(lambda: fd(["diameter.B"]), 1)
    row["grad_rel_diff_fd"] = relative_error(fgrad, np.asarray(grad))
    _, row["fd_s_P2"] = common.best_time(lambda: fd(["diameter.B", "diameter.A"]), 1)
    return row


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    sizes = (64,) if args.smoke else SIZES
    rows = []
    for n in sizes:
        start = time.perf_counter()
        rows.append(measure(n))
        print(common.table(rows[-1:], COLUMNS), f"({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(common.table(rows, COLUMNS))
    common.write(args.out, "design", {"cap_bytes": CAP, "step": STEP, "rows": rows})

    def draw(ax):
        n = [r["N"] for r in rows]
        for key, label in (
            ("implicit_s", "implicit"),
            ("unrolled_s", "unrolled FIRE"),
            ("fd_s_P1", "FD, P=1"),
            ("fd_s_P2", "FD, P=2"),
        ):
            ax.loglog(n, [r.get(key, np.nan) for r in rows], "o-", label=label)
        ax.set(xlabel="N", ylabel="seconds per outer step", title="one outer design step")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)

    common.figure(args.out / "design.png", draw)


if __name__ == "__main__":
    main()
