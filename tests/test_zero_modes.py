"""Rigid motions of free clusters: removed from every derivative, and the scaling symmetry of LJ.

The rigid translations and rotations are built here, independently of mdsens (NumPy, from the
positions), and every check is against them:

* the null space mdsens removes spans exactly the rigid motions;
* dx*/dθ has no component along them (forward mode), and reverse mode through
  ``relaxed_positions_fn`` gives the gradient of a non-invariant observable as the projected
  forward answer instead of the garbage of an inconsistent solve;
* single-species LJ without cutoff has x*(σ) = σ·x*(1) up to rigid motion, so
  dx*/dσ = (x* − centroid)/σ and dx*/dε = 0;
* a planar free cluster (pbc all False, z = 0) is a 3-D system: it stays planar, but out of the
  plane it is a saddle; the same cluster periodic in x and y is a 2-D system whose rotation is
  not a removed mode.
"""

from __future__ import annotations

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity, relaxed_positions_fn
from mdsens.system import load_system

FREE_LJ = [
    "potential.r_cutoff=inf",
    "minimizer.dt_start=0.005",
    "minimizer.dt_max=0.02",
    "minimizer.fmax=1e-12",
]
RIGID_MODES = ["translation.x", "translation.y", "translation.z", "rotation.x", "rotation.y", "rotation.z"]


