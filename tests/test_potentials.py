"""Potentials against independent code, mixing rules by hand, and dx*/dθ against finite differences.

* Energies and forces equal ASE's own calculators (``LennardJones``, ``MorsePotential``) and
  hand-written NumPy pair sums (two species, mixing rules, pair overrides, Hertzian spheres).
* The Lennard-Jones switch is continuous with a continuous force at r_onset and r_cutoff.
* LJ13 relaxes to the Cambridge Cluster Database energy without a cutoff, and to another with one.
* dx*/dθ for every parameter of an LJ fcc crystal with a vacancy and of a 3-D soft-sphere
  packing agrees with central finite differences of warm-started relaxations; a pair parameter's
  derivative agrees with re-relaxing with the pair overridden at its mixed value ± h.
"""

from __future__ import annotations

import math
from pathlib import Path

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.lj import LennardJones
from ase.calculators.morse import MorsePotential

from mdsens.parameters import parameter_names, unit_tangent
from mdsens.potentials import POTENTIALS
from mdsens.references import central_difference, relative_error
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity
from mdsens.system import load_system

DOCS = Path(__file__).parents[1] / "docs"
LJ13_FILE = Path(__file__).parents[1] / "systems" / "lj13-cluster.xyz"
LJ13_MINIMUM = -44.326801  # Cambridge Cluster Database, LJ13 (untruncated potential), units of ε
FD_STEPS = (3e-5, 1e-5, 3e-6)  # central differences at each; the best is compared


def random_cluster(n: int, seed: int, spacing: float = 1.2) -> np.ndarray:
    """``n`` points on a jittered cubic grid of the given spacing: no two closer than ~0.7 spacing."""
    rng = np.random.default_rng(seed)
    side = math.ceil(n ** (1 / 3))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = grid[rng.choice(len(grid), n, replace=False)] * spacing
    return sites + rng.uniform(-0.15, 0.15, size=sites.shape) * spacing


def write(path: Path, atoms: ase.Atoms) -> Path:
    """ASE's trajectory format: float64 positions, no rounding."""
    ase.io.write(path, atoms, format="traj")
    return path


def energy_and_forces(system, positions=None):
    x = jnp.asarray(system.positions if positions is None else positions)
    return float(system.energy_fn(x, system.params)), np.asarray(system.force_fn(x, system.params))


def pair_distances(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(x), k=1)
    return i, j, np.linalg.norm(x[i] - x[j], axis=1)


# --- against ASE's calculators --------------------------------------------------------------------


def test_lennard_jones_matches_ase(tmp_path):
    sigma, epsilon = 1.3, 0.7
    atoms = ase.Atoms("Ar13", positions=random_cluster(13, seed=0, spacing=1.3 * sigma))
    system = load_system(
        structure=write(tmp_path / "cluster.traj", atoms),
        potential="lennard_jones",
        overrides=[f"species.Ar.sigma={sigma}", f"species.Ar.epsilon={epsilon}", "potential.r_cutoff=inf"],
    )
    assert system.space_kind == "free"
    energy, forces = energy_and_forces(system)
    # smooth=False shifts each pair by φ(rc): 4ε(σ/rc)^6 ~ 1e-18 at rc = 1000, far below 1e-10.
    atoms.calc = LennardJones(sigma=sigma, epsilon=epsilon, rc=1000.0, smooth=False)
    reference = atoms.get_potential_energy()
    assert energy == pytest.approx(reference, rel=1e-10)
    ase_forces = atoms.get_forces()
    assert np.max(np.abs(forces - ase_forces)) <= 1e-10 * np.max(np.abs(ase_forces))


