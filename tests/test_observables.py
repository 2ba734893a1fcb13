"""Observables and their total derivatives dq/dθ (mdsens.observables, mdsens.observable_gradients)
against references that share no code with the adjoint solve:

* dP*/dθ of the default 2-D packing and of a 64-particle 3-D packing against central finite
  differences of the pressure of re-relaxed states (warm-started FIRE at θ ± h). Steps h that
  change a contact measure a jump, not a derivative, and are skipped, as ``mdsens check`` does;
  the others agree to ~3e-8 (2-D, h = 1e-5) and ~6e-8 (3-D);
* the stress tensor at zero strain against the derivative of the energy of systems built at a
  stretched box (positions stretched with it): σ_aa = (1/V) ∂E/∂ε_aa, and the pressure
  P = −dE/dV > 0 of a compressed packing;
* reverse (adjoint) and forward mode give the same gradients;
* with per-particle diameters, the gradient by all N from one adjoint solve against forward-mode
  sensitivities of 5 random particles' own diameters, and its sums per species against the
  species' gradients.

The packing is the session's relaxed one (tests/conftest.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import implicit
from mdsens.errors import UserError
from mdsens.observable_gradients import choose_mode, observable_gradients
from mdsens.observables import parse_observable, stress_tensor
from mdsens.parameters import (
    expand_parameters,
    parameter_names,
    per_particle_keys,
    per_particle_name,
    unit_tangent,
    with_per_particle,
)
from mdsens.potentials import ATOM
from mdsens.references import central_difference, relative_error, shifted
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import linear_solve_from_recipe, optimality_fn
from mdsens.system import System, load_system

# Central-difference steps: 1e-4 changes a contact of the packing (see tests/conftest.py).
STEPS = (1e-4, 1e-5, 1e-6)
FD_TOLERANCE = 1e-6


def contacting_pair(system: System, x: np.ndarray, rattlers: np.ndarray) -> tuple[int, int]:
    """The first pair (i < j) of non-rattlers that overlap: r_ij < (d_i + d_j) / 2."""
    box = system.box
    diameters = np.asarray(system.params["diameter"])[system.types]
    for i in range(system.n_particles):
        delta = x[i + 1 :] - x[i]
        delta -= box * np.round(delta / box)
        overlap = np.linalg.norm(delta, axis=1) < (diameters[i] + diameters[i + 1 :]) / 2
        for j in i + 1 + np.flatnonzero(overlap):
            if not (rattlers[i] or rattlers[j]):
                return i, int(j)
    raise AssertionError("no contact between non-rattlers")


@pytest.fixture(scope="module")
def packing_rattlers(packing_system, packing_relaxed) -> np.ndarray:
    return np.asarray(jax.jit(packing_system.rattlers)(packing_relaxed.positions, packing_system.params))


@pytest.fixture(scope="module")
def packing_observables(packing_system, packing_relaxed, packing_rattlers):
    """Pressure, a shear stress, and the distance and gap of a contacting pair."""
    i, j = contacting_pair(packing_system, packing_relaxed.positions, packing_rattlers)
    specs = ["pressure", "stress:xy", f"distance:{i},{j}", f"gap:{i},{j}"]
    return [parse_observable(packing_system, spec) for spec in specs]


@pytest.fixture(scope="module")
def packing_reverse(packing_system, packing_relaxed, packing_observables):
    """Every packing observable differentiated by every parameter in reverse mode."""
    names = expand_parameters(packing_system, parameter_names(packing_system))
    return observable_gradients(
        packing_system,
        packing_relaxed.positions,
        packing_system.params,
        packing_observables,
        names,
        mode="reverse",
    )


def pressure_differences(relaxer: Relaxer, x_star, params, names, gradient) -> dict[str, float]:
    """The relative error of dP*/dθ against central differences of the re-relaxed pressure, for each
    parameter: the smallest over the steps that change no contact and whose relaxations converged."""
    system = relaxer.system
    pressure = jax.jit(parse_observable(system, "pressure").fn)
    errors = {}
    for name in names:
        tangent = unit_tangent(system, name)
        trusted = []
        for h in STEPS:
            fd = central_difference(relaxer, x_star, params, tangent, h)
            if not fd.converged or fd.crossed:
                continue
            plus = float(pressure(fd.plus.positions, shifted(params, tangent, h)))
            minus = float(pressure(fd.minus.positions, shifted(params, tangent, -h)))
            trusted.append(relative_error(gradient[name], (plus - minus) / (2 * h)))
        assert trusted, f"every step changed a contact for {name}"
        errors[name] = min(trusted)
    return errors


def test_pressure_gradient_of_the_packing_matches_finite_differences(
    packing_system, packing_relaxer, packing_relaxed, packing_reverse
):
    entry = packing_reverse.observables["pressure"]
    assert entry.value > 0  # a jammed packing pushes on its walls
    assert entry.converged and entry.iterations > 0
    names = list(entry.gradient)
    errors = pressure_differences(
        packing_relaxer, packing_relaxed.positions, packing_system.params, names, entry.gradient
    )
    assert max(errors.values()) <= FD_TOLERANCE, errors


def test_pressure_gradient_of_a_3d_packing_matches_finite_differences():
    system = load_system("soft-sphere-3d", overrides=["n_particles=64"])
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    names = expand_parameters(system, parameter_names(system))
    result = observable_gradients(
        system, relaxed.positions, system.params, [parse_observable(system, "pressure")], names
    )
    assert result.mode == "reverse" and result.solves == 1  # one adjoint solve beats four forward ones
    gradient = result.observables["pressure"].gradient
    errors = pressure_differences(relaxer, relaxed.positions, system.params, names, gradient)
    assert max(errors.values()) <= FD_TOLERANCE, errors


def soft_sphere_energy(x: np.ndarray, box: np.ndarray, system: System) -> float:
    """Σ_{i<j} ε/α (1 − r_ij/σ_ij)^α over overlapping pairs, minimum image in the periodic box
    ``box``: the packing's energy in plain NumPy, sharing no code with mdsens."""
    params = system.params
    diameters = np.asarray(params["diameter"])[system.types]
    epsilon, alpha = float(params["epsilon"]), float(params["alpha"])
    total = 0.0
    for i in range(len(x) - 1):
        delta = x[i + 1 :] - x[i]
        delta -= box * np.round(delta / box)
        u = 1.0 - np.linalg.norm(delta, axis=1) / ((diameters[i] + diameters[i + 1 :]) / 2)
        total += float(np.sum(epsilon / alpha * np.clip(u, 0.0, None) ** alpha))
    return total


