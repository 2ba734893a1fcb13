"""Inverse design: implicit gradients against reverse mode through the unrolled FIRE and central
finite differences — time and peak memory per outer step, and whether each reaches the target.

The design problem: the binary packing's diameter.B fitted to a target structure relaxed at
diameter.B × e^(2e-4) (loss: mean squared displacement), from the relaxed packing. One outer step
is what a design does at a new θ: relax warm-started from the previous x*, then the loss and its
gradient.

* implicit: the relaxation, then one adjoint solve (:func:`mdsens.design.value_and_gradient`),
  whatever the number of parameters P;
* unrolled: reverse mode through K FIRE steps from the previous x* (``lax.scan``, as in JAX-MD's
  meta-optimisation notebook; K = the steps the warm relaxation took, fixed per run): memory
  grows with K;
* finite differences: the relaxation at θ, then two more per parameter at θ ± h (h = 1e-5 in
  log θ), warm-started from it.

Peak memory is XLA's plan for one compiled call (mdsens.measure): for implicit the larger of the
relaxation loop and the gradient, for finite differences the relaxation loop. Times are the best
of repeated calls after compilation. "Reaches the target": each gradient drives the same outer
loop (L-BFGS, steps halved until the loss falls; at most 20 steps) from diameter.B to the hidden
value; reported are the outer steps and the final relative error of diameter.B.

    python benchmarks/design.py            # N = 128, 1024
    python benchmarks/design.py --smoke    # N = 64, into a temporary folder
"""

from __future__ import annotations

import time

import common
import numpy as np

SIZES = (128, 1024)
OFFSET = 2e-4  # hidden log diameter.B minus the start's
STEP = 1e-5  # finite-difference step in log θ
OUTER = 20
COLUMNS = (
    "N",
    "K",
    "implicit_s",
    "implicit_s_P2",
    "fd_s_P1",
    "fd_s_P2",
    "unrolled_s",
    "implicit_MiB",
    "unrolled_MiB",
    "fd_MiB",
    "unrolled/implicit_mem",
    "grad_diff_unrolled",
    "grad_diff_fd",
    "error_implicit",
    "error_fd",
    "error_unrolled",
)


def outer_loop(gradient, z0, x0, z_target):
    """L-BFGS with halving until the loss falls, driven by ``gradient(z, x_prev) -> (L, g, x)``:
    (accepted outer steps, the largest |θ/θ_target - 1| at the end)."""
    import jax.numpy as jnp
    import optax

    from mdsens.design import LBFGS_MEMORY

    opt = optax.lbfgs(learning_rate=1.0, memory_size=LBFGS_MEMORY, linesearch=None)
    z, x = z0, x0
    value, grad, x = gradient(z, x)
    state = opt.init(z)
    accepted = 0
    for _ in range(OUTER):
        updates, new_state = opt.update(jnp.asarray(grad), state, z)
        updates = np.asarray(updates)
        if np.max(np.abs(updates)) <= 1e-10:
            break
        for halving in range(20):
            trial = z + updates / 2**halving
            v, g, xt = gradient(trial, x)
            if v <= value:
                z, value, grad, x, state = trial, v, g, xt, new_state
                accepted += 1
                break
        else:
            break
    return accepted, float(np.max(np.abs(np.expm1(np.asarray(z - z_target)))))