def test_morse_matches_ase_with_alpha_rho0_over_r0(tmp_path):
    """ASE's V = ε(e^{−2ρ₀(r/r₀ − 1)} − 2e^{−ρ₀(r/r₀ − 1)}) is mdsens's ε[(1 − e^{−α(r − σ)})² − 1]
    with σ = r₀ and α = ρ₀/r₀."""
    r0, epsilon, rho0 = 1.2, 0.8, 4.5
    atoms = ase.Atoms("Cu13", positions=random_cluster(13, seed=1, spacing=1.1 * r0))
    system = load_system(
        structure=write(tmp_path / "cluster.traj", atoms),
        potential="morse",
        overrides=[
            f"potential.sigma={r0}",
            f"potential.epsilon={epsilon}",
            f"potential.alpha={rho0 / r0!r}",
            "potential.r_cutoff=inf",
        ],
    )
    energy, forces = energy_and_forces(system)
    # ASE's smooth cutoff starts at rcut1·r0: far beyond every pair here.
    atoms.calc = MorsePotential(epsilon=epsilon, r0=r0, rho0=rho0, rcut1=1000.0, rcut2=1001.0)
    reference = atoms.get_potential_energy()
    assert energy == pytest.approx(reference, rel=1e-10)
    ase_forces = atoms.get_forces()
    assert np.max(np.abs(forces - ase_forces)) <= 1e-10 * np.max(np.abs(ase_forces))
    # The convention matters: ρ₀ taken for mdsens's α is another energy altogether.
    wrong = {**system.params, "alpha": jnp.asarray(rho0)}
    assert abs(float(system.energy_fn(jnp.asarray(atoms.positions), wrong)) - reference) > 0.1 * abs(
        reference
    )


# --- mixing rules and pair overrides by hand ---------------------------------------------------------

SIGMA = {"Ar": 1.0, "Kr": 1.12}
EPSILON = {"Ar": 1.0, "Kr": 1.4}


def binary_lj_overrides(pairs: tuple[str, ...] = ()) -> list[str]:
    out = ["potential.r_cutoff=inf", "minimizer.dt_start=0.005", "minimizer.dt_max=0.02"]
    for s in SIGMA:
        out += [f"species.{s}.sigma={SIGMA[s]}", f"species.{s}.epsilon={EPSILON[s]}"]
    return out + list(pairs)


def hand_lj_energy(x: np.ndarray, symbols: list[str], sigma_ab: float, epsilon_ab: float) -> float:
    """Σ_{i<j} 4ε_ij[(σ_ij/r)^12 − (σ_ij/r)^6] with the unlike pair's values given."""
    total = 0.0
    for i, j, r in zip(*pair_distances(x), strict=True):
        a, b = symbols[i], symbols[j]
        sigma = SIGMA[a] if a == b else sigma_ab
        epsilon = EPSILON[a] if a == b else epsilon_ab
        total += 4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6)
    return total


@pytest.fixture(scope="module")
def binary_cluster_file(tmp_path_factory) -> Path:
    """The shipped LJ13 start with four atoms made Kr (the centre among them)."""
    atoms = ase.io.read(LJ13_FILE)
    symbols = atoms.get_chemical_symbols()
    for i in (0, 2, 7, 11):
        symbols[i] = "Kr"
    atoms.set_chemical_symbols(symbols)
    return write(tmp_path_factory.mktemp("binary") / "ArKr13.traj", atoms)


