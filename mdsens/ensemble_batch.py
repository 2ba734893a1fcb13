"""One batch of ensemble members: relaxed together in one loop, differentiated together,
the member axis sharded over the local devices.

A batch is members of one system shape and cell that differ in their initial positions (the
seed) and, within one shape and cell, in θ. :class:`BatchEngine` compiles two functions once per
template system and batch size:

* ``relax(params, x0)``: :func:`mdsens.relaxation_batch.batched_solve`, every member stepped in
  one compiled loop (a converged member stops changing; the loop stops when all have converged
  or reached the step cap), with each member's steps and whether it failed.
* ``differentiate(params, x) -> outputs``: per member the energy, max|F|, rattlers, dx*/dθ for
  every parameter (forward mode, :func:`mdsens.implicit.root_jvp` with the recipe's linear solve
  and each member's own null space: its rattlers), dE*/dθ, and each observable's value and total
  derivative dq/dθ = ∂q/∂θ + ∂q/∂x · dx*/dθ (:mod:`mdsens.observable_gradients`'s forward mode).

A member the batch cannot finish is done *alone* (:func:`run_alone`) with the single-system
engines, whose neighbour lists grow as needed (:meth:`mdsens.relaxation.Relaxer.relax`,
:meth:`mdsens.sensitivity.Sensitivity.compute`): a member whose relaxation did not converge or
whose list missed pairs (it overflowed), and a member whose outputs are not finite (its relaxed
state overflows the template's list), are redone alone, so a failure is reported with the single
relaxation's reason and never stops the other members.

Sharding: the member axis of the inputs is placed over a 1-D mesh of the local devices
(``NamedSharding``); the batch is padded to a multiple of the device count with copies of its
last member, whose results are dropped.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mdsens import implicit
from mdsens.errors import NotConvergedError
from mdsens.observable_gradients import observable_gradients
from mdsens.observables import Observable
from mdsens.parameters import unit_tangent
from mdsens.relaxation import Relaxer, max_force
from mdsens.relaxation_batch import batched_solve
from mdsens.sensitivity import Sensitivity, linear_solve_from_recipe, optimality_fn
from mdsens.system import System

AXIS = "members"
CPU_RELAX_GROUP = 1
"""Members per CPU device relaxed together. A batched step costs what its members' steps cost
one by one on a CPU, and a group runs until its slowest member converges, so on a CPU one member
per device relaxes fastest: 64 members of the 128-particle packing over two devices took 1.21 s
in groups of one per device, 1.56 s in groups of four (the derivatives, in contrast, gain from
the whole batch: 0.22 s for batches of 16 against 0.56 s for batches of 2)."""


def _dot(tree, tangent):
    """Σ tree · tangent over a pytree, traceable (:func:`mdsens.parameters.directional` as JAX)."""
    products = jax.tree_util.tree_map(lambda a, b: jnp.sum(a * b), tree, tangent)
    return jax.tree_util.tree_reduce(jnp.add, products)


@dataclass(frozen=True)
class MemberOutcome:
    """What one member gave: a row of scalars and its arrays, or the reason it failed.

    Attributes:
        ok: relaxed to ``fmax`` and every linear solve converged.
        reason: why not (empty when ``ok``).
        path: ``batch`` or ``alone`` (see the module docstring).
        scalars: energy, max_force, steps (first-order), rattlers, dE_d_<name>,
            solver diagnostics, observables and their gradients.
        arrays: ``positions`` (N, d) and ``dx/<name>`` (N, d).
    """

    ok: bool
    reason: str
    path: str
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def scalar_names(names: list[str], observables: list[str]) -> list[str]:
    """The numeric columns of a member, in table order."""
    out = ["energy", "max_force", "steps", "rattlers"]
    out += [f"dE_d_{n}" for n in names]
    out += [f"iterations_{n}" for n in names] + [f"residual_{n}" for n in names]
    for q in observables:
        out += [q] + [f"d_{q}_d_{n}" for n in names]
    return out


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices, axis :data:`AXIS`."""
    return Mesh(np.asarray(jax.local_devices()), (AXIS,))


