"""FIRE 2.0 and the Newton–CG finish: closed-form problems, real systems, the same minimum as FIRE.

What makes these falsifiable:

* a quadratic bowl E = ½ (x − c)ᵀ A (x − c) has its minimum at c in closed form, and one exact
  Newton step lands there; E = ½ x² − ½ y² + ¼ y⁴ has a saddle at the origin, where a Newton step
  would head for the saddle: it must stop (negative curvature), not move;
* a linear Lennard-Jones trimer at the spacing where it is stationary is a saddle (bending it
  lowers the energy): Newton must hand over to FIRE 2.0, which must end in the triangle, whose
  energy is −3ε exactly;
* the 13-atom LJ cluster's global minimum, the icosahedron, has E = −44.326801 ε (Cambridge
  Cluster Database);
* started next to a minimum that JAX-MD's FIRE found, FIRE 2.0 must reach the same minimum
  (energy and positions), and its derivatives must match central finite differences;
* the force evaluations FIRE 2.0 reports are counted independently by a callback in the force.
"""

from __future__ import annotations

from types import SimpleNamespace

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

import mdsens  # noqa: F401  (float64)
from mdsens import newton
from mdsens.errors import UserError
from mdsens.fire2 import fire2
from mdsens.parameters import unit_tangent
from mdsens.recipe import MINIMIZER_DEFAULTS, apply_overrides, load_recipe, resolve, scaled_time_steps
from mdsens.references import central_difference, relative_error
from mdsens.relaxation import Relaxer, max_force
from mdsens.sensitivity import Sensitivity
from mdsens.system import load_system

FIRE2 = ['minimizer.name="fire2"']
LJ13_ENERGY = -44.326801  # Cambridge Cluster Database, to its six decimals
LJ = ["potential.sigma=1", "potential.epsilon=1", "potential.r_cutoff=inf"]


def synthetic(energy_fn, positions):
    """The parts of a System that :func:`mdsens.newton.newton_finish` uses: free space, no null
    space."""
    return SimpleNamespace(
        energy_fn=energy_fn,
        positions=np.asarray(positions),
        nullspace=lambda x, params: None,
        shift=lambda x, dx: x + dx,
    )


def exact_max_force(system, x, params=None) -> float:
    params = system.params if params is None else params
    return float(max_force(system.force_fn(jnp.asarray(x), params)))


def moved_apart(system, x_a, x_b, keep) -> float:
    """max over the ``keep`` particles of |x_a − x_b| (minimum image) after removing the mean
    translation of the ``keep`` particles."""
    moved = np.asarray(jax.vmap(system.displacement)(jnp.asarray(x_a), jnp.asarray(x_b)))[keep]
    return float(np.max(np.linalg.norm(moved - moved.mean(axis=0), axis=-1)))


# --- Newton on closed-form problems -------------------------------------------------------------


