"""Rattlers and the Hessian spectrum, against references that share nothing with mdsens.

* The N = 1024 paper packing (tests/data/paper-packing-N1024.npz: JAX-MD
  FIRE, dense pseudo-inverse cross-checked by a sparse direct solve) has one rattler. mdsens must
  find it, mask its dx*/dθ, match the fixture's dx*/dθ on every other particle, and give a finite
  reverse-mode gradient for an observable that weights every particle, rattler included. Without
  the rattler in the null space the adjoint system is inconsistent and CG must say so.
* A rattler made by hand: a small particle dropped into the largest hole of the N = 128 fixture
  packing. It has no contact, so nothing depends on it: the other particles' dx*/dθ must equal
  the N = 128 fixture's and central finite differences, and its own must be 0. What is written
  for it (sensitivity.json, sensitivity.extxyz) must list it and the spectrum off the removed modes.
* The spectrum: dense against NumPy's eigvalsh of jax.hessian, Lanczos against dense, the
  lowest eigenpair alone (plain Lanczos, the default beyond the dense limit) against NumPy's
  eigh off the rattler and against the saddle's closed form, and a
  compressed square lattice, a saddle point whose spectrum and condition number (|λ|max/|λ|min)
  are closed form, and which gets the saddle warning and no other.

Measured on two cores: N = 1024 forward dx*/dθ vs fixture 4.1e-12 (518 CG iterations); reverse
mode vs Σ(Pc)·dx_ref 1e-12; adjoint with translations only: relative residual 1e5 after 400
iterations, where the consistent system is at 2e-9; hand-made rattler: finite differences 3e-7,
N = 128 fixture 1e-12; spectrum dense vs eigvalsh 1e-13, Lanczos vs dense 2e-13.
"""

from __future__ import annotations

import json

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens.sensitivity as sensitivity_module
from mdsens import implicit, spectrum, validity
from mdsens.parameters import unit_tangent
from mdsens.references import central_difference, relative_error
from mdsens.relaxation import Relaxer
from mdsens.run import save_relaxation, save_sensitivity
from mdsens.sensitivity import Sensitivity, _warnings, optimality_fn, relaxed_positions_fn
from mdsens.spectrum import Spectrum
from mdsens.system import build_system, load_system


def min_image(a: np.ndarray, box: float) -> np.ndarray:
    return a - box * np.round(a / box)


def numpy_rattlers(x: np.ndarray, diameters: np.ndarray, box: float, d: int = 2) -> np.ndarray:
    """Rattlers by the usual jamming rule, in NumPy (independent of mdsens.contacts): remove,
    repeatedly, every particle with fewer than d + 1 contacts (centre distance below
    (dᵢ + dⱼ)/2) among those still kept."""
    r = np.linalg.norm(min_image(x[:, None] - x[None], box), axis=-1)
    contact = r < 0.5 * (diameters[:, None] + diameters[None])
    np.fill_diagonal(contact, False)
    kept = np.ones(len(x), dtype=bool)
    while True:
        still = kept & (contact[:, kept].sum(axis=1) >= d + 1)
        if np.array_equal(still, kept):
            return ~kept
        kept = still