@dataclass(frozen=True, eq=False)
class BatchEngine:
    """The compiled batch functions of one template system (see the module docstring).

    Args:
        system: the template: its list, cell and compiled energy serve every member.
        names: expanded scalar parameter names (``diameter.B``).
        observables: observables parsed against ``system``.
        mesh: the devices the member axis is sharded over (default: all local devices).
    """

    system: System
    names: tuple[str, ...]
    observables: tuple[Observable, ...]
    mesh: Mesh = field(default_factory=local_mesh)
    relaxer: Relaxer = field(init=False)
    _relax: Any = field(init=False, repr=False)
    _differentiate: Any = field(init=False, repr=False)

    def __post_init__(self):
        system = self.system
        relaxer = Relaxer(system)
        count = len(self.names)
        # The parameters' unit tangents stacked on a leading axis: every derivative below maps
        # over it, so one linear solve is traced and compiled whatever the number of parameters.
        tangents = (
            jax.tree_util.tree_map(lambda *t: jnp.stack(t), *[unit_tangent(system, n) for n in self.names])
            if count
            else None
        )
        linear_solve = linear_solve_from_recipe(system)
        condition = optimality_fn(system)
        observables = self.observables

        def differentiate(params, x):
            denergy = jax.grad(system.energy_fn, argnums=1)(x, params)
            if count:
                dx, info = jax.vmap(
                    lambda t: implicit.root_jvp(condition, x, params, t, linear_solve, system.nullspace)
                )(tangents)
            else:
                dx, info = jnp.zeros((0,) + x.shape), None
            values, gradients = [], []
            for observable in observables:
                value, (q_x, q_theta) = jax.value_and_grad(observable.fn, argnums=(0, 1))(x, params)
                values.append(value)
                total = jax.vmap(lambda t, d, q_x=q_x, q_theta=q_theta: _dot(q_theta, t) + jnp.vdot(q_x, d))
                gradients.append(total(tangents, dx) if count else jnp.zeros(0))
            return {
                "energy": system.energy_fn(x, params),
                "max_force": max_force(system.force_fn(x, params)),
                "rattlers": jnp.sum(system.rattlers(x, params)),
                "dE": jax.vmap(lambda t: _dot(denergy, t))(tangents) if count else jnp.zeros(0),
                "dx": dx,
                "iterations": info.iterations if count else jnp.zeros(0, int),
                "residual": info.residual if count else jnp.zeros(0),
                "converged": info.converged if count else jnp.zeros(0, bool),
                "values": jnp.stack(values) if values else jnp.zeros(0),
                "gradients": jnp.stack(gradients) if gradients else jnp.zeros((0, count)),
            }

        sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
        for key, value in {
            "relaxer": relaxer,
            # Each device relaxes its own members in its own loop (no step waits for another
            # device's slowest member, no exchange between devices while relaxing).
            "_relax": jax.jit(
                jax.shard_map(
                    batched_solve(relaxer),
                    mesh=self.mesh,
                    in_specs=PartitionSpec(AXIS),
                    out_specs=PartitionSpec(AXIS),
                    check_vma=False,
                )
            ),
            "_differentiate": jax.jit(jax.vmap(differentiate), out_shardings=sharded),
        }.items():
            object.__setattr__(self, key, value)

    @functools.cached_property
    def sensitivity(self) -> Sensitivity:
        """The single-system sensitivity engine of members done alone (compiled on first use)."""
        return Sensitivity(self.system)

    @property
    def devices(self) -> int:
        return int(self.mesh.devices.size)

    def _place(self, tree):
        """The member axis of every leaf over the mesh."""
        sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        return jax.tree_util.tree_map(lambda a: jax.device_put(jnp.asarray(a), sharding), tree)

    def run(self, params: list[dict], x0: list[np.ndarray], size: int) -> list[MemberOutcome]:
        """Relax and differentiate members (θ and start each), padded to ``size`` members (a
        multiple of the device count: one compilation for every batch of that size)."""
        count = len(x0)
        if not 0 < count <= size or size % self.devices:
            raise ValueError(f"{count} members in a batch of {size} over {self.devices} devices")
        pad = [count - 1] * (size - count)
        stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *(list(params) + [params[i] for i in pad]))
        starts = np.stack(list(x0) + [x0[i] for i in pad])
        start = time.perf_counter()
        relaxed = self._relaxed(stacked, starts)
        x = np.asarray(relaxed.positions)
        done = [i for i in range(count) if not (relaxed.unconverged[i] or relaxed.missing[i])]
        if not done:
            return [run_alone(self, params[i], x0[i]) for i in range(count)]
        # A failed member's NaN row is differentiated at a finite one (and its result dropped).
        x_all = np.where(np.isfinite(x).all(axis=(1, 2))[:, None, None], x, x[done[0]])
        out = jax.device_get(self._differentiate(self._place(stacked), self._place(x_all)))
        wall = (time.perf_counter() - start) / count
        results = []
        for i in range(count):
            member = {k: v[i] for k, v in out.items()}
            if i not in done or not _finite(member):
                results.append(run_alone(self, params[i], x0[i]))
                continue
            results.append(self._outcome(member, x[i], int(relaxed.steps[i]), wall))
        return results

    def _relaxed(self, params, x0):
        """The batch relaxed, on a CPU in groups of one member per device (:data:`CPU_RELAX_GROUP`)."""
        size = x0.shape[0]
        group = self.devices * CPU_RELAX_GROUP if self.mesh.devices.flat[0].platform == "cpu" else size
        # Every group is dispatched before any is read back: a device that finishes its member
        # starts the next group's while another device is still relaxing.
        pending = [
            self._relax(
                self._place(jax.tree_util.tree_map(lambda a, k=k: a[k : k + group], params)),
                self._place(x0[k : k + group]),
            )
            for k in range(0, size, group)
        ]
        parts = jax.device_get(pending)
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)

    def _outcome(self, member: dict, x: np.ndarray, steps: int, wall: float) -> MemberOutcome:
        """A batched member's outcome from its outputs."""
        fmax = self.relaxer.fmax
        scalars = {
            "energy": float(member["energy"]),
            "max_force": float(member["max_force"]),
            "steps": float(steps),
            "rattlers": float(member["rattlers"]),
            "wall_time": wall,
        }
        arrays = {"positions": x}
        reasons = []
        if not scalars["max_force"] <= fmax:
            reasons.append(f"max|F| {scalars['max_force']:.3g} > fmax {fmax:.3g}")
        for k, name in enumerate(self.names):
            scalars[f"dE_d_{name}"] = float(member["dE"][k])
            scalars[f"iterations_{name}"] = float(member["iterations"][k])
            scalars[f"residual_{name}"] = float(member["residual"][k])
            arrays[f"dx/{name}"] = np.asarray(member["dx"][k])
            if not bool(member["converged"][k]):
                reasons.append(
                    f"the linear solve for dx*/d{name} did not converge (relative residual"
                    f" {float(member['residual'][k]):.3g})"
                )
        for j, observable in enumerate(self.observables):
            scalars[observable.name] = float(member["values"][j])
            for k, name in enumerate(self.names):
                scalars[f"d_{observable.name}_d_{name}"] = float(member["gradients"][j][k])
        return MemberOutcome(not reasons, "; ".join(reasons), "batch", scalars, arrays)


