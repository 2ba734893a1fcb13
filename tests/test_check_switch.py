"""``mdsens check`` on Lennard-Jones: a pair crossing an end of the switch is a crossing, like a contact.

The switch S(r) of Lennard-Jones and Morse is only C¹ at r_onset·σ and r_cutoff·σ: a central
difference over a step h across which a pair crosses either radius measures a kink, not the
derivative. The crystal with a vacancy (31 atoms, first shell at 1.090–1.101 σ, second at
1.542 σ and beyond, half the box 1.5496) gets one radius placed 3e-5 outside a shell, so that the
pairs of that shell lie just inside it. Varying σ moves the radius by (radius/σ)·h: h = 1e-4
crosses it (at θ − h for r_onset, θ + h for r_cutoff), h = 1e-5 does not.

* r_onset just beyond the first shell: the pairs are inside the switch's onset (S = 1) and stay
  there; moving r_onset changes nothing at x*, which is re-relaxed to check.
* r_cutoff just beyond the nearest second-shell pair (r_onset = 1.2 as before): that pair
  contributes ~GAP² of the switch, and x* moves by less than GAP/4 (5e-6).

At h = 1e-4 the crossing makes the finite difference 0.10 (r_onset) or 0.22 (r_cutoff) off: the
curvature of a pair's energy jumps at either radius; at 1e-5 it agrees to 2e-8. Such a step
must be reported and never trusted: were it the only one, the check would blame the implicit
answer.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mdsens.check import Checker
from mdsens.parameters import unit_tangent
from mdsens.potentials import metric_from
from mdsens.references import crossings, shifted
from mdsens.relaxation import Relaxer
from mdsens.system import load_system
from mdsens.verdict import DIRECT, FINITE_DIFFERENCES, IMPLICIT, judge, trusted

GAP = 3e-5  # how far outside the shell the radius is placed (σ = 1)
TOL = 1e-5


def pair_distances(system, x) -> np.ndarray:
    metric = jax.vmap(jax.vmap(metric_from(system.displacement), (None, 0)), (0, None))
    return np.asarray(metric(x, x))[np.triu_indices(len(x), 1)]


@pytest.fixture(scope="module")
def crystal(lj_crystal_overrides):
    """(overrides, relaxed positions, pair distances) of the crystal with r_onset = 1.2, r_cutoff = 1.5."""
    system = load_system("lj-fcc-vacancy", overrides=lj_crystal_overrides)
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    return lj_crystal_overrides, relaxed.positions, pair_distances(system, relaxed.positions)


def placed(crystal, radius: str):
    """(system, relaxed) with ``radius`` GAP outside a shell of the relaxed crystal."""
    overrides, x, distances = crystal
    if radius == "r_onset":
        shell = distances[distances < 1.2].max()  # the first shell's largest distance
        assert distances[distances > shell].min() > 1.5  # nothing else in the switch
    else:
        shell = distances[distances > 1.5].min()  # the nearest second-shell pair
    moved_radius = f"potential.{radius}={float(shell + GAP)!r}"
    system = load_system("lj-fcc-vacancy", overrides=[*overrides, moved_radius])
    relaxed = Relaxer(system).relax(x0=x)
    relaxed.require_converged()
    moved = np.abs(pair_distances(system, relaxed.positions) - distances).max()
    # The pairs of that shell are still about GAP inside the radius (at r_cutoff the pair now in
    # the switch pulls its neighbours by ~5e-6).
    assert moved < GAP / 4
    return system, relaxed


@pytest.fixture(scope="module", params=["r_onset", "r_cutoff"])
def switch_check(crystal, request):
    """(radius, check of sigma.Ar at h = 1e-4 and 1e-5) with a shell just inside ``radius``."""
    system, relaxed = placed(crystal, request.param)
    return request.param, Checker(system, relaxed, steps=(1e-4, 1e-5)).check("sigma.Ar", TOL, unroll=())


def test_a_step_across_the_switch_is_reported_as_a_crossing_and_not_trusted(switch_check):
    radius, result = switch_check
    rows = {r.h: r for r in result.rows if r.kind == FINITE_DIFFERENCES}
    assert rows[1e-4].crossings > 0 and rows[1e-4].crossed == (radius,)
    assert not trusted(rows[1e-4])
    assert rows[1e-5].crossings == 0 and rows[1e-5].crossed == () and trusted(rows[1e-5])
    assert rows[1e-5].error <= 1e-7
    assert result.passed, result.reason
    assert result.reason.startswith("finite differences agree") and "h = 1e-05" in result.reason


def test_a_step_across_the_switch_makes_the_finite_difference_wrong(switch_check):
    """The crossing is no formality: at h = 1e-4 the finite difference is 0.10 (r_onset) and 0.22
    (r_cutoff) off, on the particles in no crossing pair too (the whole crystal follows)."""
    _, result = switch_check
    (row,) = [r for r in result.rows if r.h == 1e-4]
    assert row.error > 1e-2 and row.error_unchanged > 1e-2


def test_only_crossing_steps_leave_the_verdict_to_the_direct_solve(switch_check):
    """With h = 1e-4 alone the check passes on the direct solve and names the radius crossed;
    without a direct solve no reference is left and it fails, blaming neither answer."""
    radius, result = switch_check
    keep = [r for r in result.rows if r.kind in (IMPLICIT, DIRECT) or r.h == 1e-4]
    words = {"r_onset": "the switch onset r_onset·σ", "r_cutoff": "the cutoff r_cutoff·σ"}[radius]
    verdict = judge(keep, TOL, 1e-13)
    assert verdict.passed, verdict.reason
    assert verdict.reason.startswith(f"a pair crosses {words} at every h: finite differences cannot judge")
    verdict = judge([r for r in keep if r.kind != DIRECT], TOL, 1e-13)
    assert not verdict.passed
    assert verdict.reason == (
        f"no trusted reference: a pair crosses {words} at every h and the system is too large for a"
        " direct solve"
    )


def test_crossings_see_moving_radii_with_fixed_positions(crystal):
    """At fixed positions, shrinking σ by 1e-4 moves r_onset·σ past the pairs GAP inside it: every
    particle of those pairs is marked, and nothing else; the same σ crosses nothing."""
    system, relaxed = placed(crystal, "r_onset")
    x, params = relaxed.positions, system.params
    shrunk = {**params, "sigma": params["sigma"] - 1e-4}
    marked, radii = crossings(system, x, params, x, shrunk)
    distances = pair_distances(system, x)
    onset = system.settings["r_onset"] * float(params["sigma"][0])
    assert radii == ("r_onset",)
    i, j = np.triu_indices(len(x), 1)
    near = (distances < onset) & (distances >= system.settings["r_onset"] * float(shrunk["sigma"][0]))
    assert near.any()
    expected = np.zeros(len(x), dtype=bool)
    expected[np.concatenate([i[near], j[near]])] = True
    np.testing.assert_array_equal(marked, expected)
    unchanged, none = crossings(system, x, params, x, params)
    assert not unchanged.any() and none == ()


@pytest.mark.parametrize(
    ("name", "overrides", "parameter", "radii"),
    [
        ("binary-packing", ["n_particles=256", "seed=3"], "diameter.B", ("contact",)),
        (
            "lj-fcc-vacancy",
            ["lattice.repeat=[5,5,5]", "potential.r_onset=1.2", "potential.r_cutoff=1.5", "rattle=0.05"],
            "sigma.Ar",
            ("r_onset", "r_cutoff"),
        ),
    ],
)
def test_crossings_with_a_neighbour_list_are_those_of_all_pairs(name, overrides, parameter, radii):
    """Between the start and a moved start at a 1 % larger parameter, a neighbour list finds the
    same crossing particles as all pairs; for soft spheres they are the contact changes."""
    dense, listed = (load_system(name, [*overrides, f'neighbors.mode="{m}"']) for m in ("never", "always"))
    assert dense.pair_list is None and listed.pair_list is not None
    x = dense.positions
    moved = x + 1e-3 * np.random.default_rng(0).standard_normal(x.shape)
    grown = shifted(dense.params, unit_tangent(dense, parameter), 0.01)
    marked, crossed = crossings(dense, x, dense.params, moved, grown)
    assert crossed == radii and marked.any() and not marked.all()
    listed_marked, listed_crossed = crossings(listed, x, dense.params, moved, grown)
    np.testing.assert_array_equal(listed_marked, marked)
    assert listed_crossed == crossed
    if "contact" in radii:
        np.testing.assert_array_equal(marked, dense.contact_changes(x, dense.params, moved, grown))