def test_stress_tensor_is_the_energy_derivative_under_box_stretching(packing_system, packing_relaxed):
    x, params = np.asarray(packing_relaxed.positions), packing_system.params
    box = packing_system.box
    assert soft_sphere_energy(x, box, packing_system) == pytest.approx(packing_relaxed.energy, rel=1e-12)

    def stretched(stretch) -> float:
        """E after stretching box and positions by (1 + stretch) along each axis."""
        factor = 1.0 + np.asarray(stretch, dtype=np.float64)
        return soft_sphere_energy(x * factor, box * factor, packing_system)

    volume = float(np.prod(box))
    sigma = np.asarray(jax.jit(lambda x, p: stress_tensor(packing_system, x, p))(x, params))
    s = 1e-6
    for axis in range(2):
        e = np.eye(2)[axis] * s
        assert sigma[axis, axis] == pytest.approx((stretched(e) - stretched(-e)) / (2 * s) / volume, rel=1e-8)
    # Isotropic stretching: V(s) = V (1 + s)^2, so dE/dV = (dE/ds) / (2V) and P = −dE/dV.
    pressure = -(stretched([s, s]) - stretched([-s, -s])) / (2 * s) / (2 * volume)
    observed = float(jax.jit(parse_observable(packing_system, "pressure").fn)(x, params))
    assert pressure > 0  # compressed: the energy falls as the box grows
    assert observed == pytest.approx(pressure, rel=1e-8)
    assert observed == pytest.approx(-np.trace(sigma) / 2, rel=1e-12)
    assert sigma[0, 1] == sigma[1, 0]


def test_reverse_and_forward_modes_agree(
    packing_system, packing_relaxed, packing_sensitivity, packing_observables, packing_reverse
):
    names = list(packing_sensitivity.parameters)
    dx = {name: entry.dx for name, entry in packing_sensitivity.parameters.items()}
    observables = packing_observables
    forward = observable_gradients(
        packing_system,
        packing_relaxed.positions,
        packing_system.params,
        observables,
        names,
        dx=dx,
        mode="auto",
    )
    # The sensitivities are solved: forward mode costs nothing, and auto takes it.
    assert forward.mode == "forward" and forward.solves == 0
    assert "forward mode, the fewer solves" in forward.reason
    assert packing_reverse.mode == "reverse" and packing_reverse.solves == len(observables)
    assert "as asked" in packing_reverse.reason
    for name, reverse in packing_reverse.observables.items():
        entry = forward.observables[name]
        assert entry.value == reverse.value
        scale = max(abs(v) for v in reverse.gradient.values())
        for parameter, value in reverse.gradient.items():
            assert abs(entry.gradient[parameter] - value) <= 1e-9 * scale, (name, parameter)
    # Gap and distance differ by the contact distance σ_ij = (d_i + d_j) / 2 alone.
    distance, gap = (packing_reverse.observables[n] for n in list(packing_reverse.observables)[2:])
    i, j = (int(v) for v in distance.name.partition(":")[2].split(","))
    for parameter, value in distance.gradient.items():
        key, _, species = parameter.partition(".")
        moved = sum(
            key == "diameter" and packing_system.species[packing_system.types[k]] == species for k in (i, j)
        )
        assert gap.gradient[parameter] == pytest.approx(value - moved / 2, abs=1e-9), parameter