def rigid_basis(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis (N·d × k) of rigid translations and rotations about the centroid (d = 2: 3
    motions; d = 3: 6)."""
    n, d = x.shape
    r = x - x.mean(axis=0)
    vectors = [np.tile(e, (n, 1)) for e in np.eye(d)]
    if d == 2:
        vectors.append(np.stack([-r[:, 1], r[:, 0]], axis=1))
    else:
        vectors += [np.cross(e, r) for e in np.eye(3)]
    q, r_factor = np.linalg.qr(np.stack([v.ravel() for v in vectors], axis=1))
    assert np.min(np.abs(np.diag(r_factor))) > 1e-3  # independent motions (not collinear)
    return q


def rigid_part(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    q = rigid_basis(x)
    return (q @ (q.T @ v.ravel())).reshape(v.shape)


PLANAR_SIGMA = 1.25


def planar_hexagon() -> np.ndarray:
    """Seven atoms at z = 0: a centred hexagon of side 2^(1/6) σ, in-plane jitter, away from 0."""
    angles = np.arange(6) * np.pi / 3
    positions = np.zeros((7, 3))
    positions[1:, 0], positions[1:, 1] = np.cos(angles), np.sin(angles)
    positions[:, :2] += np.random.default_rng(3).normal(scale=0.03, size=(7, 2))
    return positions * 2 ** (1 / 6) * PLANAR_SIGMA + [5.0, 5.0, 0.0]


def lj_first_derivative(r: np.ndarray, sigma: float, epsilon: float = 1.0) -> np.ndarray:
    return 4 * epsilon * (-12 * sigma**12 / r**13 + 6 * sigma**6 / r**7)


def _build(system):
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    sensitivity = Sensitivity(system).compute(relaxed, ["sigma.Ar", "epsilon.Ar"])
    return {"system": system, "relaxer": relaxer, "relaxed": relaxed, "sensitivity": sensitivity}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """``get(name)``: system, relaxer, relaxed state and sensitivity to σ and ε; cached.

    ``lj13``: the shipped recipe (fmax 1e-12); ``planar``: the hexagon, σ = 1.25, pbc False (a 3-D
    free system); ``planar-xy``: the hexagon in a 10 × 10 cell periodic in x and y (a 2-D system), cut off at
    3.5 σ.
    """
    cache: dict[str, dict] = {}
    base = tmp_path_factory.mktemp("clusters")

    def get(name: str) -> dict:
        if name in cache:
            return cache[name]
        if name == "lj13":
            system = load_system("lj-cluster", overrides=["minimizer.fmax=1e-12"])
        else:
            pbc = [True, True, False] if name == "planar-xy" else False
            cell = [10.0, 10.0, 0.0] if name == "planar-xy" else None
            path = base / f"{name}.traj"
            ase.io.write(path, ase.Atoms("Ar7", positions=planar_hexagon(), cell=cell, pbc=pbc))
            overrides = [f"potential.sigma={PLANAR_SIGMA}", "potential.epsilon=1.0", *FREE_LJ]
            if name == "planar-xy":
                # A periodic cell needs a range below half its width; every pair of the hexagon
                # (at most 2.4 σ apart) stays below r_onset, so the energy is the free cluster's.
                overrides += ["potential.r_onset=3.0", "potential.r_cutoff=3.5"]
            system = load_system(structure=path, potential="lennard_jones", overrides=overrides)
        cache[name] = _build(system)
        return cache[name]

    return get


FREE = ["lj13", "planar"]


@pytest.mark.parametrize("name", FREE)
def test_removed_null_space_is_exactly_the_rigid_motions(name, clusters):
    case = clusters(name)
    system, x = case["system"], case["relaxed"].positions
    assert system.space_kind == "free" and system.dimension == 3
    assert system.zero_modes == RIGID_MODES
    assert case["sensitivity"].removed_modes == RIGID_MODES
    nullspace = system.nullspace(jnp.asarray(x), system.params)
    assert not np.any(np.asarray(nullspace.mask))  # LJ has no rattlers
    q = np.asarray(nullspace.basis)
    expected = rigid_basis(x)
    np.testing.assert_allclose(q @ q.T, expected @ expected.T, atol=1e-12)


@pytest.mark.parametrize("name", FREE)
def test_sensitivity_has_no_rigid_component(name, clusters):
    case = clusters(name)
    x = case["relaxed"].positions
    dx = case["sensitivity"].parameters["sigma.Ar"].dx
    assert np.linalg.norm(dx) > 0.1
    assert np.linalg.norm(rigid_part(x, dx)) <= 1e-10 * np.linalg.norm(dx)


@pytest.mark.parametrize(("name", "sigma"), [("lj13", 1.0), ("planar", PLANAR_SIGMA)])
def test_lj_scaling_gives_dx_dsigma_and_zero_dx_depsilon(name, sigma, clusters):
    """E(x; σ, ε) = ε·e(x/σ) without cutoff: x*(σ) = σ·x*(1) up to rigid motion, so
    dx*/dσ = (x* − centroid)/σ, which is already orthogonal to every rigid motion; dx*/dε = 0.
    The energy at the minimum is independent of σ (dE*/dσ = 0) and linear in ε."""
    case = clusters(name)
    x = case["relaxed"].positions
    entries = case["sensitivity"].parameters
    assert entries["sigma.Ar"].value == sigma
    expected = (x - x.mean(axis=0)) / sigma
    dx = entries["sigma.Ar"].dx
    assert np.linalg.norm(dx - expected) <= 1e-9 * np.linalg.norm(expected)
    assert np.max(np.abs(entries["epsilon.Ar"].dx)) <= 1e-10
    assert abs(entries["sigma.Ar"].denergy) <= 1e-9
    assert entries["epsilon.Ar"].denergy == pytest.approx(case["relaxed"].energy, rel=1e-12)


def test_planar_free_cluster_is_a_3d_system_and_a_saddle_out_of_plane(clusters):
    """pbc = False everywhere: 3-D, whatever the z extent. Forces have no z component at z = 0,
    so the relaxation stays planar, but out of the plane the Hessian is the Laplacian with bond
    weights φ'(r)/r (negative for compressed bonds): the planar minimum is a 3-D saddle, and
    mdsens says so. dx*/dθ stays in the plane (the right-hand side has no z component)."""
    case = clusters("planar")
    x, result = case["relaxed"].positions, case["sensitivity"]
    assert np.all(x[:, 2] == 0.0)
    i, j = np.triu_indices(len(x), k=1)
    r = np.linalg.norm(x[i] - x[j], axis=1)
    laplacian = np.zeros((len(x), len(x)))
    for a, b, w in zip(i, j, lj_first_derivative(r, PLANAR_SIGMA) / r, strict=True):
        laplacian[[a, b], [a, b]] += w
        laplacian[[a, b], [b, a]] -= w
    eigenvalues = np.linalg.eigvalsh(laplacian)
    # Three zero modes (z translation, rotations about x and y); the other four are negative.
    zero = np.abs(eigenvalues) < 1e-9
    assert np.count_nonzero(zero) == 3
    out_of_plane = np.sort(eigenvalues[~zero])
    assert np.all(out_of_plane < -0.1)
    assert result.spectrum.negative
    np.testing.assert_allclose(result.spectrum.lowest[: len(out_of_plane)], out_of_plane, rtol=1e-8)
    assert any("saddle point" in w for w in result.warnings)
    dx = result.parameters["sigma.Ar"].dx
    for entry in result.parameters.values():  # round-off of the rotation basis only
        assert np.max(np.abs(entry.dx[:, 2])) <= 1e-15 * np.linalg.norm(dx)
    # In the plane: no component along the 2-D rigid motions (x, y, rotation about z) either.
    assert np.linalg.norm(rigid_part(x[:, :2], dx[:, :2])) <= 1e-10 * np.linalg.norm(dx)


def test_planar_cluster_periodic_in_xy_is_2d_with_rotation_not_removed(clusters):
    """pbc = (T, T, F) in the plane z = 0: a 2-D periodic system. Its zero modes are the two
    translations; the isolated cluster's rotation is a further zero mode, reported, not removed.
    CG from zero stays orthogonal to it (the right-hand side is), so dx*/dσ still has no
    rotation and equals the free planar cluster's."""
    flat, free = clusters("planar-xy"), clusters("planar")
    system = flat["system"]
    assert system.dimension == 2 and system.space_kind == "periodic"
    assert system.zero_modes == ["translation.x", "translation.y"]
    result = flat["sensitivity"]
    assert result.spectrum.extra_zero_modes == 1 and not result.spectrum.negative
    assert any("1 zero mode(s) beyond the removed ones" in w for w in result.warnings)
    assert flat["relaxed"].energy == pytest.approx(free["relaxed"].energy, rel=1e-12)
    x = flat["relaxed"].positions
    dx = result.parameters["sigma.Ar"].dx
    assert np.linalg.norm(rigid_part(x, dx)) <= 1e-10 * np.linalg.norm(dx)
    expected = (x - x.mean(axis=0)) / PLANAR_SIGMA
    np.testing.assert_allclose(dx, expected, rtol=0, atol=1e-9 * np.max(np.abs(dx)))


@pytest.mark.parametrize("name", ["lj13"])
def test_reverse_mode_of_a_non_invariant_observable_is_the_projected_forward_answer(name, clusters):
    """∇θ Σᵢ cᵢ·xᵢ*(θ) through relaxed_positions_fn, c with large rigid components.

    Only the part of dx*/dθ orthogonal to rigid motions is defined; the implicit derivative is
    that one, so the gradient is (P c)ᵀ dx*/dθ with P the projector off the rigid motions built
    here: finite, and equal to the forward-mode sensitivity contracted with c.
    """
    case = clusters(name)
    system, relaxed = case["system"], case["relaxed"]
    x = relaxed.positions
    c = np.random.default_rng(7).normal(size=x.shape) + np.array([0.5, -0.3, 0.2])
    c += 0.5 * np.cross([0.3, 1.0, -0.4], x - x.mean(axis=0))  # a rotation component too
    assert np.linalg.norm(rigid_part(x, c)) > 0.3 * np.linalg.norm(c)
    x_star = relaxed_positions_fn(system, case["relaxer"])
    x0 = jnp.asarray(x)
    np.testing.assert_allclose(np.asarray(x_star(system.params, x0)), x, atol=1e-12)

    grad = jax.grad(lambda p: jnp.sum(jnp.asarray(c) * x_star(p, x0)))(system.params)
    leaves = jax.tree_util.tree_leaves(grad)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
    dx = case["sensitivity"].parameters["sigma.Ar"].dx
    projected = float(np.sum((c - rigid_part(x, c)) * dx))
    assert float(grad["sigma"][0]) == pytest.approx(projected, rel=1e-10)
    assert abs(float(grad["epsilon"][0])) <= 1e-10 * np.linalg.norm(c)
    # One species: the Ar-Ar pair value is σ_Ar plus its pair offset, so the same gradient.
    assert float(grad["pair"]["sigma"][0, 0]) == pytest.approx(projected, rel=1e-10)