def _finite(member: dict) -> bool:
    return all(np.all(np.isfinite(np.asarray(v, dtype=np.float64))) for v in member.values())


def run_alone(engine: BatchEngine, params: dict, x0: np.ndarray) -> MemberOutcome:
    """One member with the single-system engines (its own grown neighbour list where needed):
    what ``mdsens relax`` + ``mdsens sensitivity`` compute. A failure is the outcome's reason."""
    start = time.perf_counter()
    relaxed = engine.relaxer.relax(params, x0)
    scalars = {
        "energy": relaxed.energy,
        "max_force": relaxed.max_force,
        "steps": float(relaxed.steps),
        "rattlers": float("nan"),
    }
    arrays = {"positions": np.asarray(relaxed.positions)}
    if not relaxed.converged:
        return MemberOutcome(False, relaxed.reason, "alone", scalars, arrays)
    names = list(engine.names)
    try:
        sensitivity = engine.sensitivity.compute(relaxed, names, params=params, spectrum=False)
        system = engine.system.for_params(params, relaxed.positions)
        observed = observable_gradients(
            system,
            relaxed.positions,
            params,
            list(engine.observables),
            names,
            dx={n: e.dx for n, e in sensitivity.parameters.items()},
        )
    except (FloatingPointError, NotConvergedError) as error:
        return MemberOutcome(False, str(error), "alone", scalars, arrays)
    scalars["rattlers"] = float(np.sum(sensitivity.rattlers))
    for name, entry in sensitivity.parameters.items():
        scalars[f"dE_d_{name}"] = entry.denergy
        scalars[f"iterations_{name}"] = float(entry.iterations)
        scalars[f"residual_{name}"] = entry.residual
        arrays[f"dx/{name}"] = entry.dx
    for name, entry in observed.observables.items():
        scalars[name] = entry.value
        for parameter in names:
            scalars[f"d_{name}_d_{parameter}"] = entry.gradient[parameter]
    scalars["wall_time"] = time.perf_counter() - start
    return MemberOutcome(True, "", "alone", scalars, arrays)
