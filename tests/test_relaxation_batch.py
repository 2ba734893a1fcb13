"""The batched relaxation steps each member as a relaxation of its own would."""

import jax
import numpy as np

from mdsens.ensemble import member_positions
from mdsens.relaxation import Relaxer
from mdsens.relaxation_batch import batched_solve
from mdsens.system import load_system


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *trees)


def test_members_reach_their_own_relaxations_with_their_own_steps():
    """Three starts and two diameters in one batch, through a neighbour list: every member ends
    where, and after as many steps as, its single relaxation (whose list is rebuilt on its own
    schedule, as the batch's per-member rebuilds must be)."""
    system = load_system("binary-packing", ["n_particles=64", "neighbors.mode=always"], seed=0)
    assert system.pair_list is not None
    relaxer = Relaxer(system)
    wider = system.params | {"diameter": system.params["diameter"] * np.array([1.0, 1.01])}
    members = [(system.params, 0), (system.params, 1), (wider, 2)]
    out = jax.jit(batched_solve(relaxer))(
        _stack([p for p, _ in members]), np.stack([member_positions(system, s) for _, s in members])
    )
    assert not np.any(out.unconverged | out.missing)
    for k, (params, seed) in enumerate(members):
        single = relaxer.relax(params, member_positions(system, seed))
        assert single.converged
        assert int(out.steps[k]) == single.steps
        np.testing.assert_allclose(out.positions[k], single.positions, rtol=0, atol=1e-12)
        assert float(out.max_force[k]) <= relaxer.fmax


def test_a_member_that_cannot_converge_is_flagged_and_stops_at_the_cap():
    system = load_system("binary-packing", ["n_particles=16", "minimizer.max_steps=5"], seed=0)
    relaxer = Relaxer(system)
    out = jax.jit(batched_solve(relaxer))(
        _stack([system.params] * 2), np.stack([member_positions(system, s) for s in (0, 1)])
    )
    assert np.all(out.unconverged) and np.all(np.isnan(out.positions))
    assert np.all(np.asarray(out.steps) == 5)