@pytest.mark.parametrize(
    ("pairs", "sigma_ab", "epsilon_ab"),
    [
        ((), (1.0 + 1.12) / 2, math.sqrt(1.0 * 1.4)),  # Lorentz–Berthelot
        (("pairs.Ar-Kr.sigma=1.2",), 1.2, math.sqrt(1.0 * 1.4)),
        (("pairs.Kr-Ar.epsilon=0.5",), (1.0 + 1.12) / 2, 0.5),
    ],
    ids=["mixed", "sigma-overridden", "epsilon-overridden"],
)
def test_lennard_jones_mixing_and_overrides_by_hand(pairs, sigma_ab, epsilon_ab, binary_cluster_file):
    system = load_system(
        structure=binary_cluster_file, potential="lennard_jones", overrides=binary_lj_overrides(pairs)
    )
    assert system.species == ("Kr", "Ar")
    kr, ar = 0, 1
    tables = {k: np.asarray(v) for k, v in system.pair_values().items()}
    expected_sigma = [[SIGMA["Kr"], sigma_ab], [sigma_ab, SIGMA["Ar"]]]
    expected_epsilon = [[EPSILON["Kr"], epsilon_ab], [epsilon_ab, EPSILON["Ar"]]]
    np.testing.assert_allclose(tables["sigma"], expected_sigma, rtol=1e-15)
    np.testing.assert_allclose(tables["epsilon"], expected_epsilon, rtol=1e-15)
    assert tables["sigma"][kr, ar] == tables["sigma"][ar, kr]
    energy, _ = energy_and_forces(system)
    symbols = system.atoms.get_chemical_symbols()
    assert energy == pytest.approx(hand_lj_energy(system.positions, symbols, sigma_ab, epsilon_ab), rel=1e-12)
    overridden = [n for n in parameter_names(system) if "-" in n]
    assert overridden == [f"{p.split('.')[2].split('=')[0]}.Kr-Ar" for p in pairs]


def hand_soft_sphere(x, box, diameters, epsilon, alpha):
    """Energy Σ_{i<j} ε/α (1 − r/σ_ij)^α (r < σ_ij, σ_ij = (d_i + d_j)/2, minimum image) and the
    forces −∂E/∂x_i = Σ_j ε/σ_ij (1 − r/σ_ij)^(α−1) (x_i − x_j)/r, in NumPy."""
    d = x[:, None, :] - x[None, :, :]
    d -= box * np.round(d / box)
    r = np.linalg.norm(d, axis=-1)
    np.fill_diagonal(r, np.inf)
    sigma = (diameters[:, None] + diameters[None, :]) / 2
    overlap = np.clip(1 - r / sigma, 0, None)
    energy = 0.5 * np.sum(epsilon / alpha * overlap**alpha)
    forces = np.sum((epsilon * overlap ** (alpha - 1) / sigma / r)[:, :, None] * d, axis=1)
    return energy, forces, np.count_nonzero(overlap) // 2


def test_soft_sphere_additive_diameters_and_hertzian_packing(tmp_path):
    """σ_AB = (d_A + d_B)/2; U = ε/α (1 − r/σ)^α for r < σ with the Hertzian α = 2.5: the energy
    and forces of a random start, and the relaxed packing, force-free by the hand-written forces."""
    box = np.array([4.0, 4.2, 4.4])  # wider than 2σ_max: one image per pair
    positions = np.random.default_rng(4).uniform(0, 1, size=(64, 3)) * box
    symbols = ["Ni"] * 40 + ["Cu"] * 24
    atoms = ase.Atoms(symbols, positions=positions, cell=box, pbc=True)
    system = load_system(
        structure=write(tmp_path / "spheres.traj", atoms),
        potential="soft_sphere",
        overrides=[
            "species.Ni.diameter=1.0",
            "species.Cu.diameter=1.4",
            "potential.alpha=2.5",
            "potential.epsilon=0.3",
        ],
    )
    assert system.space_kind == "periodic"
    np.testing.assert_allclose(
        np.asarray(system.pair_values()["diameter"]), [[1.0, 1.2], [1.2, 1.4]], rtol=1e-15
    )
    diameters = np.where(np.array(symbols) == "Ni", 1.0, 1.4)
    energy, forces = energy_and_forces(system)
    expected_energy, expected_forces, overlapping = hand_soft_sphere(positions, box, diameters, 0.3, 2.5)
    assert overlapping > 64
    assert energy == pytest.approx(expected_energy, rel=1e-12)
    assert np.max(np.abs(forces - expected_forces)) <= 1e-12 * np.max(np.abs(expected_forces))

    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    x = np.mod(relaxed.positions, box)
    energy, forces, overlapping = hand_soft_sphere(x, box, diameters, 0.3, 2.5)
    assert overlapping > 64  # still a packing, not a gas
    assert relaxed.energy == pytest.approx(energy, rel=1e-12)
    assert relaxed.energy < 0.1 * expected_energy
    assert np.max(np.linalg.norm(forces, axis=1)) < 1e-11