def test_newton_takes_a_quadratic_bowl_to_its_minimum_in_one_step():
    rng = np.random.default_rng(0)
    n = 16
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(np.linspace(1.0, 50.0, n)) @ q.T)
    centre = jnp.asarray(rng.normal(size=(n // 2, 2)))

    def energy(x, params):
        d = (x - centre).ravel()
        return 0.5 * d @ a @ d

    x0 = centre + 0.1 * jnp.asarray(rng.normal(size=centre.shape))
    # CG solved for the end at once (forcing 1): one step.
    out = jax.jit(newton.newton_finish(synthetic(energy, x0), forcing=1.0))(x0, None, 1e-10)
    assert newton.STATUS[int(out.status)] == "converged"
    assert int(out.iterations) == 1
    assert np.max(np.abs(np.asarray(out.position - centre))) < 1e-11
    # The force at the start, the linearisation, two per CG iteration (at most the 16
    # dimensions), one line-search trial.
    assert int(out.evaluations) == 1 + 1 + 2 * int(out.cg_iterations) + 1
    assert 1 <= int(out.cg_iterations) <= n
    # The default inexact solves go about half the way each time: at most two steps.
    out = jax.jit(newton.newton_finish(synthetic(energy, x0)))(x0, None, 1e-10)
    assert newton.STATUS[int(out.status)] == "converged" and int(out.iterations) <= 2
    assert np.max(np.abs(np.asarray(out.position - centre))) < 1e-11


def test_newton_refuses_to_step_towards_a_saddle():
    def energy(x, params):
        u, v = x[0]
        return 0.5 * u**2 - 0.5 * v**2 + 0.25 * v**4

    # H = diag(1, −1 + 3 v²) is indefinite here; a Newton step would go to the saddle at 0.
    x0 = jnp.asarray([[0.3, 0.05]])
    out = jax.jit(newton.newton_finish(synthetic(energy, x0)))(x0, None, 1e-10)
    assert int(out.status) == newton.NOT_DESCENT
    assert int(out.iterations) == 0
    np.testing.assert_array_equal(np.asarray(out.position), np.asarray(x0))


def linear_trimer(path) -> None:
    """Three LJ atoms on a line at the spacing where the line is stationary, the middle one
    pushed off it by 1e-3 σ: next to a saddle (the bent trimer has lower energy)."""
    system = load_system(
        structure=write_atoms(path, [[0, 0, 0], [1, 0, 0], [2, 0, 0]]),
        potential="lennard_jones",
        overrides=LJ,
    )
    energy = jax.jit(system.energy_fn)

    def line(a):
        x = jnp.asarray([[-a, 0.0, 0.0], [0.0, 0.0, 0.0], [a, 0.0, 0.0]])
        return float(energy(x, system.params))

    a = minimize_scalar(line, bounds=(0.9, 1.3), method="bounded", options={"xatol": 1e-12}).x
    write_atoms(path, [[-a, 0, 0], [0, 1e-3, 0], [a, 0, 0]])


def write_atoms(path, positions):
    ase.io.write(path, ase.Atoms("Ar3", positions=positions))
    return path


def test_a_saddle_start_hands_over_to_fire2(tmp_path):
    path = tmp_path / "trimer.xyz"
    linear_trimer(path)
    system = load_system(
        structure=path, potential="lennard_jones", overrides=[*LJ, *FIRE2, "minimizer.newton_switch=1.0"]
    )
    assert exact_max_force(system, system.positions) < 1.0  # Newton is tried at once
    relaxer = Relaxer(system)
    result = relaxer.relax()
    assert result.newton.startswith("not a descent direction")
    assert result.newton_iterations == 0
    assert result.converged and result.steps > 0
    # The bent trimer relaxes to the equilateral triangle, three pairs at the LJ minimum.
    assert result.energy == pytest.approx(-3.0, rel=1e-10)
    # x*(θ) hands over the same way inside jit.
    x = jax.jit(relaxer.solve)(system.params, jnp.asarray(system.positions))
    assert float(system.energy_fn(x, system.params)) == pytest.approx(-3.0, rel=1e-10)


# --- FIRE 2.0 on its own --------------------------------------------------------------------------


def test_fire2_reports_the_force_evaluations_it_makes():
    calls = []
    a = jnp.diag(jnp.asarray([1.0, 30.0]))

    def force(x, pairs, params):
        jax.debug.callback(lambda: calls.append(1))
        return -(x @ a)

    settings = {k: v for k, v in MINIMIZER_DEFAULTS["fire2"].items() if k not in ("fmax", "max_steps")}
    settings.pop("newton_switch")
    init, step = fire2(force, lambda x, dx: x + dx, **settings)
    state = init(jnp.asarray([[1.0, 1.0]]), None, None)
    step = jax.jit(step)
    uphill = 0
    for _ in range(200):
        moving = bool(jnp.any(state.velocity != 0))
        state = step(state, None, None)
        jax.effects_barrier()
        uphill += moving and int(state.downhill) == 0
    # The stiff direction overshoots: uphill moves happen, each with a second evaluation.
    assert uphill > 0
    assert int(state.evaluations) == len(calls) == 1 + 200 + uphill
    assert float(jnp.max(jnp.abs(state.position))) < 1e-6


@pytest.fixture(scope="module")
def fire2_packing():
    system = load_system("binary-packing", FIRE2)
    relaxer = Relaxer(system)
    result = relaxer.relax()
    return system, relaxer, result


def test_fire2_relaxes_the_packing(fire2_packing):
    system, _, result = fire2_packing
    assert result.converged and result.minimizer == "fire2"
    assert exact_max_force(system, result.positions) <= system.recipe["minimizer"]["fmax"]
    assert result.force_evaluations > result.steps


@pytest.fixture(scope="module")
def loose_packing():
    """The 128-particle packing at φ = 0.90, which has rattlers: the system and the minimum
    JAX-MD's FIRE reaches from its random start."""
    system = load_system("binary-packing", ["box.packing_fraction=0.90"])
    relaxer = Relaxer(system)
    result = relaxer.relax()
    result.require_converged()
    return system, relaxer, result


@pytest.mark.parametrize(
    "settings", [FIRE2, [*FIRE2, "minimizer.newton_switch=1e-6"]], ids=["fire2", "fire2+newton"]
)
def test_the_minimum_fire_reaches_is_reached_from_next_to_it(loose_packing, settings):
    # From the random start the minimisers take other paths to other minima; from next to a
    # minimum, every one must end in it.
    system, fire_relaxer, relaxed = loose_packing
    keep = ~np.asarray(system.rattlers(jnp.asarray(relaxed.positions), system.params))
    assert not keep.all()  # rattlers: their positions are not determined, nor compared
    start = relaxed.positions + np.random.default_rng(1).normal(scale=1e-3, size=relaxed.positions.shape)
    fire = fire_relaxer.relax(x0=start)
    other_system = load_system("binary-packing", ["box.packing_fraction=0.90", *settings])
    other = Relaxer(other_system).relax(x0=start)
    assert fire.converged and other.converged
    assert exact_max_force(system, other.positions) <= system.recipe["minimizer"]["fmax"]
    assert other.energy == pytest.approx(fire.energy, rel=1e-10)
    assert moved_apart(system, fire.positions, other.positions, keep) < 1e-8
    if other_system.recipe["minimizer"]["newton_switch"]:
        assert other.newton.startswith("converged") and other.newton_iterations >= 1
        assert other.contact_changes == 0


def test_sensitivities_at_the_fire2_minimum_match_finite_differences(fire2_packing, packing_fd_step):
    system, relaxer, result = fire2_packing
    name = "diameter.B"
    implicit = Sensitivity(system).compute(result, [name], spectrum=False).parameters[name]
    fd = central_difference(
        relaxer, result.positions, system.params, unit_tangent(system, name), packing_fd_step
    )
    assert fd.converged and not fd.changed.any()
    assert relative_error(implicit.dx, fd.dx) <= 5e-6


@pytest.mark.parametrize("settings", [[], ["minimizer.newton_switch=1e-6"]], ids=["fire2", "fire2+newton"])
def test_fire2_relaxes_the_lj_cluster_recipe(settings):
    result = Relaxer(load_system("lj-cluster", [*FIRE2, *settings])).relax()
    assert result.converged
    assert result.energy == pytest.approx(LJ13_ENERGY, abs=1e-6)


def test_fire2_relaxes_an_lj13_cluster_without_minimizer_settings():
    path = load_recipe("lj-cluster")["structure"]
    system = load_system(structure=path, potential="lennard_jones", overrides=[*LJ, *FIRE2])
    # FIRE 2.0's defaults, its time steps scaled to the LJ wall (mdsens.recipe.scaled_time_steps).
    steps = scaled_time_steps(MINIMIZER_DEFAULTS["fire2"], set(), np.sqrt(72 / 2 ** (1 / 3)))
    assert system.recipe["minimizer"] == {"name": "fire2", **steps}
    result = Relaxer(system).relax()
    assert result.converged
    assert exact_max_force(system, result.positions) <= result.fmax
    assert result.energy == pytest.approx(LJ13_ENERGY, abs=1e-6)


def test_x_star_with_a_newton_finish_and_the_unrolled_fire2():
    system = load_system("lj-cluster", [*FIRE2, "minimizer.newton_switch=1e-6"])
    relaxer = Relaxer(system)
    result = relaxer.relax()
    x = jax.jit(relaxer.solve)(system.params, jnp.asarray(system.positions))
    assert float(system.energy_fn(x, system.params)) == pytest.approx(result.energy, rel=1e-12)
    assert exact_max_force(system, x) <= relaxer.fmax
    # The unrolled steps are FIRE 2.0's alone: as many as relax() took before Newton.
    init, step, positions = relaxer.unrolled()
    state = init(jnp.asarray(system.positions), system.params)
    state = jax.jit(lambda s: jax.lax.fori_loop(0, result.steps, lambda _, s: step(s, system.params), s))(
        state
    )
    assert exact_max_force(system, positions(state)) <= relaxer.newton_switch


def test_fire_counts_one_evaluation_per_step(packing_relaxed):
    assert packing_relaxed.force_evaluations == packing_relaxed.steps + 1
    assert packing_relaxed.newton == "" and packing_relaxed.newton_iterations == 0


# --- the recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "minimizer.n_delay=-1",
        "minimizer.n_delay=2.5",
        "minimizer.f_inc=0.9",
        "minimizer.f_dec=1.5",
        "minimizer.alpha_start=0",
        "minimizer.f_alpha=nan",
        "minimizer.dmax=0",
        "minimizer.newton_switch=-1e-6",
        "minimizer.newton_switch=inf",
        "minimizer.dt_min=0.5",
        "minimizer.dt_max=0.01",
        "minimizer.step_size=0.1",
    ],
)
def test_bad_fire2_settings_are_user_errors(override):
    recipe = apply_overrides(load_recipe("binary-packing"), [*FIRE2, override])
    with pytest.raises(UserError, match="minimizer"):
        resolve(recipe)


def test_switching_to_fire2_keeps_only_its_settings():
    recipe = load_recipe("lj-cluster")
    defaults = MINIMIZER_DEFAULTS["fire2"]
    # The recipe's own FIRE time steps carry over (fire2 has the same keys); the rest are defaults.
    resolved = resolve(apply_overrides(recipe, FIRE2))["minimizer"]
    assert set(resolved) == {"name", *defaults}
    for key in ("dt_start", "dt_max", "fmax"):
        assert resolved[key] == recipe["minimizer"][key] != defaults[key]
    assert resolved["newton_switch"] == defaults["newton_switch"] == 0.0
    # Gradient descent's step size does not, nor do the steps it dropped.
    via = ['minimizer.name="gradient_descent"', "minimizer.step_size=0.1", *FIRE2]
    assert resolve(apply_overrides(recipe, via))["minimizer"] == {
        "name": "fire2",
        **defaults,
        "fmax": recipe["minimizer"]["fmax"],
    }
    assert resolve(apply_overrides(recipe, [*FIRE2, "minimizer.dmax=inf"]))["minimizer"]["dmax"] == np.inf
