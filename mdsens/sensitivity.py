"""Sensitivity of a relaxed configuration to the potential's parameters.

Parameters are addressed by name: ``diameter`` (every species), ``diameter.B`` (one species), and
the potential's global parameters (``epsilon``, ``alpha``). For each scalar parameter θ this
module gives dx*/dθ (shape (N, d), rigid translation removed) by forward-mode implicit
differentiation of F(x, θ) = ∇ₓE(x, θ) = 0, and dE*/dθ = ∂E/∂θ at x* (envelope theorem: no
solve). :func:`relaxed_positions_fn` gives the differentiable x*(θ) for use in the user's own JAX
code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.errors import NotConvergedError, UserError
from mdsens.relaxation import Relaxer, RelaxResult
from mdsens.system import System

# A derivative larger than this many box lengths per unit parameter is not physics but a failed
# solve (an inconsistent system returns values of order 1e18).
ABSURD_SCALE = 1e8


def parameter_names(system: System) -> list[str]:
    """Every scalar parameter name of the system, e.g. ``diameter.A``, ``epsilon``."""
    names = [f"diameter.{s}" for s in system.species]
    return names + [key for key in system.params if key != "diameter"]


def expand_parameters(system: System, selection: list[str] | tuple[str, ...]) -> list[str]:
    """Expand ``diameter`` to one name per species and check every name; keeps order, no repeats.

    Raises:
        UserError: an unknown name.
    """
    known = parameter_names(system)
    out: list[str] = []
    for name in selection:
        group = [n for n in known if n.split(".")[0] == name] if "." not in name else []
        if name in known:
            group = [name]
        if not group:
            raise UserError(f"unknown parameter {name!r}; known: diameter, {', '.join(known)}")
        out += [n for n in group if n not in out]
    return out


def parameter_value(system: System, params: dict, name: str) -> float:
    """The value of the scalar parameter ``name`` in ``params``."""
    key, _, species = name.partition(".")
    value = params[key]
    return float(value[system.species.index(species)] if species else value)


def unit_tangent(system: System, name: str) -> dict:
    """A tangent pytree shaped like ``system.params``: 1 at parameter ``name``, 0 elsewhere."""
    key, _, species = name.partition(".")
    tangent = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    one = jnp.zeros_like(system.params[key])
    one = one.at[system.species.index(species)].set(1.0) if species else jnp.ones_like(one)
    return {**tangent, key: one}


def linear_solve_from_recipe(system: System, solver: str | None = None) -> implicit.LinearSolve:
    """The linear solve named in the recipe's ``sensitivity`` table (or by ``solver``)."""
    settings = system.recipe["sensitivity"]
    solver = settings["solver"] if solver is None else solver
    if solver == "cg":
        return implicit.cg(tol=settings["tol"], maxiter=settings["maxiter"] or None)
    if solver == "dense":
        return implicit.dense()
    raise UserError(f"unknown solver {solver!r}; known: cg, dense")


def optimality_fn(system: System):
    """F(x, θ) = ∇ₓE(x, θ): zero at a relaxed configuration."""
    return jax.grad(system.energy_fn)


def relaxed_positions_fn(system: System, relaxer: Relaxer | None = None, solver: str | None = None):
    """The differentiable relaxed positions ``x_star(params, x0=None) -> (N, d)``.

    Composes with ``jax.jvp``, ``jax.jacfwd``, ``jax.vjp``, ``jax.grad``, ``jax.jacrev``,
    ``jax.vmap`` and ``jax.jit``. The minimiser runs on the forward pass and is never
    differentiated; derivatives come from the implicit function theorem at the relaxed state,
    with rigid translations removed (the minimum-norm derivative). ``x0`` (default: the
    system's initial positions) is where the minimiser starts; pass a relaxed state to
    warm-start.

    Limits: the derivative assumes the minimiser converged (a relaxation stopped at its step
    cap gives a wrong derivative; check with :func:`mdsens.relaxation.Relaxer.relax` first); it is
    undefined where the contact network changes; second derivatives are not supported.
    """
    relaxer = Relaxer(system) if relaxer is None else relaxer
    # jit here so that eager use (no jit around the user's code) compiles once, not per call.
    solution = jax.jit(
        implicit.implicit_root(
            relaxer.solve,
            optimality_fn(system),
            linear_solve_from_recipe(system, solver),
            system.nullspace,
        )
    )
    default_x0 = jnp.asarray(system.positions)

    def x_star(params, x0=None):
        return solution(params, default_x0 if x0 is None else x0)

    return x_star


@dataclass(frozen=True)
class ParameterSensitivity:
    """dx*/dθ and dE*/dθ for one scalar parameter, with the solve's diagnostics.

    Attributes:
        name: parameter name (``diameter.B``).
        value: θ at which the derivative was taken.
        dx: dx*/dθ, shape (N, d), rigid translation removed.
        denergy: dE*/dθ (envelope theorem).
        solver: ``cg`` or ``dense``.
        iterations: linear-solver iterations.
        residual: relative residual of the linear solve.
        converged: whether the solve reached its tolerance.
        wall_time: seconds for this parameter (compilation included for the first).
    """

    name: str
    value: float
    dx: np.ndarray
    denergy: float
    solver: str
    iterations: int
    residual: float
    converged: bool
    wall_time: float