# --- the Lennard-Jones switch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lj13_default_cutoff():
    """The LJ13 start read as a plain structure file: no cutoff given, so the defaults apply."""
    return load_system(
        structure=LJ13_FILE,
        potential="lennard_jones",
        overrides=[
            "potential.sigma=1.0",
            "potential.epsilon=1.0",
            "minimizer.dt_start=0.005",
            "minimizer.dt_max=0.02",
        ],
    )


@pytest.fixture(scope="module")
def dimer(lj13_default_cutoff):
    """E(r), dE/dr and d²E/dr² of one pair at σ = 1.1, ε = 0.9 (parameters given at call time),
    through the 13-atom system's energy: the other eleven atoms are 10 apart, beyond every cutoff."""
    system = lj13_default_cutoff
    params = {**system.params, "sigma": jnp.asarray([1.1]), "epsilon": jnp.asarray([0.9])}
    far = np.zeros((11, 3))
    far[:, 1] = 10.0 * np.arange(1, 12)

    def energy(r):
        x = jnp.concatenate([jnp.zeros((1, 3)), jnp.stack([r, 0.0, 0.0])[None], jnp.asarray(far)])
        return system.energy_fn(x, params)

    first = jax.grad(energy)
    return system, jax.jit(jax.vmap(energy)), jax.jit(jax.vmap(first)), jax.jit(jax.vmap(jax.grad(first)))


def test_switch_defaults_and_shape(dimer):
    system, energy, _, _ = dimer
    settings = system.recipe["potential"]
    assert (settings["r_onset"], settings["r_cutoff"]) == (2.0, 2.5)  # the documented defaults
    sigma, epsilon = 1.1, 0.9
    r_on, r_cut = 2.0 * sigma, 2.5 * sigma
    r = np.array(
        [1.0, 1.3, 2.0, r_on - 1e-9, r_on + 1e-9, 2.4, 2.6, r_cut - 1e-3, r_cut, r_cut + 1e-9, 4.0, 9.0]
    )
    lj = 4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6)
    # HOOMD-blue's XPLOR switch, written out independently. (Closer to r_cut than 1e-3 the
    # difference r_cut² − r² cancels: an ulp of r is a relative 1e-7 of the switch there.)
    switch = (r_cut**2 - r**2) ** 2 * (r_cut**2 + 2 * r**2 - 3 * r_on**2) / (r_cut**2 - r_on**2) ** 3
    switch = np.where(r < r_on, 1.0, np.where(r < r_cut, switch, 0.0))
    np.testing.assert_allclose(np.asarray(energy(jnp.asarray(r))), lj * switch, rtol=1e-12, atol=1e-300)
    assert np.all(np.asarray(energy(jnp.asarray(r[r >= r_cut]))) == 0.0)


@pytest.mark.parametrize("where", ["r_onset", "r_cutoff"])
def test_switch_is_continuous_with_continuous_force(where, dimer):
    """Across r₀ = r_onset·σ or r_cutoff·σ, E and E' = dE/dr change by no more than their slopes
    allow (mean value theorem): |E(r₀ + δ) − E(r₀ − δ)| ≤ 2δ·max|E'| and likewise E' with E''.
    A jump J in either would leave a difference ≈ J however small δ is."""
    system, energy, first, second = dimer
    r0 = system.recipe["potential"][where] * 1.1
    for delta in (1e-4, 1e-6, 1e-8):
        r = jnp.asarray([r0 - delta, r0 + delta])
        e, f, g = (np.asarray(fn(r)) for fn in (energy, first, second))
        assert abs(e[1] - e[0]) <= 1.5 * 2 * delta * np.max(np.abs(f)) + 1e-15
        assert abs(f[1] - f[0]) <= 1.5 * 2 * delta * np.max(np.abs(g)) + 1e-13
        if where == "r_onset":
            assert abs(f[0]) > 1e-3  # a real force to be continuous across
        else:
            assert abs(f[0]) <= 1.5 * delta * np.max(np.abs(g))  # the force goes to 0 at r_cutoff
    if where == "r_cutoff":  # beyond it the pair is gone: no energy, no force
        beyond = jnp.asarray([r0, r0 + 1e-12, r0 + 0.3])
        assert np.all(np.asarray(energy(beyond)) == 0.0) and np.all(np.asarray(first(beyond)) == 0.0)