def test_per_particle_gradient_matches_forward_sensitivities_of_single_particles(
    packing_system, packing_relaxed, packing_reverse
):
    system, x = packing_system, jnp.asarray(packing_relaxed.positions)
    names = list(packing_reverse.observables["pressure"].gradient)
    params = with_per_particle(system, system.params, per_particle_keys(system, ["diameter"]))
    pressure = parse_observable(system, "pressure")
    result = observable_gradients(system, x, params, [pressure], names)
    assert result.mode == "reverse" and result.solves == 1  # against N forward solves
    entry = result.observables["pressure"]
    by_particle = entry.per_particle["diameter"]
    assert by_particle.shape == (system.n_particles,)

    linear_solve = linear_solve_from_recipe(system)

    @jax.jit
    def forward(tangent):
        dx, info = implicit.root_jvp(
            optimality_fn(system), x, params, tangent, linear_solve, system.nullspace
        )
        return jax.jvp(pressure.fn, (x, params), (dx, tangent))[1], info.converged

    particles = np.random.default_rng(7).choice(system.n_particles, size=5, replace=False)
    for i in particles:
        reference, converged = forward(unit_tangent(system, per_particle_name("diameter", int(i)), params))
        assert bool(converged)
        assert relative_error(by_particle[i], reference) <= 1e-8, i
    # A species' diameter is every one of its particles' diameters at once.
    scale = np.abs(by_particle).sum()
    for t, species in enumerate(system.species):
        total = by_particle[system.types == t].sum()
        assert abs(total - entry.gradient[f"diameter.{species}"]) <= 1e-12 * scale
        assert (
            abs(total - packing_reverse.observables["pressure"].gradient[f"diameter.{species}"])
            <= 1e-9 * scale
        )
    assert ATOM not in system.params  # the offsets are the caller's, not the system's


def test_choose_mode_takes_the_fewer_solves():
    assert choose_mode(1, 4) == "reverse"
    assert choose_mode(4, 4) == "forward"  # a tie: forward's dx*/dθ serve every observable
    assert choose_mode(2, 0) == "forward"
    assert choose_mode(9, 1, "reverse") == "reverse"
    with pytest.raises(ValueError, match="mode"):
        choose_mode(1, 1, "sideways")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("volume", "unknown observable"),
        ("distance:0,128", "out of range 0..127"),
        ("gap:3", "two atom indices"),
        ("distance:5,5", "must differ"),
        ("stress:xz", "give two of x, y"),
        ("missing.py:f", "no file missing.py"),
        ("missing.py", "name the function too"),
    ],
)
def test_bad_observables_are_user_errors(packing_system, spec, match):
    with pytest.raises(UserError, match=match):
        parse_observable(packing_system, spec)


HEAD = "def q(positions, system, params):\n"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (f"{HEAD}    raise RuntimeError('broken')\n", "raised RuntimeError: broken"),
        (f"{HEAD}    return positions[0]\n", "must return one real number"),
        (f"{HEAD}    return 3\n", "must return one real number"),
        (f"import numpy as np\n{HEAD}    return np.float64(np.sum(positions))\n", "raised"),
        (
            f"import jax\n{HEAD}    shape = jax.ShapeDtypeStruct((), 'float64')\n"
            "    return jax.pure_callback(lambda p: p.sum(), shape, positions)\n",
            "cannot be differentiated",
        ),
        ("raise ImportError('at import')\n", "fails to load: ImportError: at import"),
        ("def other(positions, system, params):\n    return 0.0\n", "no function 'q'"),
    ],
)
def test_bad_user_observables_are_user_errors(packing_system, tmp_path, body, match):
    path = tmp_path / "mine.py"
    path.write_text(body)
    with pytest.raises(UserError, match=match):
        parse_observable(packing_system, f"{path}:q")


def test_pressure_of_a_free_cluster_is_a_user_error():
    system = load_system("lj-cluster")
    for spec in ("pressure", "stress:xy"):
        with pytest.raises(UserError, match="periodic cell"):
            parse_observable(system, spec)
