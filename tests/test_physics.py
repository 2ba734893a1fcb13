"""Physics checks of relaxation and sensitivities against independent references.

* the 128-particle binary packing against the reference fixture (independent code);
* central finite differences of warm-started relaxations (forward and reverse mode);
* the envelope theorem for dE*/dθ;
* a line of soft spheres in a periodic box, whose relaxed state and derivatives are closed form;
* the length-scaling symmetry of the soft-sphere packing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import implicit
from mdsens.parameters import unit_tangent
from mdsens.recipe import apply_overrides
from mdsens.references import relative_error, without_null_space
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity, relaxed_positions_fn
from mdsens.system import build_system, load_system


def min_image(system, a, b) -> np.ndarray:
    """a − b per particle, wrapped into the periodic box (minimum image; mdsens.references keeps
    its own private)."""
    return np.asarray(jax.vmap(system.displacement)(jnp.asarray(a), jnp.asarray(b)))


# --------------------------------------------------------------------------------------------
# (a) the paper's packing against the reference fixture


def test_packing_builds_the_reference_start(packing_system, packing_reference):
    ref = packing_reference
    assert packing_system.n_particles == 128
    np.testing.assert_allclose(packing_system.box, [ref["box"]] * 2, rtol=1e-14)
    np.testing.assert_array_equal(packing_system.types, ref["type"])
    np.testing.assert_allclose(np.asarray(packing_system.params["diameter"]), ref["diameters"])
    assert float(packing_system.params["epsilon"]) == ref["epsilon"]
    assert float(packing_system.params["alpha"]) == ref["alpha"]
    np.testing.assert_allclose(packing_system.positions, ref["initial_positions"], atol=1e-12)


def test_packing_relaxes_to_reference_state(packing_system, packing_relaxed, packing_reference):
    relaxed = packing_relaxed
    assert relaxed.converged
    # Recompute the force rather than trust the relaxer's report.
    forces = packing_system.force_fn(jnp.asarray(relaxed.positions), packing_system.params)
    assert np.max(np.linalg.norm(np.asarray(forces), axis=1)) <= 1e-12
    assert relaxed.max_force <= 1e-12
    # Positions are wrapped into the box; compare by minimum image.
    offset = min_image(packing_system, relaxed.positions, packing_reference["positions"])
    assert np.max(np.abs(offset)) < 1e-8
    assert np.all((relaxed.positions >= 0) & (relaxed.positions <= packing_system.box))
    assert relaxed.energy == pytest.approx(float(packing_reference["energy"]), rel=1e-10)
    energy = float(packing_system.energy_fn(jnp.asarray(relaxed.positions), packing_system.params))
    assert relaxed.energy == pytest.approx(energy, rel=1e-14)


def test_packing_sensitivity_matches_reference(packing_sensitivity, packing_reference):
    entry = packing_sensitivity.parameters["diameter.B"]
    assert entry.converged and entry.residual < 1e-10
    assert entry.value == 0.6
    np.testing.assert_allclose(entry.dx.mean(axis=0), 0.0, atol=1e-12)  # translation removed
    assert relative_error(entry.dx, packing_reference["dx_ddiameter_B"]) < 1e-8
    assert packing_sensitivity.removed_modes == ["translation.x", "translation.y"]


def test_packing_dense_solver_matches_reference(packing_system, packing_relaxed, packing_reference):
    result = Sensitivity(packing_system, solver="dense").compute(packing_relaxed, ["diameter.B"])
    entry = result.parameters["diameter.B"]
    assert entry.converged and entry.solver == "dense"
    assert relative_error(entry.dx, packing_reference["dx_ddiameter_B"]) < 1e-8


# --------------------------------------------------------------------------------------------
# (b), (c) finite differences, forward and reverse mode


@pytest.fixture(scope="module")
def packing_vjp(packing_system, packing_relaxer, packing_relaxed):
    """vjp_fn of x*(θ) at θ, warm-started from the relaxed state (one forward pass)."""
    x_star = relaxed_positions_fn(packing_system, packing_relaxer)
    x0 = jnp.asarray(packing_relaxed.positions)
    value, vjp_fn = jax.vjp(lambda p: x_star(p, x0), packing_system.params)
    return x_star, value, jax.jit(vjp_fn)


def test_fd_matches_forward_mode(packing_sensitivity, packing_fd):
    fd_dx, _ = packing_fd("diameter.B")
    implicit_dx = packing_sensitivity.parameters["diameter.B"].dx
    assert relative_error(implicit_dx, fd_dx) < 1e-5


def test_fd_matches_reverse_mode_and_forward_agrees(
    packing_system, packing_relaxed, packing_sensitivity, packing_fd, packing_vjp
):
    _, value, vjp_fn = packing_vjp
    # The warm-started forward pass returns the relaxed state itself.
    np.testing.assert_allclose(min_image(packing_system, value, packing_relaxed.positions), 0.0, atol=1e-12)
    fd_dx, _ = packing_fd("diameter.B")
    forward_dx = packing_sensitivity.parameters["diameter.B"].dx
    b = packing_system.species.index("B")
    rng = np.random.default_rng(0)
    for _ in range(4):
        u = rng.normal(size=forward_dx.shape) + 0.5  # with a translation component
        reverse = float(vjp_fn(jnp.asarray(u))[0]["diameter"][b])
        # The FD and forward derivatives have no translation, so uᵀ(dx) = (Pu)ᵀ(dx). Errors are
        # relative to the typical size of uᵀ(dx), ‖Pu‖‖dx‖/√n, not to the value itself, which a
        # random u can make arbitrarily small by cancellation.
        projected = without_null_space(packing_system, packing_relaxed.positions, packing_system.params, u)
        scale = np.linalg.norm(projected) * np.linalg.norm(fd_dx) / np.sqrt(u.size)
        assert abs(reverse - np.sum(u * fd_dx)) <= 1e-5 * scale
        assert abs(reverse - np.sum(u * forward_dx)) <= 1e-10 * scale


def test_jvp_of_relaxed_positions_fn_matches_sensitivity(
    packing_system, packing_relaxed, packing_sensitivity, packing_vjp
):
    x_star, _, _ = packing_vjp
    x0 = jnp.asarray(packing_relaxed.positions)
    tangents = jax.tree_util.tree_map(jnp.zeros_like, packing_system.params)
    tangents["diameter"] = jnp.array([0.0, 1.0])
    _, dx = jax.jvp(lambda p: x_star(p, x0), (packing_system.params,), (tangents,))
    assert relative_error(dx, packing_sensitivity.parameters["diameter.B"].dx) < 1e-10


def test_grad_of_non_invariant_observable(
    packing_system, packing_relaxed, packing_sensitivity, packing_fd, packing_vjp
):
    """d(Σᵢ cᵢ·xᵢ*)/d(diameter) for a random c that is not translation invariant.

    Only the translation-free part of dx*/dθ is defined; the implicit derivative is the
    minimum-norm one (translations removed), so the gradient equals (P c)ᵀ dx*/dθ with P the
    projection to zero mean per axis, which is what a finite difference with the drift removed
    measures.
    """
    x_star, _, _ = packing_vjp
    x0 = jnp.asarray(packing_relaxed.positions)
    c = np.random.default_rng(1).normal(size=packing_relaxed.positions.shape) + 0.3
    assert np.all(np.abs(c.sum(axis=0)) > 1.0)  # clearly not translation invariant

    def observable(params):
        return jnp.sum(jnp.asarray(c) * x_star(params, x0))

    grad = np.asarray(jax.grad(observable)(packing_system.params)["diameter"])
    assert grad.shape == (2,)
    assert np.all(np.isfinite(grad))
    c_projected = without_null_space(packing_system, packing_relaxed.positions, packing_system.params, c)
    for index, species in enumerate(packing_system.species):
        fd_dx, _ = packing_fd(f"diameter.{species}")
        assert grad[index] == pytest.approx(float(np.sum(c_projected * fd_dx)), rel=1e-5)
        forward_dx = packing_sensitivity.parameters[f"diameter.{species}"].dx
        assert grad[index] == pytest.approx(float(np.sum(c * forward_dx)), rel=1e-10)


# --------------------------------------------------------------------------------------------
# (d) energy sensitivity: envelope theorem against finite differences


@pytest.mark.parametrize("name", ["diameter.A", "diameter.B", "epsilon", "alpha"])
def test_energy_sensitivity_matches_fd(name, packing_sensitivity, packing_fd):
    _, fd_denergy = packing_fd(name)
    assert packing_sensitivity.parameters[name].denergy == pytest.approx(fd_denergy, rel=1e-6)


def test_energy_is_linear_in_epsilon(packing_relaxed, packing_sensitivity):
    # E ∝ ε at fixed positions and the minimum does not move with ε: dE*/dε = E*/ε, dx*/dε = 0.
    # dx*/dε solves H v = −∂F/∂ε = −F(x*)/ε: only the residual force (≤ fmax = 1e-12) drives it.
    entry = packing_sensitivity.parameters["epsilon"]
    assert entry.denergy == pytest.approx(packing_relaxed.energy / entry.value, rel=1e-12)
    assert np.max(np.abs(entry.dx)) < 1e-10


def test_a_zero_sensitivity_reads_exactly_zero_not_as_a_failed_solve(packing_sensitivity):
    """dx*/dε: the right-hand side F(x*)/ε is below the solve's absolute tolerance, so the
    answer is 0 exactly, with 0 iterations and residual 0 (before: residual 1.0, 0 iterations)."""
    entry = packing_sensitivity.parameters["epsilon"]
    assert entry.exactly_zero and entry.converged and not entry.resolved
    assert (entry.iterations, entry.residual, entry.max_displacement) == (0, 0.0, 0.0)
    assert not np.any(entry.dx)
    assert not any("epsilon" in warning for warning in packing_sensitivity.warnings)


@pytest.mark.parametrize("name", ["diameter.A", "diameter.B", "alpha"])
def test_a_physical_sensitivity_is_resolved(packing_sensitivity, name):
    entry = packing_sensitivity.parameters[name]
    assert entry.resolved and not entry.exactly_zero and entry.iterations > 0
    # max|dx*/dθ| is the largest per-particle vector norm, never a Cartesian component.
    norms = np.linalg.norm(entry.dx, axis=1)
    assert entry.max_displacement == float(norms.max()) > float(np.max(np.abs(entry.dx)))


def test_lj_epsilon_sensitivity_is_never_reported_as_signal():
    """A one-species LJ crystal: E ∝ ε, so dx*/dε = 0 in theory; what a solve returns from the
    residual forces is noise, and must read as an exact zero or as unresolved, with a warning."""
    system = load_system("lj-fcc-vacancy", overrides=["rattle=0.01"])
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    result = Sensitivity(system).compute(relaxed, ["epsilon", "sigma.Ar"], spectrum=False)
    entry = result.parameters["epsilon.Ar"]
    assert entry.exactly_zero or not entry.resolved
    assert entry.exactly_zero or any("dx*/depsilon.Ar" in warning for warning in result.warnings)
    assert entry.converged
    assert result.parameters["sigma.Ar"].resolved


# --------------------------------------------------------------------------------------------
# (e) a line of soft spheres in a periodic box: closed-form relaxed state and derivatives

LINE_LX, LINE_LY = 3.0, 3.0


def line_recipe() -> dict:
    """Four particles, two of each species (particles 0, 1 are A; 2, 3 are B)."""
    return {
        "name": "line",
        "dimension": 2,
        "n_particles": 4,
        "seed": 0,
        "box": {"side": [LINE_LX, LINE_LY]},
        "species": {
            "A": {"fraction": 0.5, "diameter": 1.0},
            "B": {"fraction": 0.5, "diameter": 0.6},
        },
        "potential": {"name": "soft_sphere", "epsilon": 1.0, "alpha": 2.0},
    }


def line_gaps_closed_form(diameter, epsilon, lx=LINE_LX):
    """Relaxed gaps x₁−x₀, x₂−x₁, x₃−x₂, x₀+Lx−x₃ for the order A A B B along x (α = 2).

    Every contact of the ring carries the same force f = (ε/σᵢ)(1 − gᵢ/σᵢ) and Σgᵢ = Lx, so
    f = ε(Σσᵢ − Lx)/Σσᵢ² and gᵢ = σᵢ(1 − fσᵢ/ε); the energy is Σ ε/2 (1 − gᵢ/σᵢ)².
    """
    d_a, d_b = diameter[0], diameter[1]
    sigma = jnp.stack([d_a, 0.5 * (d_a + d_b), d_b, 0.5 * (d_a + d_b)])
    force = epsilon * (jnp.sum(sigma) - lx) / jnp.sum(sigma**2)
    gaps = sigma * (1 - force * sigma / epsilon)
    energy = jnp.sum(0.5 * epsilon * (1 - gaps / sigma) ** 2)
    return gaps, energy


def line_gaps(system, positions) -> np.ndarray:
    following = np.roll(np.asarray(positions), -1, axis=0)
    return min_image(system, following, positions)[:, 0]


@pytest.fixture(scope="module")
def line_system():
    system = build_system(line_recipe())
    np.testing.assert_array_equal(system.types, [0, 0, 1, 1])
    np.testing.assert_allclose(system.box, [LINE_LX, LINE_LY])
    # Evenly spaced along x, all at the same y; the A-A pair overlaps, B-B does not yet.
    start = np.stack([0.2 + np.arange(4) * LINE_LX / 4, np.full(4, 1.3)], axis=1)
    return system.with_positions(start)


@pytest.fixture(scope="module")
def line_relaxer(line_system):
    return Relaxer(line_system)


@pytest.fixture(scope="module")
def line_relaxed(line_relaxer):
    result = line_relaxer.relax()
    result.require_converged()
    return result


def test_line_relaxes_to_closed_form(line_system, line_relaxed):
    params = line_system.params
    gaps, energy = line_gaps_closed_form(params["diameter"], params["epsilon"])
    assert np.all(np.asarray(gaps) < [1.0, 0.8, 0.6, 0.8])  # every contact overlaps
    # Only neighbours along the ring interact: second neighbours are beyond every contact.
    assert np.all(np.asarray(gaps + jnp.roll(gaps, -1)) > 1.0)
    assert line_relaxed.max_force <= 1e-12
    np.testing.assert_allclose(line_relaxed.positions[:, 1], 1.3, atol=1e-15)  # stays on the line
    np.testing.assert_allclose(line_gaps(line_system, line_relaxed.positions), gaps, atol=1e-12)
    assert line_relaxed.energy == pytest.approx(float(energy), rel=1e-10)


def test_line_hessian_is_closed_form(line_system, line_relaxed):
    """The Hessian the implicit solve uses: a weighted ring Laplacian in x and in y.

    A contact at distance g with U = ε/2 (1 − r/σ)² has stiffness U'' = ε/σ² along the line and
    U'(r)/r = −f/g across it: compressed contacts have negative transverse stiffness, so the
    straight line is a saddle (it would buckle) and stays straight only by symmetry; the y
    directions are not zero modes apart from the rigid translation.
    """
    params = line_system.params
    gaps, _ = line_gaps_closed_form(params["diameter"], params["epsilon"])
    sigma = np.array([1.0, 0.8, 0.6, 0.8])
    force = (sigma.sum() - LINE_LX) / np.sum(sigma**2)

    def ring_laplacian(weights):
        matrix = np.zeros((4, 4))
        for i, weight in enumerate(weights):
            bond = np.zeros(4)
            bond[i], bond[(i + 1) % 4] = -1.0, 1.0
            matrix += weight * np.outer(bond, bond)
        return matrix

    hessian = jax.jit(jax.hessian(line_system.energy_fn))(jnp.asarray(line_relaxed.positions), params)
    hessian = np.asarray(hessian).reshape(8, 8)
    np.testing.assert_allclose(hessian[0::2, 0::2], ring_laplacian(1.0 / sigma**2), atol=1e-10)
    np.testing.assert_allclose(hessian[1::2, 1::2], ring_laplacian(-force / np.asarray(gaps)), atol=1e-10)
    np.testing.assert_allclose(hessian[0::2, 1::2], 0.0, atol=1e-14)  # x and y decouple
    assert np.sum(np.linalg.eigvalsh(hessian[1::2, 1::2]) < -0.1) == 3


@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_line_sensitivity_matches_closed_form(solver, line_system, line_relaxed):
    """dgᵢ/dθ from the implicit dx*/dθ against the differentiated closed form.

    The y directions are not zero modes here: a compressed contact has negative transverse
    stiffness (U'(r)/r < 0), so the Hessian is indefinite in y. The right-hand side has no y
    component and the Hessian does not couple x and y on a line, so both solvers stay in x.
    Every particle of a line has 2 < d + 1 contacts, so the rattler rule of System.nullspace
    would remove them all; the closed form is checked through the generic core with the rigid
    translations as null space.
    """
    params = line_system.params
    expected = jax.jacfwd(line_gaps_closed_form, argnums=(0, 1))(params["diameter"], params["epsilon"])
    (dgaps_ddiameter, dgaps_depsilon), (denergy_ddiameter, denergy_depsilon) = expected
    x = jnp.asarray(line_relaxed.positions)
    n, d = x.shape
    translations = jnp.kron(jnp.ones((n, 1)), jnp.eye(d)) / np.sqrt(n)
    linear_solve = implicit.cg(tol=1e-12) if solver == "cg" else implicit.dense()
    condition = jax.grad(line_system.energy_fn)
    denergy = jax.grad(line_system.energy_fn, argnums=1)(x, params)
    for index, species in enumerate(line_system.species):
        tangent = unit_tangent(line_system, f"diameter.{species}")
        dx, info = implicit.root_jvp(condition, x, params, tangent, linear_solve, lambda *_: translations)
        dx = np.asarray(dx)
        assert bool(info.converged)
        assert np.max(np.abs(dx[:, 1])) < 1e-12  # nothing moves off the line
        dgaps = np.roll(dx[:, 0], -1) - dx[:, 0]
        np.testing.assert_allclose(dgaps, dgaps_ddiameter[:, index], rtol=1e-9, atol=1e-12)
        assert float(denergy["diameter"][index]) == pytest.approx(float(denergy_ddiameter[index]), rel=1e-9)
    tangent = unit_tangent(line_system, "epsilon")
    dx, _ = implicit.root_jvp(condition, x, params, tangent, linear_solve, lambda *_: translations)
    np.testing.assert_allclose(np.asarray(dgaps_depsilon), 0.0, atol=1e-15)  # closed form
    assert np.max(np.abs(np.asarray(dx))) < 1e-12
    assert float(denergy["epsilon"]) == pytest.approx(float(denergy_depsilon), rel=1e-9)


def test_line_particles_are_rattlers_and_masked(line_system, line_relaxed):
    result = Sensitivity(line_system).compute(line_relaxed, ["diameter"])
    assert result.rattlers.all()
    assert any("rattler" in w for w in result.warnings)
    for entry in result.parameters.values():
        assert not entry.dx.any()


# --------------------------------------------------------------------------------------------
# (f) scaling: every length times s (diameters and box) scales x* by s, leaves E* unchanged


def test_packing_length_scaling(packing_system, packing_relaxed):
    s = 1.5
    recipe = apply_overrides(
        packing_system.recipe,
        [
            f"box.side={float(s * packing_system.box[0])!r}",
            f"species.A.diameter={s * 1.0!r}",
            f"species.B.diameter={s * 0.6!r}",
        ],
    )
    scaled = build_system(recipe)
    np.testing.assert_allclose(scaled.box, s * packing_system.box, rtol=1e-15)
    # Start near s·x* (small random kick) so that the scaled relaxation finds the same minimum.
    kick = np.random.default_rng(2).normal(scale=1e-3, size=packing_relaxed.positions.shape)
    start = np.mod(s * (packing_relaxed.positions + kick), scaled.box)
    result = Relaxer(scaled.with_positions(start)).relax(x0=start)
    result.require_converged()
    offset = min_image(scaled, result.positions, s * packing_relaxed.positions)
    offset = without_null_space(scaled, result.positions, scaled.params, offset)
    assert np.max(np.abs(offset)) < 1e-8 * s
    assert result.energy == pytest.approx(packing_relaxed.energy, rel=1e-10)