def remove_mean(dx: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """dx with the mean over the ``keep`` particles removed from them; others set to 0."""
    out = np.zeros_like(dx)
    out[keep] = dx[keep] - dx[keep].mean(axis=0)
    return out


# --------------------------------------------------------------------------------------------
# The N = 1024 paper packing and its one rattler


@pytest.fixture(scope="module")
def n1024(load_reference):
    ref = load_reference("paper-packing-N1024.npz")
    system = load_system("binary-packing", overrides=["n_particles=1024"])
    return system, ref


@pytest.fixture(scope="module")
def n1024_forward(n1024):
    system, ref = n1024
    return Sensitivity(system).compute(jnp.asarray(ref["positions"]), ["diameter.B"], spectrum=False)


def test_n1024_system_is_the_fixtures(n1024, n1024_forward):
    system, ref = n1024
    np.testing.assert_array_equal(system.positions, ref["initial_positions"])  # bit for bit
    np.testing.assert_array_equal(system.types, ref["type"])
    np.testing.assert_allclose(system.box, [ref["box"]] * 2, rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(system.params["diameter"]), ref["diameters"])
    assert n1024_forward.max_force <= 1e-12 and n1024_forward.state_relaxed  # the fixture is relaxed


def test_rattlers_at_the_fixture_state_are_the_fixtures(n1024):
    system, ref = n1024
    x = ref["positions"]
    rattlers = np.asarray(system.rattlers(jnp.asarray(x), system.params))
    assert rattlers.dtype == bool and rattlers.sum() == 1
    np.testing.assert_array_equal(rattlers, ref["rattler"])
    diameters = ref["diameters"][ref["type"]]
    np.testing.assert_array_equal(numpy_rattlers(x, diameters, float(ref["box"])), ref["rattler"])


def test_forward_sensitivity_matches_the_fixture_and_masks_the_rattler(n1024, n1024_forward):
    _, ref = n1024
    result = n1024_forward
    rattler = ref["rattler"]
    entry = result.parameters["diameter.B"]
    assert entry.converged and entry.residual < 1e-10
    np.testing.assert_array_equal(result.rattlers, rattler)
    assert np.all(entry.dx[rattler] == 0.0)  # masked, exactly
    # mdsens removes the translation of the non-rattlers; the fixture removed the mean over all
    # particles (its rattler entry is ~1e-14). Compare on the non-rattlers up to a translation.
    keep = ~rattler
    np.testing.assert_allclose(entry.dx[keep].mean(axis=0), 0.0, atol=1e-12)
    assert relative_error(remove_mean(entry.dx, keep), remove_mean(ref["dx_ddiameter_B"], keep)) <= 1e-8
    assert "rattlers (1)" in result.removed_modes
    assert any("1 rattler(s)" in warning for warning in result.warnings)


def projected(c: np.ndarray, rattler: np.ndarray) -> np.ndarray:
    """P c: the rattler's coordinates removed and the other particles' translation removed."""
    return remove_mean(c, ~rattler)


def test_reverse_mode_over_all_particles_is_the_projected_forward_answer(n1024, n1024_forward):
    """∂/∂θ_B Σᵢ cᵢ·xᵢ* with random c on every particle, the rattler included.

    Only P dx*/dθ is defined (P as in :func:`projected`), so the gradient is Σ (P c)·dx*/dθ. As
    P c vanishes on the rattler and sums to zero over the others, this number does not depend on
    how a dx*/dθ treats the rattler or fixes its translation: the fixture's (mean over all
    particles removed) and mdsens's (non-rattler translation removed, rattler 0) give the same.
    """
    system, ref = n1024
    x = jnp.asarray(ref["positions"])
    c = np.asarray(jax.random.normal(jax.random.PRNGKey(7), x.shape))
    x_star = relaxed_positions_fn(system)

    def observable(params):
        # Warm start from the relaxed fixture: the minimiser stops at once (max|F| < fmax).
        return jnp.sum(jnp.asarray(c) * x_star(params, x))

    gradient = float(jax.grad(observable)(system.params)["diameter"][1])
    assert np.isfinite(gradient)
    pc = projected(c, ref["rattler"])
    expected = float(np.sum(pc * ref["dx_ddiameter_B"]))
    assert abs(expected) > 1.0  # not a vanishing comparison
    assert gradient == pytest.approx(expected, rel=1e-9)
    forward = n1024_forward.parameters["diameter.B"].dx
    assert gradient == pytest.approx(float(np.sum(pc * forward)), rel=1e-9)


def test_without_the_rattler_in_the_null_space_the_adjoint_solve_fails_loudly(n1024, n1024_forward):
    """A CG adjoint with only the translations projected returned 6e16 silently at this N (measured
    while building the rattler support). The rattler's coordinates are exact zero modes of the
    Hessian that a cotangent on the rattler hits, so the adjoint system is inconsistent: mdsens's
    CG must report non-convergence and a residual that grew instead of shrinking. With mdsens's
    null space the same operator converges (forward: to 1e-10, in ~520 iterations; at 400 its
    residual is 2e-9; reverse mode through it is checked above)."""
    system, ref = n1024
    assert n1024_forward.parameters["diameter.B"].converged
    x = jnp.asarray(ref["positions"])
    n, d = x.shape
    c = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    translations = jnp.kron(jnp.ones((n, 1)), jnp.eye(d)) / np.sqrt(n)
    solve = implicit.cg(tol=1e-12, maxiter=400)
    bar, bad = implicit.root_vjp(optimality_fn(system), x, system.params, c, solve, lambda *_: translations)
    assert not bool(bad.converged)
    assert int(bad.iterations) == 400
    assert float(bad.residual) > 1e3  # relative: the residual grew a thousandfold
    assert np.max(np.abs(np.asarray(bar["diameter"]))) > 1e6  # what a silent solver would return


# --------------------------------------------------------------------------------------------
# A rattler made by hand: a small particle in the largest hole of the N = 128 fixture packing

HOLE = (7.45, 4.72)  # centre of the largest hole (grid search, spacing 0.01): clearance 0.144
SMALL_DIAMETER = 0.1


@pytest.fixture(scope="module")
def hole(packing_reference):
    """The N = 128 fixture packing plus particle 128 (species C, diameter 0.1) in its largest hole:
    system, fixture, positions (already relaxed), sensitivities to every diameter (with the
    spectrum), relaxer."""
    ref = packing_reference
    box = float(ref["box"])
    recipe = {
        "name": "hole",
        "dimension": 2,
        "n_particles": 129,
        "seed": 0,
        "box": {"side": box},
        "species": {
            "A": {"fraction": 64 / 129, "diameter": float(ref["diameters"][0])},
            "B": {"fraction": 64 / 129, "diameter": float(ref["diameters"][1])},
            "C": {"fraction": 1 / 129, "diameter": SMALL_DIAMETER},
        },
        "potential": {"name": "soft_sphere", "epsilon": float(ref["epsilon"]), "alpha": float(ref["alpha"])},
    }
    system = build_system(recipe)
    np.testing.assert_array_equal(system.types[:128], ref["type"])
    positions = np.vstack([ref["positions"], HOLE])
    system = system.with_positions(positions)
    result = Sensitivity(system).compute(positions, ["diameter"])
    return system, ref, positions, result, Relaxer(system)


def test_a_particle_in_a_hole_is_a_rattler(hole):
    system, ref, positions, result, _ = hole
    diameters = np.append(ref["diameters"][ref["type"]], SMALL_DIAMETER)
    gaps = np.linalg.norm(min_image(positions[:128] - positions[128], float(ref["box"])), axis=1)
    gaps -= 0.5 * (diameters[:128] + SMALL_DIAMETER)
    assert gaps.min() > 0.05  # far from touching anything, even at θ ± h
    expected = np.arange(129) == 128
    np.testing.assert_array_equal(numpy_rattlers(positions, diameters, float(ref["box"])), expected)
    np.testing.assert_array_equal(
        np.asarray(system.rattlers(jnp.asarray(positions), system.params)), expected
    )
    np.testing.assert_array_equal(result.rattlers, expected)
    assert result.removed_modes == ["translation.x", "translation.y", "rattlers (1)"]
    assert any("1 rattler(s)" in warning for warning in result.warnings)


def test_the_rattlers_sensitivity_is_zero_and_the_others_are_the_packings(hole):
    """Nothing touches the small particle: dx*/dθ of the others is the N = 128 fixture's, its own
    is 0, and growing it (diameter.C) moves nothing."""
    _, ref, _, result, _ = hole
    dx = {name: entry.dx for name, entry in result.parameters.items()}
    assert sorted(dx) == ["diameter.A", "diameter.B", "diameter.C"]
    for name, value in dx.items():
        assert np.all(value[128] == 0.0), name
    assert relative_error(dx["diameter.B"][:128], ref["dx_ddiameter_B"]) <= 1e-8
    assert np.all(dx["diameter.C"] == 0.0)
    assert result.parameters["diameter.C"].denergy == 0.0


@pytest.mark.parametrize("name", ["diameter.A", "diameter.B"])
def test_hole_sensitivity_matches_central_finite_differences(name, hole, packing_fd_step):
    system, _, positions, result, relaxer = hole
    fd = central_difference(relaxer, positions, system.params, unit_tangent(system, name), packing_fd_step)
    fd.plus.require_converged()
    fd.minus.require_converged()
    # A particle without contact feels no force: FIRE does not move it at all.
    assert np.all(fd.raw_dx[128] == 0.0)
    keep = np.arange(129) != 128
    # The projected difference is the raw one with the mean over the others removed.
    np.testing.assert_allclose(fd.dx, remove_mean(fd.raw_dx, keep), rtol=0, atol=1e-12)
    assert relative_error(result.parameters[name].dx, fd.dx) <= 5e-6


# --------------------------------------------------------------------------------------------
# The Hessian spectrum


@pytest.fixture(scope="module")
def packing_hessian(packing_system, packing_reference):
    """The N = 128 fixture state: its Hessian-vector product, null space and dense Hessian."""
    system = packing_system
    x = jnp.asarray(packing_reference["positions"])
    matvec = implicit.hessian_matvec(optimality_fn(system), x, system.params)
    nullspace = system.nullspace(x, system.params)
    dense = np.asarray(jax.jit(jax.hessian(system.energy_fn))(x, system.params)).reshape(x.size, x.size)
    return matvec, x.size, nullspace, dense


def test_dense_spectrum_is_numpys_eigvalsh_without_the_translations(packing_hessian):
    matvec, n, nullspace, hessian = packing_hessian
    values = np.linalg.eigvalsh(hessian)
    largest_abs = np.max(np.abs(values))
    assert np.all(np.abs(values[:2]) < 1e-12 * largest_abs)  # the two translations
    exact = values[2:]
    assert exact[0] > 1e-3  # no rattler, no other zero mode: N = 128 has none
    result = spectrum.lowest_eigenvalues(matvec, n, nullspace, k=6)
    assert result.method == "dense" and result.removed == 2
    np.testing.assert_allclose(result.lowest, exact[:6], rtol=1e-8)
    assert result.largest == pytest.approx(exact[-1], rel=1e-8)
    assert result.condition_number == pytest.approx(exact[-1] / exact[0], rel=1e-8)
    assert not result.negative and result.extra_zero_modes == 0


def test_lanczos_spectrum_agrees_with_dense(packing_hessian, monkeypatch):
    matvec, n, nullspace, _ = packing_hessian
    dense = spectrum.lowest_eigenvalues(matvec, n, nullspace)
    monkeypatch.setattr(spectrum, "DENSE_SPECTRUM_LIMIT", 0)
    lanczos = spectrum.lowest_eigenvalues(matvec, n, nullspace)
    assert lanczos.method == "lanczos" and lanczos.removed == 2
    np.testing.assert_allclose(lanczos.lowest[:3], dense.lowest[:3], rtol=1e-6)
    assert lanczos.largest == pytest.approx(dense.largest, rel=1e-6)
    assert not lanczos.negative and lanczos.extra_zero_modes == 0


@pytest.fixture(scope="module")
def hole_hessian(hole):
    """The hole packing (one rattler): its Hessian-vector product, null space, and NumPy's
    eigendecomposition of jax.hessian with the 4 zero eigenvalues (the rattler's 2 degrees of
    freedom, the others' 2 translations) left out."""
    system, _, positions, _, _ = hole
    x = jnp.asarray(positions)
    matvec = implicit.hessian_matvec(optimality_fn(system), x, system.params)
    nullspace = system.nullspace(x, system.params)
    hessian = np.asarray(jax.jit(jax.hessian(system.energy_fn))(x, system.params)).reshape(x.size, x.size)
    values, vectors = np.linalg.eigh(hessian)
    assert np.all(np.abs(values[:4]) < 1e-12 * values[-1]) and values[4] > 1e-3
    return matvec, x.size, nullspace, values[4:], vectors[:, 4:]


def test_lowest_mode_is_the_dense_lowest_eigenpair_off_the_rattler(hole_hessian):
    """Plain Lanczos from a random start: the Rayleigh quotient is NumPy's lowest eigenvalue off
    the zero modes, bounded as LowestMode says, and its vector that eigenvector."""
    matvec, n, nullspace, values, vectors = hole_hessian
    mode = spectrum.lowest_mode(matvec, n, nullspace)
    assert mode.converged and mode.iterations < n
    assert mode.value >= values[0] - 1e-12 * values[-1]  # a Rayleigh quotient: never below λ_min
    assert abs(mode.value - values[0]) <= mode.residual  # an eigenvalue within the residual
    assert mode.value == pytest.approx(values[0], rel=1e-8)
    assert mode.largest <= values[-1] * (1 + 1e-12) and mode.largest == pytest.approx(values[-1], rel=1e-3)
    assert abs(np.dot(mode.vector, vectors[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert np.all(mode.vector.reshape(-1, 2)[128] == 0.0)  # nothing on the rattler
    verdict = spectrum.lowest_eigenvalue(mode, nullspace)
    assert verdict.method == "lanczos-lowest" and verdict.removed == 4
    assert not verdict.negative and verdict.extra_zero_modes == 0
    assert verdict.condition_number == pytest.approx(values[-1] / values[0], rel=1e-3)


def test_lowest_mode_finds_the_saddle(square_lattice):
    """The square lattice: the lowest eigenvalue 4k⊥ < 0 (twice degenerate) off the
    translations, where the Krylov space ends (β = 0) before n steps."""
    system, relaxed, _ = square_lattice
    x = jnp.asarray(relaxed.positions)
    matvec = implicit.hessian_matvec(optimality_fn(system), x, system.params)
    nullspace = system.nullspace(x, system.params)
    mode = spectrum.lowest_mode(matvec, x.size, nullspace)
    a = SQUARE_SPACING
    assert mode.converged and mode.value == pytest.approx(-4 * (1 - a) / a, rel=1e-10)
    assert mode.largest == pytest.approx(4.0, rel=1e-10)
    verdict = spectrum.lowest_eigenvalue(mode, nullspace)
    assert verdict.negative and verdict.extra_zero_modes == 0


def test_the_default_above_the_dense_limit_follows_the_lowest_mode(hole, monkeypatch):
    """Beyond the dense limit the default reports the lowest eigenvalue only, and the validity
    radius follows that one mode: where the dense lowest mode's linearised eigenvalue reaches
    zero, on the side it moves towards zero, and nowhere on the other."""
    system, _, positions, dense, _ = hole
    monkeypatch.setattr(sensitivity_module, "DENSE_SPECTRUM_LIMIT", 0)
    names = ["diameter.A", "diameter.B"]
    result = Sensitivity(system).compute(positions, names)
    assert result.spectrum.method == "lanczos-lowest" and len(result.spectrum.lowest) == 1
    assert result.spectrum.lowest[0] == pytest.approx(dense.spectrum.lowest[0], rel=1e-8)
    assert result.spectrum.removed == dense.spectrum.removed and not result.spectrum.negative
    x = jnp.asarray(positions)
    modes = validity.lowest_modes(system, x, system.params, k=1)
    assert modes.method == "dense" and len(modes.values) == 1
    for name in names:
        dx = result.parameters[name].dx
        (rate,) = validity.mode_rates(system, x, system.params, unit_tangent(system, name), dx, modes)
        t = -modes.values[0] / rate
        reached, other = (
            (result.validity[name].mode_up, result.validity[name].mode_down)
            if t > 0
            else (result.validity[name].mode_down, result.validity[name].mode_up)
        )
        assert reached.kind == "mode" and reached.mode == 0 and other.kind == "none"
        assert reached.value == pytest.approx(modes.values[0], rel=1e-8)
        assert reached.rate == pytest.approx(rate, rel=1e-5)
        assert reached.distance == pytest.approx(abs(t), rel=1e-5)


def test_condition_number_is_a_ratio_of_magnitudes_off_the_zero_modes():
    """|λ|max / |λ|min, zero modes left out: defined at a saddle, where all the lowest may be < 0."""

    def condition(lowest, largest, zero_modes=0):
        negative = min(lowest) < -1e-8 * largest  # as lowest_eigenvalues sets it (zero_tol 1e-8)
        return Spectrum(lowest, largest, 2, zero_modes, negative, "dense").condition_number

    assert condition([0.5, 2.0], 10.0) == 20.0
    assert condition([-4.0, -2.0], 8.0) == 4.0  # a saddle: |−2| is the smallest magnitude
    assert condition([-20.0, -1.0, 3.0], 8.0) == 20.0  # the most negative is the largest magnitude
    assert condition([-1e-12, 0.5, 2.0], 10.0, zero_modes=1) == 20.0
    assert condition([0.0, 1e-13], 10.0, zero_modes=2) == float("inf")  # nothing but zero modes
    assert Spectrum([], 0.0, 4, 0, False, "none").condition_number == 1.0  # nothing left to solve


def test_the_ill_conditioning_warning_is_reachable_before_the_zero_mode_cut():
    """Eigenvalues below 1e-8 × the largest are zero modes, so a condition number cannot exceed
    1e8: the warning must fire below that, and not for a well-conditioned Hessian."""
    rattlers, relaxed_force, fmax = np.zeros(4, dtype=bool), 1e-13, 1e-12

    def warnings(lowest):
        return _warnings(rattlers, Spectrum(lowest, 1.0, 2, 0, False, "dense"), relaxed_force, fmax)

    assert any("ill-conditioned" in w for w in warnings([5e-8, 1e-3]))
    assert warnings([1e-3, 1e-2]) == []


SQUARE_SPACING, SQUARE_SIDE = 0.9, 4


@pytest.fixture(scope="module")
def square_lattice():
    """A 4 × 4 square lattice of unit harmonic disks at spacing a = 0.9 in a periodic box: every
    particle has 4 compressed contacts (no rattler), forces cancel by symmetry, and the lattice
    is a saddle: a compressed contact has transverse stiffness U'(a)/a < 0."""
    m, a = SQUARE_SIDE, SQUARE_SPACING
    recipe = {
        "name": "square",
        "dimension": 2,
        "n_particles": m * m,
        "seed": 0,
        "box": {"side": m * a},
        "species": {"A": {"fraction": 1.0, "diameter": 1.0}},
        "potential": {"name": "soft_sphere", "epsilon": 1.0, "alpha": 2.0},
    }
    sites = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij"), axis=-1).reshape(-1, 2)
    system = build_system(recipe).with_positions(sites * a + 0.2)
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    return system, relaxed, Sensitivity(system).compute(relaxed, ["diameter", "epsilon"])


def test_saddle_point_spectrum_is_closed_form_and_reported(square_lattice):
    """Harmonic contacts U = ε/2 (1 − r/σ)², σ = ε = 1, at r = a: longitudinal stiffness
    k∥ = U'' = 1, transverse k⊥ = U'(a)/a = −(1 − a)/a. Per polarisation the periodic lattice has
    eigenvalues 2k∥(1 − cos qₓ) + 2k⊥(1 − cos q_y) (and qₓ, q_y swapped), q = 2πj/4: the lowest
    is 4k⊥ (qₓ = 0, q_y = π: twice, one per polarisation), then 2k⊥ (q_y = ±π/2: four times),
    and the largest 4k∥."""
    system, relaxed, result = square_lattice
    a = SQUARE_SPACING
    k_par, k_perp = 1.0, -(1 - a) / a
    assert relaxed.steps == 0 and relaxed.max_force < 1e-14  # a stationary point by symmetry
    assert not result.rattlers.any()
    hessian_spectrum = result.spectrum
    np.testing.assert_allclose(hessian_spectrum.lowest, [4 * k_perp] * 2 + [2 * k_perp] * 2, rtol=1e-10)
    assert hessian_spectrum.largest == pytest.approx(4 * k_par, rel=1e-10)
    assert hessian_spectrum.negative and hessian_spectrum.removed == 2
    assert hessian_spectrum.extra_zero_modes == 0


def test_saddle_point_gets_the_saddle_warning_only(square_lattice):
    """|λ|max / |λ|min = 4k∥ / |2k⊥| = 4 / (2/9) = 18: a well-conditioned saddle. Its forces are
    zero, so 'ill-conditioned: relax to a smaller fmax' would be wrong advice; the saddle warning
    says what can help."""
    _, _, result = square_lattice
    a = SQUARE_SPACING
    assert result.spectrum.condition_number == pytest.approx(4 / (2 * (1 - a) / a), rel=1e-10)
    (warning,) = result.warnings
    assert "saddle point" in warning and f"({-4 * (1 - a) / a:.3g})" in warning


# --------------------------------------------------------------------------------------------
# What is written


def test_sensitivity_files_list_the_rattlers_and_the_spectrum(hole, tmp_path):
    system, _, positions, result, relaxer = hole
    relaxed = relaxer.relax(x0=positions)  # already relaxed: a run directory needs the record
    relaxed.require_converged()
    run = save_relaxation(tmp_path / "run", system, relaxed)
    save_sensitivity(run, system, result)

    summary = json.loads((run / "sensitivity.json").read_text())
    assert summary["rattlers"] == [128]
    assert summary["removed_modes"] == ["translation.x", "translation.y", "rattlers (1)"]
    assert any("1 rattler(s)" in warning for warning in summary["warnings"])
    stored = summary["hessian_spectrum"]
    assert stored["method"] == "dense" and stored["removed"] == 2 + 2  # translations, the rattler
    assert stored["lowest"] == result.spectrum.lowest and len(stored["lowest"]) == 4
    assert 0 < stored["lowest"][0] <= stored["lowest"][-1] < stored["largest"]
    assert stored["condition_number"] == pytest.approx(stored["largest"] / stored["lowest"][0])
    assert stored["negative"] is False and stored["extra_zero_modes"] == 0

    atoms = ase.io.read(run / "sensitivity.extxyz")
    assert atoms.arrays["rattler"].dtype == bool
    np.testing.assert_array_equal(atoms.arrays["rattler"], np.arange(129) == 128)
    column = atoms.arrays["dx_d_diameter_B"]
    assert np.all(column[128] == 0.0) and np.any(column[:128] != 0.0)


def test_lowest_mode_takes_any_callable():
    """A plain function (not a linearisation) works too: diag(1, ..., 40) has its lowest
    eigenpair (1, e₀) in closed form."""
    diagonal = jnp.arange(1.0, 41.0)
    mode = spectrum.lowest_mode(lambda v: diagonal * v, 40)
    assert mode.converged
    assert mode.value == pytest.approx(1.0, rel=1e-6)
    assert abs(mode.vector[0]) == pytest.approx(1.0, abs=1e-3)
