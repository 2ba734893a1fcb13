"""Shared fixtures: the 128-particle binary packing, built, relaxed and differentiated once.

JAX compilation dominates the run time of the physics tests, so everything that compiles (the
FIRE loop, the sensitivity solve) is built once per session and reused; relaxations at perturbed
parameters are warm-started from the relaxed state and cached.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens  # noqa: F401  (enables float64 before any array is made)
from mdsens.relaxation import Relaxer, RelaxResult
from mdsens.sensitivity import Sensitivity, unit_tangent
from mdsens.system import System, load_system

DATA = Path(__file__).parent / "data"

# Central finite-difference step for parameters of the packing. REFERENCE.md: on this packing
# one pair sits 7e-5 from contact, so h = 1e-4 changes the contact network; h = 1e-5 does not.
FD_STEP = 1e-5


def min_image(system: System, a, b) -> np.ndarray:
    """a - b per particle, wrapped into the periodic box (minimum image)."""
    return np.asarray(jax.vmap(system.displacement)(jnp.asarray(a), jnp.asarray(b)))


def remove_translation(dx: np.ndarray) -> np.ndarray:
    """Remove the rigid translation (mean over particles, per axis)."""
    return dx - dx.mean(axis=0, keepdims=True)


def shifted_params(system: System, name: str, h: float) -> dict:
    """``system.params`` with the scalar parameter ``name`` moved by ``h``."""
    tangent = unit_tangent(system, name)
    return jax.tree_util.tree_map(lambda p, t: p + h * t, system.params, tangent)


@pytest.fixture(scope="session")
def packing_reference() -> dict[str, np.ndarray]:
    """The independent reference fixture (see ../shared/data/README.md)."""
    with np.load(DATA / "paper-packing-N128.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def packing_system() -> System:
    return load_system("binary-packing")


@pytest.fixture(scope="session")
def packing_relaxer(packing_system) -> Relaxer:
    return Relaxer(packing_system)


@pytest.fixture(scope="session")
def packing_relaxed(packing_relaxer) -> RelaxResult:
    result = packing_relaxer.relax()
    result.require_converged()
    return result


@pytest.fixture(scope="session")
def packing_sensitivity(packing_system, packing_relaxed):
    """Forward-mode sensitivities (CG, the recipe's solver) to every scalar parameter."""
    return Sensitivity(packing_system).compute(packing_relaxed, ["diameter", "epsilon", "alpha"])


@pytest.fixture(scope="session")
def packing_fd(packing_system, packing_relaxer, packing_relaxed):
    """``fd(name) -> (dx, dE)``: central finite differences of x* and E* in parameter ``name``.

    Both relaxations are warm-started from x* and run to the recipe's fmax. ``dx`` is the
    minimum-image difference over 2h with the rigid translation removed. Results are cached.
    """
    cache: dict[str, tuple[np.ndarray, float]] = {}

    def fd(name: str) -> tuple[np.ndarray, float]:
        if name not in cache:
            plus, minus = (
                packing_relaxer.relax(
                    params=shifted_params(packing_system, name, sign * FD_STEP),
                    x0=packing_relaxed.positions,
                )
                for sign in (1.0, -1.0)
            )
            plus.require_converged()
            minus.require_converged()
            dx = min_image(packing_system, plus.positions, minus.positions) / (2 * FD_STEP)
            cache[name] = (remove_translation(dx), (plus.energy - minus.energy) / (2 * FD_STEP))
        return cache[name]

    return fd
