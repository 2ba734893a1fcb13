"""Minimiser defaults that converge for every potential, with no minimiser settings at all.

FIRE's default steps (JAX-MD's, dt_max = 0.4) suit harmonic soft spheres; a Lennard-Jones or
Morse wall needs about 20× smaller ones, and with FIRE's own a perturbed LJ cluster explodes.
Where the recipe sets no time step, mdsens scales them to the potential's fastest pair vibration
(mdsens.recipe.scaled_time_steps). What makes these falsifiable: each structure is written to a
file by the test and relaxed from it with only the potential's parameters given; the relaxed
state must satisfy max|F| ≤ fmax recomputed from scratch, and the clusters must reach their
known global minima (Cambridge Cluster Database: LJ13 −44.326801 ε, LJ38 −173.928427 ε).
"""

from __future__ import annotations

import ase
import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Octahedron

from mdsens.recipe import MINIMIZER_DEFAULTS, STEPS_PER_VIBRATION, load_recipe
from mdsens.relaxation import Relaxer, max_force
from mdsens.system import load_system

LJ = ["potential.sigma=1", "potential.epsilon=1"]
NO_CUTOFF = ["potential.r_cutoff=inf"]


def relaxed(path, potential, overrides):
    system = load_system(structure=path, potential=potential, overrides=overrides)
    result = Relaxer(system).relax()
    assert result.converged, result.reason
    force = float(max_force(system.force_fn(jnp.asarray(result.positions), system.params)))
    assert force <= result.fmax
    return system, result


def rattled(atoms: ase.Atoms, scale: float, seed: int = 0) -> ase.Atoms:
    atoms = atoms.copy()
    atoms.positions += np.random.default_rng(seed).normal(scale=scale, size=atoms.positions.shape)
    return atoms


def test_lj13_cluster(tmp_path):
    atoms = rattled(ase.io.read(load_recipe("lj-cluster")["structure"]), 0.05)
    ase.io.write(tmp_path / "lj13.xyz", atoms)
    system, result = relaxed(tmp_path / "lj13.xyz", "lennard_jones", LJ + NO_CUTOFF)
    steps = system.recipe["minimizer"]
    # At σ = ε = 1 the steps are the shipped LJ recipes' own: 1/20 of FIRE's defaults.
    assert steps["dt_start"] == pytest.approx(0.005, rel=1e-5)
    assert steps["dt_max"] == pytest.approx(0.02, rel=1e-5)
    assert result.energy == pytest.approx(-44.326801, abs=1e-6)


def test_lj38_cluster(tmp_path):
    atoms = Octahedron("Ar", 4, cutoff=1)  # the 38-atom truncated octahedron: LJ38's global minimum
    nearest = np.min(np.linalg.norm(atoms.positions[1:] - atoms.positions[0], axis=-1))
    atoms.positions *= 2 ** (1 / 6) / nearest
    ase.io.write(tmp_path / "lj38.xyz", rattled(atoms, 0.05))
    _, result = relaxed(tmp_path / "lj38.xyz", "lennard_jones", LJ + NO_CUTOFF)
    assert result.energy == pytest.approx(-173.928427, abs=1e-6)


def test_lj_fcc_crystal_with_a_vacancy(tmp_path):
    atoms = bulk("Ar", "fcc", a=2 ** (2 / 3), cubic=True) * (4, 4, 4)
    del atoms[13]
    ase.io.write(tmp_path / "vacancy.extxyz", rattled(atoms, 0.03))
    _, result = relaxed(tmp_path / "vacancy.extxyz", "lennard_jones", LJ)
    # Every atom keeps 10-12 neighbours: the crystal relaxed, it did not melt or explode.
    assert result.energy < -6.0 * len(atoms)


@pytest.mark.parametrize("sigma, epsilon", [(1.0, 1.0), (2.5, 0.3)])
def test_morse_crystal_in_any_units(tmp_path, sigma, epsilon):
    """Steps scale as σ/√ε: the same crystal in other units converges in the same steps."""
    atoms = bulk("Cu", "fcc", a=sigma * np.sqrt(2), cubic=True) * (4, 4, 4)
    ase.io.write(tmp_path / "morse.extxyz", rattled(atoms, 0.03 * sigma))
    settings = [f"potential.sigma={sigma}", f"potential.epsilon={epsilon}", "potential.alpha=5"]
    system, result = relaxed(tmp_path / "morse.extxyz", "morse", settings)
    omega = np.sqrt(2 * epsilon) * 5
    assert system.recipe["minimizer"]["dt_max"] == pytest.approx(
        MINIMIZER_DEFAULTS["fire"]["dt_max"] * STEPS_PER_VIBRATION / omega, rel=1e-5
    )
    assert result.energy < -5.0 * epsilon * len(atoms)


def test_steps_the_recipe_sets_are_kept(tmp_path):
    path = load_recipe("lj-cluster")["structure"]
    system = load_system(structure=path, potential="lennard_jones", overrides=[*LJ, "minimizer.dt_max=0.03"])
    assert system.recipe["minimizer"]["dt_max"] == 0.03
    assert system.recipe["minimizer"]["dt_start"] == MINIMIZER_DEFAULTS["fire"]["dt_start"]


@pytest.mark.parametrize("name", ["binary-packing", "soft-sphere-3d", "bidisperse-jamming"])
def test_shipped_packings_keep_fires_steps_and_converge(name):
    system = load_system(name)
    assert system.recipe["minimizer"]["dt_max"] == MINIMIZER_DEFAULTS["fire"]["dt_max"]
    result = Relaxer(system).relax()
    assert result.converged, result.reason
    assert float(max_force(system.force_fn(jnp.asarray(result.positions), system.params))) <= result.fmax