# --- LJ13: the Cambridge Cluster Database minimum, with and without the cutoff -----------------------


@pytest.fixture(scope="module")
def lj13():
    system = load_system("lj-cluster")
    result = Relaxer(system).relax()
    result.require_converged()
    return system, result


def test_lj13_relaxes_to_the_icosahedron(lj13):
    system, result = lj13
    assert system.recipe["potential"]["r_cutoff"] == math.inf
    assert result.initial_energy > LJ13_MINIMUM + 1.0  # a perturbed start
    assert result.max_force <= 1e-10
    assert abs(result.energy - LJ13_MINIMUM) <= 1e-6
    # Independently: ASE's LJ at the relaxed positions; twelve atoms equidistant from the centre one.
    atoms = ase.Atoms("Ar13", positions=result.positions)
    atoms.calc = LennardJones(sigma=1.0, epsilon=1.0, rc=1000.0, smooth=False)
    assert abs(atoms.get_potential_energy() - LJ13_MINIMUM) <= 1e-6
    centre = np.argmin(np.linalg.norm(result.positions - result.positions.mean(axis=0), axis=1))
    shell = np.delete(np.linalg.norm(result.positions - result.positions[centre], axis=1), centre)
    assert np.ptp(shell) < 1e-8


def test_lj13_with_the_default_cutoff_is_another_energy(lj13, lj13_default_cutoff):
    system, result = lj13
    cut = lj13_default_cutoff
    assert cut.recipe["potential"]["r_cutoff"] == 2.5
    assert cut.recipe["potential"]["r_onset"] == 2.0
    cut_result = Relaxer(cut).relax(x0=result.positions)
    cut_result.require_converged()
    # Hand-computed LJ × XPLOR switch at the relaxed state, independent of mdsens.
    i, j, r = pair_distances(cut_result.positions)
    switch = (6.25 - r**2) ** 2 * (6.25 + 2 * r**2 - 12.0) / (6.25 - 4.0) ** 3
    switch = np.where(r < 2.0, 1.0, np.where(r < 2.5, switch, 0.0))
    assert cut_result.energy == pytest.approx(np.sum(4 * (r**-12 - r**-6) * switch), rel=1e-12)
    assert cut_result.energy - LJ13_MINIMUM > 1e-2
    # The cutoff is a setting of the potential, with its default documented.
    assert POTENTIALS["lennard_jones"].settings["r_cutoff"] == 2.5
    assert "r_cutoff" in POTENTIALS["lennard_jones"].doc
    docs = (DOCS / "potentials.md").read_text()
    assert "`r_cutoff` = 2.5" in docs and "r_cutoff = inf" in docs


# --- dx*/dθ against central finite differences ------------------------------------------------------


def fd_by_parameter(relaxer, relaxed, name: str, h: float):
    """Central difference in the scalar parameter ``name``, warm-started from x*; converged."""
    system = relaxer.system
    fd = central_difference(relaxer, relaxed.positions, system.params, unit_tangent(system, name), h)
    fd.plus.require_converged()
    fd.minus.require_converged()
    return fd


def report(label: str, errors: list[float], kind: str = "relative FD error") -> None:
    """Print the errors at every step (shown with ``pytest -s``)."""
    steps = ", ".join(f"{h:g}" for h in FD_STEPS)
    print(f"\n{label}: {kind} at h = {steps}: {', '.join(f'{e:.2e}' for e in errors)}")


