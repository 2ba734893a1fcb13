"""Sensitivity of a relaxed configuration to the potential's parameters.

Parameters are addressed by name (:mod:`mdsens.parameters`): ``diameter`` (every species),
``diameter.B`` (one species), and the potential's global parameters (``epsilon``, ``alpha``).
For each scalar parameter θ this module gives dx*/dθ (shape (N, d)) by forward-mode implicit
differentiation of F(x, θ) = ∇ₓE(x, θ) = 0, with the Hessian's zero modes removed (rigid
translations, rotations of a free cluster, every degree of freedom of the rattlers: see
:meth:`mdsens.system.System.nullspace`), and dE*/dθ = ∂E/∂θ at x* (envelope theorem: no solve).
:func:`relaxed_positions_fn` gives the differentiable x*(θ) for use in the user's own JAX code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit
from mdsens.errors import NotConvergedError, UserError
from mdsens.parameters import directional, expand_parameters, parameter_value, unit_tangent
from mdsens.relaxation import Relaxer, RelaxResult, host_max_force
from mdsens.spectrum import DENSE_SPECTRUM_LIMIT, Spectrum, lowest_eigenvalue, lowest_eigenvalues, lowest_mode
from mdsens.system import System
from mdsens.validity import Validity, lowest_mode_only, validity_radii

# A derivative larger than this many box lengths per unit parameter is not physics but a failed
# solve (an inconsistent system returns values of order 1e18).
ABSURD_SCALE = 1e8
ILL_CONDITIONED = 1e7
# A right-hand side ∂F/∂θ this many times its noise floor (the solve's absolute tolerance) is
# signal; below, dx*/dθ is noise amplified by H⁺ (see ParameterSensitivity.resolved).
RESOLVED_SIGNAL = 10.0


def solve_atol(system: System) -> float:
    """The linear solve's absolute tolerance: the norm of a force field with every component at
    the relaxation's ``fmax``. The right-hand side ∂F/∂θ is known no better than the state is
    relaxed (∂F/∂ε = F/ε, for one, is the residual force itself)."""
    return system.recipe["minimizer"]["fmax"] * math.sqrt(system.positions.size)


def linear_solve_from_recipe(system: System, solver: str | None = None) -> implicit.LinearSolve:
    """The linear solve named in the recipe's ``sensitivity`` table (or by ``solver``).

    Its absolute tolerance is :func:`solve_atol`.
    """
    settings = system.recipe["sensitivity"]
    solver = settings["solver"] if solver is None else solver
    atol = solve_atol(system)
    if solver == "cg":
        return implicit.cg(tol=settings["tol"], maxiter=settings["maxiter"] or None, atol=atol)
    if solver == "dense":
        return implicit.dense(atol=atol)
    raise UserError(f"unknown solver {solver!r}; known: cg, dense")


def optimality_fn(system: System):
    """F(x, θ) = ∇ₓE(x, θ): zero at a relaxed configuration."""
    return jax.grad(system.energy_fn)


def relaxed_positions_fn(system: System, relaxer: Relaxer | None = None, solver: str | None = None):
    """The differentiable relaxed positions ``x_star(params, x0=None) -> (N, d)``.

    Composes with ``jax.jvp``, ``jax.jacfwd``, ``jax.vjp``, ``jax.grad``, ``jax.jacrev``,
    ``jax.vmap`` and ``jax.jit``. The minimiser runs on the forward pass and is never
    differentiated; derivatives come from the implicit function theorem at the relaxed state,
    with the zero modes removed (rigid motions and rattlers: the minimum-norm derivative).
    ``x0`` (default: the system's initial positions) is where the minimiser starts; pass a
    relaxed state to warm-start.

    Fails loudly rather than differentiating a state that is not relaxed: where the inner
    relaxation does not reach the engine's ``fmax`` within its ``max_steps`` (or diverges), x*
    and its derivatives are NaN and the call raises (inside ``jit`` as a JAX runtime error whose
    message says "did not converge"); so does a linear solve that fails. With a neighbour list
    (:mod:`mdsens.neighbors`) its size and cutoff are fixed when this function is built:
    parameters whose interaction range exceeds the cutoff (the recipe's range + 10 %), or a state
    with more pairs than the list holds, fail the same way; then pass
    ``relaxer.for_params(params, x)`` and its system. The derivative is undefined where the
    contact network changes; second derivatives are not supported.
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


def _warnings(rattlers: np.ndarray, spectrum: Spectrum | None, force: float, fmax: float) -> list[str]:
    """What a user should know about a sensitivity, each with what to do about it."""
    out = []
    if force > fmax:
        out.append(f"the state is not relaxed (max|F| {force:.2g} > fmax {fmax:.2g}): relax again")
    if rattlers.any():
        out.append(
            f"{int(rattlers.sum())} rattler(s) (fewer than d + 1 contacts): their positions are not"
            " determined, their dx*/dθ is masked to 0 and their degrees of freedom are removed"
        )
    if spectrum is not None:
        if spectrum.negative:
            out.append(
                f"the Hessian has a negative eigenvalue ({spectrum.lowest[0]:.3g}): the state is a saddle"
                " point, not a minimum; relax from a perturbed start (--set rattle=1e-3)"
            )
        if spectrum.extra_zero_modes:
            out.append(
                f"{spectrum.extra_zero_modes} zero mode(s) beyond the removed ones: the derivative along"
                " them is undefined; check with --solver dense"
            )
        # Eigenvalues below 1e-8 × the largest count as zero modes (above), so the ratio stays
        # below 1e8: warn a decade before that.
        elif spectrum.condition_number > ILL_CONDITIONED:
            out.append(
                f"the Hessian is ill-conditioned (condition number {spectrum.condition_number:.2g}):"
                " relax to a smaller fmax and compare with --solver dense"
            )
    return out


def _unresolved(entries: dict) -> list[str]:
    """A warning per dx*/dθ below what the solve resolves (exact zeros are results, not noise)."""
    return [
        f"dx*/d{name} (max {entry.max_displacement:.2g}) is below what the solve resolves: noise,"
        " not a result (relax to a smaller fmax to resolve it)"
        for name, entry in entries.items()
        if not (entry.resolved or entry.exactly_zero)
    ]


@dataclass(frozen=True)
class ParameterSensitivity:
    """dx*/dθ and dE*/dθ for one scalar parameter, with the solve's diagnostics.

    Attributes:
        name: parameter name (``diameter.B``).
        value: θ at which the derivative was taken.
        dx: dx*/dθ, shape (N, d), zero modes removed (rigid motions; rattlers' rows are 0).
        denergy: dE*/dθ (envelope theorem).
        solver: ``cg`` or ``dense``.
        iterations: linear-solver iterations (0 when ``exactly_zero``).
        residual: relative residual of the linear solve (0 when ``exactly_zero``).
        converged: whether the solve was accepted (:attr:`mdsens.implicit.SolveInfo.converged`).
        wall_time: seconds for this parameter (compilation included for the first).
        exactly_zero: the right-hand side ∂²E/∂x∂θ is zero or below the solve's absolute
            tolerance (:func:`solve_atol`), so dx*/dθ = 0 exactly and no solve ran.
        resolved: dx*/dθ is signal, not noise: the right-hand side ‖P ∂F/∂θ‖ exceeds
            :data:`RESOLVED_SIGNAL` × the absolute tolerance, the accuracy it is known to (the
            residual forces of the relaxed state), so that noise of that size changes dx*/dθ by
            less than its own size (unless the Hessian's condition number amplifies it: see the
            spectrum's warning). False when ``exactly_zero`` (nothing to resolve). An unresolved
            dx*/dθ must not be drawn or reported as a result.
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
    exactly_zero: bool
    resolved: bool

    @property
    def max_displacement(self) -> float:
        """max over particles of the vector norm |dx_i*/dθ|: what "max|dx*/dθ|" means everywhere."""
        return float(np.max(np.linalg.norm(self.dx, axis=-1))) if self.dx.size else 0.0


@dataclass(frozen=True)
class SensitivityResult:
    """Sensitivities of one relaxed state to several parameters.

    ``max_force`` is recomputed at the state; ``state_relaxed`` says whether it is within the
    recipe's ``fmax`` (False only when computed with ``allow_unconverged``). ``rattlers`` marks
    particles whose position is not determined: their degrees of freedom are removed from the
    solve and their dx*/dθ is 0 (masked, not computed). ``spectrum`` holds the lowest Hessian
    eigenvalues off the null space, and ``warnings`` says what looks wrong and what to do.
    ``validity`` gives, per parameter, how far it can move before the linearisation stops
    holding (a contact opens or closes, or a Hessian eigenvalue reaches zero; see
    :mod:`mdsens.validity`); the Hessian criterion only where the spectrum was computed.
    """

    parameters: dict[str, ParameterSensitivity]
    max_force: float
    state_relaxed: bool
    removed_modes: list[str]
    wall_time: float
    rattlers: np.ndarray
    spectrum: Spectrum | None
    warnings: list[str]
    validity: dict[str, Validity] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """Forward-mode implicit sensitivities of one system, compiled once for every parameter.

    An immutable value, safe to share, like :class:`mdsens.relaxation.Relaxer`.

    Args:
        system: the system.
        solver: ``cg`` (matrix-free, default from the recipe) or ``dense``.
    """

    system: System = field(repr=False)
    solver: str | None = None
    _tangent: Callable = field(init=False, repr=False)
    _denergy: Callable = field(init=False, repr=False)
    _forces: Callable = field(init=False, repr=False)
    _nullspace: Callable = field(init=False, repr=False)
    _rattlers: Callable = field(init=False, repr=False)
    _hessian: Callable = field(init=False, repr=False)

    def __post_init__(self):
        system = self.system
        solver = system.recipe["sensitivity"]["solver"] if self.solver is None else self.solver
        linear_solve = linear_solve_from_recipe(system, solver)
        condition = optimality_fn(system)
        # A frozen dataclass is assigned its derived fields here, once, and never after.
        for key, value in {
            "solver": solver,
            "_tangent": jax.jit(
                lambda x, params, direction: implicit.root_jvp(
                    condition, x, params, direction, linear_solve, system.nullspace
                )
            ),
            "_denergy": jax.jit(jax.grad(system.energy_fn, argnums=1)),
            "_forces": jax.jit(system.force_fn),
            "_nullspace": jax.jit(system.nullspace),
            "_rattlers": jax.jit(system.rattlers),
            # The Hessian's linearisation, compiled (eager, it ran operation by operation) and
            # returned as a jax.tree_util.Partial that the spectrum's compiled loops take as input.
            "_hessian": jax.jit(lambda x, params: implicit.hessian_matvec(condition, x, params)),
        }.items():
            object.__setattr__(self, key, value)

    def for_params(self, params: dict, x) -> Sensitivity:
        """This engine, or a new one whose neighbour list reaches far enough for ``params`` and
        has room for the pairs at ``x`` (see :meth:`mdsens.system.System.for_params`)."""
        system = self.system.for_params(params, x)
        return self if system is self.system else Sensitivity(system, self.solver)

    def compute(
        self,
        relaxed: RelaxResult | np.ndarray,
        names: list[str] | tuple[str, ...],
        params: dict | None = None,
        allow_unconverged: bool = False,
        progress=None,
        spectrum: bool | str = "lowest",
    ) -> SensitivityResult:
        """dx*/dθ and dE*/dθ for every name (``diameter`` expands to every species).

        The force at ``relaxed`` is recomputed here rather than trusted from a file. With
        ``spectrum`` True, the four lowest Hessian eigenvalues are computed too (dense up to
        :data:`mdsens.spectrum.DENSE_SPECTRUM_LIMIT` degrees of freedom, ARPACK's Lanczos
        beyond, which can cost more than the relaxation); with ``"lowest"`` (the default), the
        same where dense, and beyond only the lowest eigenvalue, by plain Lanczos
        (:func:`mdsens.spectrum.lowest_mode`: about two CG solves' worth of Hessian products),
        a stability verdict whose guarantees :class:`mdsens.spectrum.LowestMode` states. When
        ``params`` or the state need a longer neighbour list, the engine of
        :meth:`for_params` computes them (build that once to compute many times there).

        Raises:
            UserError: unknown parameter name.
            NotConvergedError: the state is not relaxed to the recipe's ``fmax`` (unless
                ``allow_unconverged``).
            FloatingPointError: a derivative is not finite, absurdly large, or its linear
                solve did not converge.
        """
        params = self.system.params if params is None else params
        positions = relaxed.positions if isinstance(relaxed, RelaxResult) else relaxed
        return self.for_params(params, positions)._compute(
            positions, names, params, allow_unconverged, progress, spectrum
        )

    def _compute(self, positions, names, params, allow_unconverged, progress, spectrum) -> SensitivityResult:
        """:meth:`compute` on this engine, whose list covers ``params`` and ``positions``."""
        system = self.system
        names = expand_parameters(system, names)
        x = jnp.asarray(positions, dtype=jnp.float64)
        start = time.perf_counter()
        force = host_max_force(self._forces(x, params))
        fmax = system.recipe["minimizer"]["fmax"]
        if force > fmax and not allow_unconverged:
            raise NotConvergedError(
                f"the state is not relaxed: max force {force:.3g} > fmax {fmax:.3g}; a sensitivity"
                " computed here would be wrong (relax again, or allow it explicitly)"
            )
        denergy = self._denergy(x, params)
        atol = solve_atol(system)
        out = {}
        scale = ABSURD_SCALE * max(float(np.max(np.abs(system.cell))), float(np.ptp(positions)), 1.0)
        for name in names:
            t0 = time.perf_counter()
            tangent = unit_tangent(system, name)
            dx, info = self._tangent(x, params, tangent)
            dx = np.asarray(dx)
            entry = ParameterSensitivity(
                name=name,
                value=parameter_value(system, params, name),
                dx=dx,
                denergy=directional(denergy, tangent),
                solver=self.solver,
                iterations=int(info.iterations),
                residual=float(info.residual),
                converged=bool(info.converged),
                wall_time=time.perf_counter() - t0,
                exactly_zero=bool(info.exactly_zero),
                resolved=not bool(info.exactly_zero) and float(info.rhs_norm) > RESOLVED_SIGNAL * atol,
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
        nullspace = self._nullspace(x, params)
        rattlers = np.asarray(self._rattlers(x, params))
        lowest, modes, verdict = None, None, []
        if spectrum:
            matvec = self._hessian(x, params)
        if spectrum == "lowest" and x.size > DENSE_SPECTRUM_LIMIT:
            mode = lowest_mode(matvec, x.size, nullspace)
            lowest, modes = lowest_eigenvalue(mode, nullspace), lowest_mode_only(mode, x.shape)
            if not mode.converged:
                verdict.append(
                    f"the lowest Hessian eigenvalue did not converge in {mode.iterations} Lanczos steps"
                    f" (residual {mode.residual:.2g}): the stability verdict is uncertain (--spectrum)"
                )
        elif spectrum:
            lowest = lowest_eigenvalues(matvec, x.size, nullspace)
        # The Hessian criterion needs eigenvectors: only where the spectrum is wanted (affordable).
        dx = {name: entry.dx for name, entry in out.items()}
        validity = validity_radii(system, x, params, dx, modes=modes, k=4 if spectrum else 0)
        return SensitivityResult(
            parameters=out,
            max_force=force,
            state_relaxed=force <= fmax,
            removed_modes=system.zero_modes
            + ([f"rattlers ({int(rattlers.sum())})"] if rattlers.any() else []),
            wall_time=time.perf_counter() - start,
            rattlers=rattlers,
            spectrum=lowest,
            warnings=_warnings(rattlers, lowest, force, fmax) + verdict + _unresolved(out),
            validity=validity,
        )


def compute_sensitivity(
    system: System, relaxed: RelaxResult | np.ndarray, names, **kwargs
) -> SensitivityResult:
    """One-shot :meth:`Sensitivity.compute` (build :class:`Sensitivity` once to reuse it)."""
    solver = kwargs.pop("solver", None)
    return Sensitivity(system, solver).compute(relaxed, names, **kwargs)
