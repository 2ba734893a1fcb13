"""The validity radius of the linearised relaxed state (mdsens.validity).

References: re-relaxations at half and at three times the reported radius on a 2-D packing, a
3-D packing and a Lennard-Jones crystal (half: no contact or switch radius crossed; three times:
crossed, so the radius is not vacuous); central finite differences of gaps and Hessian
eigenvalues at re-relaxed states; dense eigendecomposition against Lanczos; and the closed form
of ε, under which the Hessian scales as ε and reaches zero at ε = 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mdsens.observables import parse_observable
from mdsens.parameters import unit_tangent, with_per_particle
from mdsens.prediction import predict
from mdsens.references import central_difference, crossings, shifted
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity
from mdsens.system import load_system
from mdsens.validity import lowest_modes, mode_rates, predicted_crossings, validity_along, validity_radii


def _cases(label, system, relaxer, x, sensitivity):
    """Re-relaxations at ½ and 3 × the radius in each direction of each parameter whose dx*/dθ
    is not zero: (label, parameter, direction, limit, crossed at ½, crossed at 3×)."""
    entries = {name: e.dx for name, e in sensitivity.parameters.items() if not e.exactly_zero}
    rows = []
    for name, validity in validity_radii(system, x, system.params, entries).items():
        tangent = unit_tangent(system, name)
        for sign, limit in ((1.0, validity.up), (-1.0, validity.down)):
            if not math.isfinite(limit.distance):
                continue
            crossed = []
            for factor in (0.5, 3.0):
                params = shifted(system.params, tangent, sign * factor * limit.distance)
                result = relaxer.relax(params, x)
                result.require_converged()
                particles, _ = crossings(system, x, system.params, result.positions, params)
                changed = system.contact_changes(x, system.params, result.positions, params)
                crossed.append(bool(particles.any() or changed.any()))
            rows.append((label, name, "up" if sign > 0 else "down", limit, *crossed))
    return rows


def _relaxed_case(name: str, overrides: list[str], parameters: list[str]):
    """(system, relaxer, relaxed, sensitivity) of a recipe, relaxed, for ``parameters``."""
    system = load_system(name, overrides=overrides)
    relaxer = Relaxer(system)
    relaxed = relaxer.relax()
    relaxed.require_converged()
    return system, relaxer, relaxed, Sensitivity(system).compute(relaxed, parameters, spectrum=False)


@pytest.fixture(scope="module")
def soft_3d():
    """A 3-D harmonic soft-sphere packing of 32 particles, relaxed, with its sensitivities."""
    return _relaxed_case("soft-sphere-3d", ["n_particles=32"], ["diameter", "alpha"])


@pytest.fixture(scope="module")
def lj_crystal(lj_crystal_overrides):
    """The 31-atom Lennard-Jones fcc crystal with a vacancy, relaxed, with its sensitivities."""
    return _relaxed_case("lj-fcc-vacancy", lj_crystal_overrides, ["sigma", "epsilon"])


@pytest.fixture(scope="module")
def cases(packing_system, packing_relaxer, packing_relaxed, packing_sensitivity, soft_3d, lj_crystal):
    rows = _cases(
        "2-D packing", packing_system, packing_relaxer, packing_relaxed.positions, packing_sensitivity
    )
    for label, (system, relaxer, relaxed, sensitivity) in (
        ("3-D packing", soft_3d),
        ("LJ crystal", lj_crystal),
    ):
        rows += _cases(label, system, relaxer, relaxed.positions, sensitivity)
    return rows


def _table(rows) -> str:
    return "\n".join(
        f"{label:12} {name:11} {way:4} radius {limit.distance:.3e} ({limit.describe()}):"
        f" crossed at 1/2: {half}, at 3x: {triple}"
        for label, name, way, limit, half, triple in rows
    )


def test_half_the_radius_crosses_nothing(cases):
    """At least 9 in 10 (system, parameter, direction) cases re-relaxed at half the radius cross
    no contact (soft spheres) and no end of the switch (Lennard-Jones), on all three systems."""
    assert {label for label, *_ in cases} == {"2-D packing", "3-D packing", "LJ crystal"}
    assert len(cases) >= 10, _table(cases)
    kept = sum(not half for *_, half, _ in cases)
    assert kept >= 0.9 * len(cases), _table(cases)


def test_three_times_the_radius_crosses(cases):
    """Where a contact limits the radius, three times it does cross something in most cases: the
    radius is where the linearisation really stops, not an arbitrarily small number."""
    limited = [row for row in cases if row[3].kind == "contact"]
    assert len(limited) >= 8, _table(cases)
    crossed = sum(triple for *_, triple in limited)
    assert crossed >= 0.75 * len(limited), _table(cases)


@pytest.fixture(scope="module")
def packing_b(packing_system, packing_relaxer, packing_relaxed, packing_sensitivity, packing_fd_step):
    """Along diameter.B of the packing: the validity, the lowest modes and re-relaxations at ±h."""
    system, x = packing_system, packing_relaxed.positions
    dx = packing_sensitivity.parameters["diameter.B"].dx
    tangent = unit_tangent(system, "diameter.B")
    modes = lowest_modes(system, x, system.params)
    validity = validity_along(system, x, system.params, tangent, dx, modes)
    fd = central_difference(packing_relaxer, x, system.params, tangent, packing_fd_step)
    assert fd.converged and not fd.changed.any()
    return system, x, tangent, dx, modes, validity, fd


def test_gap_rate_matches_relaxed_finite_difference(packing_b, packing_fd_step):
    """The limiting pair's d(r − σ)/dθ against (gap(x*(θ + h)) − gap(x*(θ − h))) / 2h, the gaps
    measured by the gap observable at re-relaxed states."""
    system, _, tangent, _, _, validity, fd = packing_b
    h = packing_fd_step
    for limit in (validity.contact_up, validity.contact_down):
        gap = parse_observable(system, f"gap:{limit.pair[0]},{limit.pair[1]}")
        plus = float(gap(jnp.asarray(fd.plus.positions), shifted(system.params, tangent, h)))
        minus = float(gap(jnp.asarray(fd.minus.positions), shifted(system.params, tangent, -h)))
        assert limit.value == pytest.approx(float(gap(jnp.asarray(packing_b[1]), system.params)), abs=1e-14)
        assert limit.rate == pytest.approx((plus - minus) / (2 * h), rel=1e-5)
        assert limit.distance == pytest.approx(abs(limit.value / limit.rate), rel=1e-12)


def test_mode_rates_match_relaxed_finite_difference(packing_b, packing_fd_step):
    """dλ/dθ of the lowest Hessian eigenvalues against central differences of the eigenvalues at
    the re-relaxed states x*(θ ± h)."""
    system, _, tangent, dx, modes, _, fd = packing_b
    h = packing_fd_step
    assert [stop - start for start, stop in modes.groups] == [1] * len(modes.values)
    rates = mode_rates(system, packing_b[1], system.params, tangent, dx, modes)
    plus = lowest_modes(system, fd.plus.positions, shifted(system.params, tangent, h)).values
    minus = lowest_modes(system, fd.minus.positions, shifted(system.params, tangent, -h)).values
    np.testing.assert_allclose(rates, (plus - minus) / (2 * h), rtol=1e-4)


def test_lanczos_agrees_with_dense(packing_b):
    system, x, _, _, modes, _, _ = packing_b
    lanczos = lowest_modes(system, x, system.params, dense_limit=0)
    assert lanczos.method == "lanczos" and modes.method == "dense"
    np.testing.assert_allclose(lanczos.values, modes.values, rtol=1e-9)
    overlap = np.abs(np.einsum("aid,bid->ab", lanczos.vectors, modes.vectors))
    np.testing.assert_allclose(overlap, np.eye(len(modes.values)), atol=1e-6)


def test_predicted_crossings_start_at_the_radius(packing_b):
    system, x, tangent, dx, _, validity, _ = packing_b
    up, down = validity.radius_up, validity.radius_down
    assert predicted_crossings(system, x, system.params, tangent, dx, within=0.5 * up) == []
    ahead = predicted_crossings(system, x, system.params, tangent, dx, within=2 * up)
    assert ahead[0].pair == validity.up.pair and ahead[0].t == pytest.approx(up, rel=1e-12)
    behind = predicted_crossings(system, x, system.params, tangent, dx, within=-2 * down)
    assert behind[0].pair == validity.down.pair and behind[0].t == pytest.approx(-down, rel=1e-12)


def test_epsilon_closed_form(lj_crystal):
    """One species: ε scales E, so x* and the pair distances do not move and every eigenvalue is
    λ(ε) = ε λ(1): it reaches zero at ε = 0, a radius of exactly ε down and none up."""
    system, _, relaxed, sensitivity = lj_crystal
    validity = validity_radii(
        system, relaxed.positions, system.params, {"epsilon.Ar": sensitivity.parameters["epsilon.Ar"].dx}
    )["epsilon.Ar"]
    assert validity.radius_up == math.inf and validity.contact_down.kind == "none"
    assert validity.down.kind == "mode" and validity.radius_down == pytest.approx(1.0, rel=1e-9)
    assert validity.to_json()["radius_up"] is None


def test_degenerate_modes_split_as_their_group_matrix(lj_crystal):
    """The crystal's lowest eigenvalues are degenerate (cubic symmetry); one atom's own σ breaks
    it. The rates of each group, eigenvalues of Vᵀ(dH/dt)V, against one-sided differences of the
    sorted eigenvalues along x* + t dx, θ + t e (their first derivative is that of the relaxed
    path)."""
    system, _, relaxed, _ = lj_crystal
    params = with_per_particle(system, system.params, ["sigma"])
    tangent = unit_tangent(system, "sigma[7]", params)
    x = relaxed.positions
    dx = predict(system, x, params, tangent).dx
    modes = lowest_modes(system, x, params, k=4)
    assert any(stop - start > 1 for start, stop in modes.groups)
    rates = mode_rates(system, x, params, tangent, dx, modes)
    h = 1e-6
    moved = lowest_modes(system, x + h * dx, shifted(params, tangent, h), k=len(modes.values) + 2)
    for start, stop in modes.groups:
        values = np.sort(moved.values)[start:stop]
        np.testing.assert_allclose(
            rates[start:stop], (values - modes.values[start:stop]) / h, rtol=1e-3, atol=1e-3
        )
    split = [np.ptp(rates[start:stop]) for start, stop in modes.groups if stop - start > 1]
    assert max(split) > 1.0  # the groups do split: their mean alone would be wrong