FD_SYSTEMS = {
    # 107 atoms; FD needs the states relaxed well below the FD signal: fmax 1e-12.
    "lj-fcc-vacancy": (
        ["lattice.repeat=[3,3,3]", "potential.r_cutoff=2.3", "minimizer.fmax=1e-12"],
        ["sigma.Ar", "epsilon.Ar"],
    ),
    # 64 spheres; soft modes make x* only fmax/λ_min accurate: relax to 1e-14 (round-off ~1e-17).
    "soft-sphere-3d": (
        ["n_particles=64", "minimizer.fmax=1e-14"],
        ["diameter.A", "diameter.B", "epsilon", "alpha"],
    ),
}
FD_CASES = [(name, parameter) for name, (_, parameters) in FD_SYSTEMS.items() for parameter in parameters]


@pytest.fixture(scope="module")
def fd_systems():
    """``get(name)``: system, relaxer, relaxed state, sensitivities, rattlers, contact counts; cached."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            overrides, expected = FD_SYSTEMS[name]
            system = load_system(name, overrides=overrides)
            relaxer = Relaxer(system)
            relaxed = relaxer.relax()
            relaxed.require_converged()
            assert parameter_names(system) == expected  # every parameter is covered below
            sensitivity = Sensitivity(system).compute(relaxed, expected, spectrum=False)
            x = jnp.asarray(relaxed.positions)
            rattlers = np.asarray(system.rattlers(x, system.params))
            contacts = np.asarray(system.contact_numbers(x, system.params))
            cache[name] = (system, relaxer, relaxed, sensitivity, rattlers, contacts)
        return cache[name]

    return get


@pytest.mark.parametrize(("name", "parameter"), FD_CASES)
def test_dx_matches_central_differences(name, parameter, fd_systems):
    """‖dx* − FD‖/‖FD‖ ≤ 1e-5 for every parameter, the best of the steps in FD_STEPS.

    The FD has the null space mdsens removes projected out (translation of the particles that
    are not rattlers, and the rattlers); rattlers are particles without contacts here, which the
    FD relaxations leave in place and mdsens masks to 0. ε is an energy scale, E(x; ε) = ε·E₁(x),
    so ∇E = 0 at the same x* for every ε and dx*/dε is exactly 0 (the implicit right-hand side
    −∂F/∂ε = −F(x*)/ε is below fmax, so CG stops at once, and the warm-started FD relaxations do
    not move): a relative error is meaningless there, and both must vanish to an absolute 1e-10.
    """
    _, relaxer, relaxed, sensitivity, rattlers, contacts = fd_systems(name)
    entry = sensitivity.parameters[parameter]
    assert entry.converged
    dx = entry.dx
    assert np.all(contacts[rattlers] == 0)
    assert np.all(dx[rattlers] == 0.0)

    errors = []
    for h in FD_STEPS:
        fd = fd_by_parameter(relaxer, relaxed, parameter, h)
        assert np.max(np.abs(fd.raw_dx[rattlers]), initial=0.0) < 1e-12  # nothing pushes a rattler
        np.testing.assert_array_equal(fd.dx[rattlers], 0.0)
        if parameter.startswith("epsilon"):
            errors.append(float(np.max(np.abs(fd.dx))))
        else:
            errors.append(relative_error(dx, fd.dx))
    kind = "max|FD|" if parameter.startswith("epsilon") else "relative FD error"
    report(f"{name} {parameter}", errors, kind)
    if parameter.startswith("epsilon"):
        assert np.max(np.abs(dx)) <= 1e-10
        assert max(errors) <= 1e-10
    else:
        assert np.linalg.norm(dx) > 1e-2
        assert min(errors) <= 1e-5


@pytest.fixture(scope="module")
def binary_cluster(binary_cluster_file):
    """The binary LJ13 relaxed to fmax 1e-12, with its sensitivity to the unlike pair values."""
    system = load_system(
        structure=binary_cluster_file,
        potential="lennard_jones",
        overrides=binary_lj_overrides(("minimizer.fmax=1e-12",)),
    )
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    names = [f"{p}.{s}" for p in ("sigma", "epsilon") for s in ("Kr", "Ar", "Kr-Ar", "Kr-Kr", "Ar-Ar")]
    sensitivity = Sensitivity(system).compute(relaxed, names, spectrum=False)
    return system, relaxed, sensitivity


@pytest.mark.parametrize("parameter", ["sigma", "epsilon"])
def test_unlike_pair_derivative_matches_fd_of_the_overridden_pair(
    parameter, binary_cluster, binary_cluster_file
):
    """d/d(sigma.Ar-Kr) of the mixed pair = FD of systems with pairs.Ar-Kr.sigma = mixed ± h."""
    system, relaxed, sensitivity = binary_cluster
    name = f"{parameter}.Kr-Ar"
    mixed = sensitivity.parameters[name].value
    expected_mixed = (
        (SIGMA["Ar"] + SIGMA["Kr"]) / 2 if parameter == "sigma" else math.sqrt(EPSILON["Ar"] * EPSILON["Kr"])
    )
    assert mixed == pytest.approx(expected_mixed, rel=1e-15)
    dx = sensitivity.parameters[name].dx

    def overridden(value):
        return load_system(
            structure=binary_cluster_file,
            potential="lennard_jones",
            overrides=binary_lj_overrides(("minimizer.fmax=1e-12", f"pairs.Ar-Kr.{parameter}={value!r}")),
        )

    at_mixed = overridden(mixed)
    x = jnp.asarray(relaxed.positions)
    assert float(at_mixed.energy_fn(x, at_mixed.params)) == pytest.approx(relaxed.energy, rel=1e-14)
    # Every overridden system compiles the same energy (same mask): one relaxer serves them all.
    relaxer = Relaxer(at_mixed)
    errors = []
    for h in FD_STEPS:
        plus, minus = overridden(mixed + h), overridden(mixed - h)
        assert parameter_names(plus) == parameter_names(at_mixed)
        assert float(plus.pair_values()[parameter][0, 1]) == mixed + h
        # θ ± h t with t the difference of the two overridden systems' parameters over 2h.
        tangent = jax.tree_util.tree_map(lambda p, m, h=h: (p - m) / (2 * h), plus.params, minus.params)
        fd = central_difference(relaxer, relaxed.positions, at_mixed.params, tangent, h)
        fd.plus.require_converged()
        fd.minus.require_converged()
        errors.append(relative_error(dx, fd.dx))
    report(f"binary LJ13 {name} = {mixed:.6g}", errors)
    assert np.linalg.norm(dx) > 1e-2
    assert min(errors) <= 1e-5


def test_species_derivative_is_the_chain_rule_of_the_mixing_rules(binary_cluster):
    """σ_A enters σ_AA (∂ = 1) and σ_AB (∂ = ½); ε_A enters ε_AA (1) and ε_AB (½ √(ε_B/ε_A))."""
    _, _, sensitivity = binary_cluster
    dx = {name: entry.dx for name, entry in sensitivity.parameters.items()}
    for a, b in (("Ar", "Kr"), ("Kr", "Ar")):
        pair = "Kr-Ar"
        chain = dx[f"sigma.{a}-{a}"] + 0.5 * dx[f"sigma.{pair}"]
        assert relative_error(dx[f"sigma.{a}"], chain) < 1e-9
        chain = dx[f"epsilon.{a}-{a}"] + 0.5 * math.sqrt(EPSILON[b] / EPSILON[a]) * dx[f"epsilon.{pair}"]
        assert relative_error(dx[f"epsilon.{a}"], chain) < 1e-9
    # Two species with different ε: unlike ε_A does move the minimum (unlike a single species).
    assert np.linalg.norm(dx["epsilon.Ar"]) > 1e-3
