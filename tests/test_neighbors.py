"""Neighbour lists give the all-pairs answer: energies, forces, Hessian products, relaxed states,
sensitivities and rattlers; overflow and a growing interaction range are handled, not ignored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import neighbors
from mdsens.errors import UserError
from mdsens.neighbors import PairList
from mdsens.parameters import unit_tangent
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity, relaxed_positions_fn
from mdsens.system import load_system

PACKING = ["n_particles=256", "seed=3"]
LJ = ["lattice.repeat=[5,5,5]", "potential.r_onset=1.2", "potential.r_cutoff=1.5", "rattle=0.05"]


def pair_of(system_name: str, overrides: list[str]):
    """The same system without and with a neighbour list."""
    return tuple(load_system(system_name, [*overrides, f'neighbors.mode="{m}"']) for m in ("never", "always"))


@pytest.fixture(scope="module")
def packing():
    dense, listed = pair_of("binary-packing", PACKING)
    relaxed = Relaxer(dense).relax()
    relaxed.require_converged()
    return dense, listed, relaxed


@pytest.mark.parametrize("name, overrides", [("binary-packing", PACKING), ("lj-fcc-vacancy", LJ)])
def test_energy_forces_parameter_gradient_and_hessian_products_match_all_pairs(name, overrides):
    dense, listed = pair_of(name, overrides)
    assert dense.pair_list is None and listed.pair_list is not None
    x = jnp.asarray(dense.positions)
    params = dense.params
    for fn in (
        lambda s: s.energy_fn(x, params),
        lambda s: s.force_fn(x, params),
        lambda s: jax.grad(s.energy_fn, argnums=1)(x, params),
        lambda s: jax.jvp(lambda y: jax.grad(s.energy_fn)(y, params), (x,), (jnp.cos(3.0 * x),))[1],
    ):
        expected, got = (jax.jit(lambda f=fn, s=s: f(s))() for s in (dense, listed))
        for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got), strict=True):
            assert np.all(np.isfinite(b))
            np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-11 * float(np.max(np.abs(a))))


def test_relaxation_and_sensitivity_match_all_pairs(packing):
    dense, listed, relaxed = packing
    own = Relaxer(listed).relax()
    assert own.converged
    assert own.energy == pytest.approx(relaxed.energy, rel=1e-10)
    names = ["diameter.A", "diameter.B", "alpha"]
    expected = Sensitivity(dense).compute(relaxed, names, spectrum=False)
    got = Sensitivity(listed).compute(relaxed, names, spectrum=False)
    np.testing.assert_array_equal(got.rattlers, expected.rattlers)
    for name in names:
        a, b = expected.parameters[name], got.parameters[name]
        np.testing.assert_allclose(b.dx, a.dx, rtol=0, atol=1e-9 * np.max(np.abs(a.dx)))
        assert b.denergy == pytest.approx(a.denergy, rel=1e-11)


def test_contact_numbers_and_changes_match_all_pairs(packing):
    dense, listed, relaxed = packing
    x = jnp.asarray(relaxed.positions)
    np.testing.assert_array_equal(
        listed.contact_numbers(x, listed.params), dense.contact_numbers(x, dense.params)
    )
    # Growing one species' diameter makes new contacts: both modes see the same particles.
    grown = jax.tree_util.tree_map(lambda p, t: p + 0.05 * t, dense.params, unit_tangent(dense, "diameter.B"))
    changed = dense.contact_changes(x, dense.params, x, grown)
    assert changed.any()
    np.testing.assert_array_equal(listed.contact_changes(x, listed.params, x, grown), changed)


def test_a_list_that_overflows_is_reallocated_and_the_steps_redone(packing, monkeypatch):
    """With no headroom (capacity 1.0) a rebuild during the relaxation finds more pairs than the
    list holds: the relaxation must notice, grow the list, redo the steps and still reach the
    all-pairs relaxed state."""
    _, _, relaxed = packing
    tight = load_system("binary-packing", [*PACKING, 'neighbors.mode="always"', "neighbors.capacity=1.0"])
    grow, grown = PairList.grow, []
    monkeypatch.setattr(
        PairList, "grow", lambda self, x, nb: grown.append(nb.max_occupancy) or grow(self, x, nb)
    )
    result = Relaxer(tight).relax()
    assert grown, "no overflow happened: the test no longer tests anything"
    assert result.converged
    assert result.energy == pytest.approx(relaxed.energy, rel=1e-10)


def test_a_parameter_beyond_the_cutoff_gets_a_longer_list(packing):
    """diameter.A + 20 % (beyond the 10 % margin): the energy of the original list says NaN
    rather than miss pairs; the relaxer relaxes there with a longer list (for that call, leaving
    itself as it was) and matches all pairs, and so does the engine for_params builds."""
    dense, listed, relaxed = packing
    bigger = jax.tree_util.tree_map(lambda p, t: p + 0.2 * t, dense.params, unit_tangent(dense, "diameter.A"))
    x = jnp.asarray(relaxed.positions)
    assert np.isnan(float(listed.energy_fn(x, bigger)))
    relaxer = Relaxer(listed)
    result = relaxer.relax(bigger, x0=relaxed.positions)
    assert relaxer.system is listed
    longer = relaxer.for_params(bigger, relaxed.positions)
    assert longer.system.pair_list.cutoff > listed.pair_list.cutoff
    assert longer.system.pair_list.cutoff >= listed.reach(bigger)
    reference = Relaxer(dense).relax(bigger, x0=relaxed.positions)
    assert result.converged and reference.converged
    assert result.energy == pytest.approx(reference.energy, rel=1e-10)
    np.testing.assert_array_equal(longer.relax(bigger, x0=relaxed.positions).positions, result.positions)


def test_auto_mode_switches_at_the_documented_particle_count():
    below = load_system("binary-packing", [f"n_particles={neighbors.AUTO_MIN_PARTICLES - 2}"])
    at = load_system("binary-packing", [f"n_particles={neighbors.AUTO_MIN_PARTICLES}"])
    assert below.pair_list is None and at.pair_list is not None


def test_always_in_a_free_cluster_is_a_user_error():
    with pytest.raises(UserError, match="orthorhombic periodic cell"):
        load_system("lj-cluster", ['neighbors.mode="always"'])


@pytest.mark.parametrize(
    "name, overrides",
    [("lj-fcc-vacancy", ["lattice.repeat=[2,2,2]"]), ("lj-fcc-vacancy", ["potential.r_cutoff=inf"])],
)
def test_a_range_beyond_half_the_cell_is_a_user_error(name, overrides):
    """Minimum image would count one image of each pair and miss the others."""
    with pytest.raises(UserError, match="half the periodic cell"):
        load_system(name, overrides)


def test_differentiable_relaxed_positions_with_a_list(packing):
    """x*(θ) through jax.jvp matches the all-pairs sensitivity; beyond the list's cutoff it
    raises, rather than return a state relaxed with pairs missing."""
    dense, listed, relaxed = packing
    x_star = relaxed_positions_fn(listed)
    tangent = unit_tangent(listed, "diameter.B")
    x, dx = jax.jvp(lambda p: x_star(p, relaxed.positions), (listed.params,), (tangent,))
    expected = Sensitivity(dense).compute(relaxed, ["diameter.B"], spectrum=False).parameters["diameter.B"].dx
    np.testing.assert_allclose(np.asarray(dx), expected, rtol=0, atol=1e-8 * np.max(np.abs(expected)))
    bigger = jax.tree_util.tree_map(
        lambda p, t: p + 0.2 * t, listed.params, unit_tangent(listed, "diameter.A")
    )
    with pytest.raises(Exception, match="neighbour list cannot hold"):  # noqa: B017  (JAX's runtime error)
        jax.block_until_ready(x_star(bigger, relaxed.positions))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("binary-packing", PACKING),
        ("binary-packing", ["n_particles=200", "box.packing_fraction=0.5", "seed=7"]),
        ("soft-sphere-3d", ["n_particles=512", "seed=2"]),
        ("lj-fcc-vacancy", LJ),
    ],
)
def test_allocation_is_jax_mds_own(name, overrides):
    """mdsens sizes a list from NumPy counts and one compiled rebuild instead of JAX-MD's eager
    allocation: the list (pairs, capacities, cell list) must be the one JAX-MD allocates, with
    and without extra room, and a later update must give the same pairs."""
    pair_list = load_system(name, [*overrides, 'neighbors.mode="always"']).pair_list
    x = pair_list._wrap(load_system(name, overrides).positions)
    rng = np.random.default_rng(0)
    for fns, reach in (
        (pair_list._skinned, pair_list.cutoff + pair_list.skin),
        (pair_list._exact, pair_list.cutoff),
    ):
        for extra in (0, 3):
            ours = pair_list._allocate(fns, reach, x, extra)
            theirs = fns.allocate(x, extra_capacity=extra)
            assert ours.max_occupancy == theirs.max_occupancy
            assert ours.cell_list_capacity == theirs.cell_list_capacity
            assert ours.cell_size == theirs.cell_size
            assert int(ours.error.code) == int(theirs.error.code) == 0
            np.testing.assert_array_equal(ours.idx, theirs.idx)
            np.testing.assert_array_equal(ours.reference_position, theirs.reference_position)
        moved = pair_list._wrap(x + rng.normal(scale=0.3 * pair_list.skin, size=x.shape))
        np.testing.assert_array_equal(fns.update(moved, ours).idx, fns.update(moved, theirs).idx)