@dataclass(frozen=True)
class SensitivityResult:
    """Sensitivities of one relaxed state to several parameters.

    ``max_force`` is recomputed at the state; ``state_relaxed`` says whether it is within the
    recipe's ``fmax`` (False only when computed with ``allow_unconverged``).
    """

    parameters: dict[str, ParameterSensitivity]
    max_force: float
    state_relaxed: bool
    removed_modes: list[str]
    wall_time: float


class Sensitivity:
    """Forward-mode implicit sensitivities of one system, compiled once for every parameter.

    Args:
        system: the system.
        solver: ``cg`` (matrix-free, default from the recipe) or ``dense``.
    """

    def __init__(self, system: System, solver: str | None = None):
        self.system = system
        self.solver = system.recipe["sensitivity"]["solver"] if solver is None else solver
        linear_solve = linear_solve_from_recipe(system, self.solver)
        condition = optimality_fn(system)
        self._tangent = jax.jit(
            lambda x, params, direction: implicit.root_jvp(
                condition, x, params, direction, linear_solve, system.nullspace
            )
        )
        self._denergy = jax.jit(jax.grad(system.energy_fn, argnums=1))
        self._forces = jax.jit(system.force_fn)

    def compute(
        self,
        relaxed: RelaxResult | np.ndarray,
        names: list[str] | tuple[str, ...],
        params: dict | None = None,
        allow_unconverged: bool = False,
        progress=None,
    ) -> SensitivityResult:
        """dx*/dθ and dE*/dθ for every name (``diameter`` expands to every species).

        The force at ``relaxed`` is recomputed here rather than trusted from a file.

        Raises:
            UserError: unknown parameter name.
            NotConvergedError: the state is not relaxed to the recipe's ``fmax`` (unless
                ``allow_unconverged``).
            FloatingPointError: a derivative is not finite, absurdly large, or its linear
                solve did not converge.
        """
        system = self.system
        names = expand_parameters(system, names)
        params = system.params if params is None else params
        positions = relaxed.positions if isinstance(relaxed, RelaxResult) else relaxed
        x = jnp.asarray(positions, dtype=jnp.float64)
        start = time.perf_counter()
        force = float(jnp.max(jnp.linalg.norm(self._forces(x, params), axis=-1)))
        fmax = system.recipe["minimizer"]["fmax"]
        if force > fmax and not allow_unconverged:
            raise NotConvergedError(
                f"the state is not relaxed: max force {force:.3g} > fmax {fmax:.3g}; a sensitivity"
                " computed here would be wrong (relax again, or allow it explicitly)"
            )
        denergy = self._denergy(x, params)
        out = {}
        scale = ABSURD_SCALE * float(np.max(system.box))
        for name in names:
            t0 = time.perf_counter()
            dx, info = self._tangent(x, params, unit_tangent(system, name))
            dx = np.asarray(dx)
            entry = ParameterSensitivity(
                name=name,
                value=parameter_value(system, params, name),
                dx=dx,
                denergy=parameter_value(system, denergy, name),
                solver=self.solver,
                iterations=int(info.iterations),
                residual=float(info.residual),
                converged=bool(info.converged),
                wall_time=time.perf_counter() - t0,
            )
            worst = float(np.max(np.abs(dx))) if dx.size else 0.0
            if not np.all(np.isfinite(dx)) or worst * abs(entry.value or 1.0) > scale:
                raise FloatingPointError(
                    f"dx*/d{name} is {'not finite' if not np.isfinite(worst) else f'absurd ({worst:.3g})'}"
                    f"; linear solve residual {entry.residual:.3g} after {entry.iterations} iterations"
                    " (is the state a minimum? try --solver dense)"
                )
            if not entry.converged:
                raise FloatingPointError(
                    f"the linear solve for dx*/d{name} did not converge: relative residual"
                    f" {entry.residual:.3g} after {entry.iterations} iterations (try --solver dense,"
                    " or relax to a smaller fmax)"
                )
            out[name] = entry
            if progress is not None:
                progress(name)
        return SensitivityResult(
            parameters=out,
            max_force=force,
            state_relaxed=force <= fmax,
            removed_modes=[f"translation.{axis}" for axis in "xyz"[: system.dimension]],
            wall_time=time.perf_counter() - start,
        )


def compute_sensitivity(
    system: System, relaxed: RelaxResult | np.ndarray, names, **kwargs
) -> SensitivityResult:
    """One-shot :meth:`Sensitivity.compute` (build :class:`Sensitivity` once to reuse it)."""
    solver = kwargs.pop("solver", None)
    return Sensitivity(system, solver).compute(relaxed, names, **kwargs)
