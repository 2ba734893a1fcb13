"""Relaxer and Sensitivity are immutable values: nothing assigned after construction, a longer
neighbour list is a new engine, per-call tolerances leave the engine as it was, solve is pure."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens.parameters import unit_tangent
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity
from mdsens.system import load_system

LISTED = ["n_particles=64", 'neighbors.mode="always"', "minimizer.fmax=1e-10"]


@pytest.fixture(scope="module")
def listed():
    system = load_system("binary-packing", overrides=LISTED)
    assert system.pair_list is not None
    return system


@pytest.fixture(scope="module")
def relaxer(listed):
    return Relaxer(listed)


@pytest.fixture(scope="module")
def relaxed(relaxer):
    result = relaxer.relax()
    result.require_converged()
    return result


def beyond_cutoff(system):
    """θ with diameter.A 20 % larger: beyond the list's 10 % margin."""
    tangent = unit_tangent(system, "diameter.A")
    return jax.tree_util.tree_map(lambda p, t: p + 0.2 * t, system.params, tangent)


@pytest.mark.parametrize("attribute", ["max_steps", "fmax", "system", "solve", "_neighbors0"])
def test_a_relaxer_attribute_cannot_be_assigned_or_deleted(relaxer, attribute):
    before = getattr(relaxer, attribute)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(relaxer, attribute, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(relaxer, attribute)
    assert getattr(relaxer, attribute) is before


@pytest.mark.parametrize("attribute", ["solver", "system", "_tangent"])
def test_a_sensitivity_attribute_cannot_be_assigned(listed, attribute):
    sensitivity = Sensitivity(listed)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(sensitivity, attribute, "dense")
    assert sensitivity.solver == listed.recipe["sensitivity"]["solver"]


def test_defaults_come_from_the_recipe_unless_given(listed):
    settings = listed.recipe["minimizer"]
    default = Relaxer(listed)
    assert (default.name, default.fmax, default.max_steps) == (
        settings["name"],
        settings["fmax"],
        settings["max_steps"],
    )
    chosen = Relaxer(listed, fmax=1e-6, max_steps=7)
    assert (chosen.fmax, chosen.max_steps) == (1e-6, 7)


def test_for_params_is_the_same_engine_when_the_list_covers_the_parameters(relaxer, relaxed, listed):
    assert relaxer.for_params(listed.params) is relaxer
    assert relaxer.for_params(listed.params, relaxed.positions) is relaxer
    sensitivity = Sensitivity(listed)
    assert sensitivity.for_params(listed.params, relaxed.positions) is sensitivity


def test_for_params_beyond_the_cutoff_is_a_new_engine_and_the_old_one_is_untouched(relaxer, listed):
    bigger = beyond_cutoff(listed)
    cutoff = listed.pair_list.cutoff
    longer = relaxer.for_params(bigger)
    assert longer is not relaxer
    assert longer.system.pair_list.cutoff >= listed.reach(bigger) > cutoff
    assert (longer.fmax, longer.max_steps, longer.name) == (relaxer.fmax, relaxer.max_steps, relaxer.name)
    assert relaxer.system is listed and listed.pair_list.cutoff == cutoff
    sensitivity = Sensitivity(listed, solver="dense")
    wider = sensitivity.for_params(bigger, listed.positions)
    assert wider is not sensitivity and wider.solver == "dense"
    assert wider.system.pair_list.cutoff >= listed.reach(bigger)
    assert sensitivity.system is listed


def test_per_call_caps_and_tolerances_match_fresh_engines(listed, relaxer, relaxed):
    """One engine relaxing with different max_steps and fmax per call gives what engines built
    with those defaults give, and its own defaults and results are unchanged afterwards."""
    defaults = (relaxer.fmax, relaxer.max_steps)
    capped = relaxer.relax(fmax=1e-4, max_steps=3)
    loose = relaxer.relax(fmax=1e-4)
    again = relaxer.relax()
    assert (relaxer.fmax, relaxer.max_steps) == defaults
    assert capped.steps == 3 and not capped.converged
    assert loose.fmax == 1e-4 and loose.converged and 3 < loose.steps < relaxed.steps
    for got, fresh in (
        (capped, Relaxer(listed, fmax=1e-4, max_steps=3).relax()),
        (loose, Relaxer(listed, fmax=1e-4).relax()),
        (again, relaxed),
    ):
        assert (got.steps, got.converged, got.fmax) == (fresh.steps, fresh.converged, fresh.fmax)
        np.testing.assert_array_equal(got.positions, fresh.positions)
        assert got.energy == fresh.energy


def test_solve_and_the_engine_are_the_same_before_and_after_other_calls(listed, relaxer, relaxed):
    """solve reads nothing that relax (per-call caps, a longer list for one call) could change:
    a fresh trace of it afterwards gives the same x*, and the engine keeps its system and list."""
    x0 = jnp.asarray(listed.positions)
    before = np.asarray(jax.jit(relaxer.solve)(listed.params, x0))
    np.testing.assert_allclose(before, relaxed.positions, rtol=0, atol=1e-12)
    neighbors = relaxer._neighbors0
    relaxer.relax(max_steps=2)
    relaxer.relax(fmax=1e-3)
    assert relaxer.relax(beyond_cutoff(listed), x0=relaxed.positions).converged
    assert relaxer.system is listed and relaxer._neighbors0 is neighbors
    np.testing.assert_array_equal(np.asarray(jax.jit(relaxer.solve)(listed.params, x0)), before)