def measure(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from mdsens import design as engine
    from mdsens.design_losses import target_loss
    from mdsens.references import relative_error
    from mdsens.relaxation import Relaxer
    from mdsens.system import load_system

    system = load_system("binary-packing", [f"n_particles={n}"])
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    relaxer = relaxer.for_params(system.params, relaxed.positions)
    system = relaxer.system
    one = engine.variables(system, ["diameter.B"])
    two = engine.variables(system, ["diameter.A", "diameter.B"])
    x0 = jnp.asarray(relaxed.positions)
    target = relaxer.relax(one.params(one.initial() + OFFSET), x0)
    target.require_converged()
    loss = target_loss(system, target.positions)
    # Compiled for every method alike: eager, θ(z) and the loss cost more than a relaxation.
    loss_of = jax.jit(loss)
    params_of = jax.jit(lambda var, z: var.params(z))

    def implicit(var):
        def gradient(z, x_prev):
            inner = relaxer.relax(params_of(var, z), x_prev)
            inner.require_converged()
            x = jnp.asarray(inner.positions)
            value, grad, info = engine.value_and_gradient(system, loss, var, z, x)
            assert bool(info.converged)
            return float(value), np.asarray(grad), x

        return gradient

    def finite_differences(var):
        def gradient(z, x_prev):
            inner = relaxer.relax(params_of(var, z), x_prev)
            inner.require_converged()
            x = jnp.asarray(inner.positions)
            grad = []
            for i in range(var.size):
                e = np.zeros(var.size)
                e[i] = STEP
                side = []
                for zs in (z + e, z - e):
                    r = relaxer.relax(params_of(var, zs), x)
                    r.require_converged()
                    side.append(float(loss_of(jnp.asarray(r.positions), params_of(var, zs))))
                grad.append((side[0] - side[1]) / (2 * STEP))
            return float(loss_of(x, params_of(var, z))), np.array(grad), x

        return gradient

    z1 = one.initial() + STEP
    row = {"N": n}
    implicit_one = implicit(one)
    implicit_one(z1, x0)  # compile
    (_, grad, _), row["implicit_s"] = common.best_time(lambda: implicit_one(z1, x0), 3)
    implicit_two = implicit(two)
    z2 = two.initial() + STEP
    implicit_two(z2, x0)
    _, row["implicit_s_P2"] = common.best_time(lambda: implicit_two(z2, x0), 3)
    row["K"] = k = relaxer.relax(one.params(z1), x0).steps
    relax_mem = common.peak_memory(relaxer.solve, one.params(z1), x0)
    grad_mem = common.peak_memory(lambda z, x: engine.value_and_gradient(system, loss, one, z, x), z1, x0)
    row["implicit_MiB"] = common.mib(max(relax_mem, grad_mem))
    row["fd_MiB"] = common.mib(relax_mem)

    fd_one, fd_two = finite_differences(one), finite_differences(two)
    fd_one(z1, x0)
    fd_two(z2, x0)
    (_, fgrad, _), row["fd_s_P1"] = common.best_time(lambda: fd_one(z1, x0), 2)
    _, row["fd_s_P2"] = common.best_time(lambda: fd_two(z2, x0), 2)
    row["grad_diff_fd"] = relative_error(fgrad, grad)

    init, step, positions_of = relaxer.unrolled()

    def unrolled_objective(z, x_start):
        p = one.params(z)
        state, _ = jax.lax.scan(lambda s, _: (step(s, p), None), init(x_start, p), None, length=k)
        return loss(positions_of(state), p), positions_of(state)

    unrolled_vg = jax.jit(jax.value_and_grad(unrolled_objective, has_aux=True))
    unrolled_mem = common.peak_memory(jax.value_and_grad(unrolled_objective, has_aux=True), z1, x0)
    row["unrolled_MiB"] = common.mib(unrolled_mem)
    row["unrolled/implicit_mem"] = unrolled_mem / max(relax_mem, grad_mem)
    unrolled_vg(z1, x0)
    ((_, _), ugrad), row["unrolled_s"] = common.best_time(lambda: unrolled_vg(z1, x0), 2)
    row["grad_diff_unrolled"] = relative_error(np.asarray(ugrad), grad)

    def unrolled_gradient(z, x_prev):
        (value, x), g = unrolled_vg(z, x_prev)
        return float(value), np.asarray(g), x

    z_target = one.initial() + OFFSET
    for name, gradient in (
        ("implicit", implicit_one),
        ("fd", fd_one),
        ("unrolled", unrolled_gradient),
    ):
        row[f"steps_{name}"], row[f"error_{name}"] = outer_loop(gradient, one.initial(), x0, z_target)
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
    common.write(args.out, "design", {"offset": OFFSET, "step": STEP, "outer_steps": OUTER, "rows": rows})

    def draw(ax):
        n = [r["N"] for r in rows]
        for key, label in (
            ("implicit_s", "implicit, P=1"),
            ("implicit_s_P2", "implicit, P=2"),
            ("fd_s_P1", "finite differences, P=1"),
            ("fd_s_P2", "finite differences, P=2"),
            ("unrolled_s", "unrolled FIRE, P=1"),
        ):
            ax.loglog(n, [r.get(key, np.nan) for r in rows], "o-", label=label)
        for r in rows:
            ax.annotate(
                f"memory: unrolled {r['unrolled/implicit_mem']:.0f}× implicit",
                (r["N"], r["unrolled_s"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(-40, -14),
            )
        ax.set(xlabel="N", ylabel="seconds per outer step", title="one outer design step")

    common.figure(args.out / "design.png", draw)


if __name__ == "__main__":
    main()
