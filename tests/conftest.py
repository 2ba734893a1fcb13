"""Shared fixtures: the reference data, and the 128-particle binary packing built, relaxed and
differentiated once.

JAX compilation dominates the run time of the physics tests, so everything that compiles (the
FIRE loop, the sensitivity solve) is built once per session and reused; finite differences at
perturbed parameters (:func:`mdsens.references.central_difference`, warm-started from the relaxed
state) are cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
import pytest

import mdsens  # noqa: F401  (enables float64 before any array is made)
from mdsens.parameters import unit_tangent
from mdsens.references import central_difference
from mdsens.relaxation import Relaxer, RelaxResult
from mdsens.sensitivity import Sensitivity
from mdsens.system import System, load_system

DATA = Path(__file__).parent / "data"

# Central finite-difference step for parameters of the packing: one pair sits 7e-5 from contact,
# so h = 1e-4 changes the contact network; h = 1e-5 does not.
FD_STEP = 1e-5


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache_in_a_temporary_folder(tmp_path_factory) -> Iterator[None]:
    """CLI commands run in-process turn on JAX's persistent compilation cache (on by default, in
    the user's home): the tests keep theirs in a folder of their own, shared by the tests of one
    process and removed with pytest's temporary folders, unless MDSENS_COMPILATION_CACHE is set."""
    if "MDSENS_COMPILATION_CACHE" in os.environ:
        yield
        return
    os.environ["MDSENS_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    del os.environ["MDSENS_COMPILATION_CACHE"]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test file. One pytest process compiles
    thousands of functions; kept all session, their code mappings grew until XLA's compiler
    crashed (a segmentation fault in CI, late in the suite). Later files recompile what they use.
    """
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def load_reference() -> Callable[[str], dict[str, np.ndarray]]:
    """``load(name)``: the arrays of an independent reference file in tests/data (JAX-MD's FIRE
    and a dense pseudo-inverse of the Hessian, without mdsens)."""

    def load(name: str) -> dict[str, np.ndarray]:
        with np.load(DATA / name) as data:
            return {key: data[key] for key in data.files}

    return load


@pytest.fixture(scope="session")
def packing_reference(load_reference) -> dict[str, np.ndarray]:
    """The N = 128 paper packing: start, relaxed state and dx*/dθ from JAX-MD alone."""
    return load_reference("paper-packing-N128.npz")


@pytest.fixture(scope="session")
def packing_fd_step() -> float:
    """The finite-difference step for the packing and packings made from it (see FD_STEP)."""
    return FD_STEP


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

    Both relaxations are warm-started from x* and run to the recipe's fmax. ``dx`` has the
    Hessian's zero modes at x* projected out (the translations of the non-rattlers, and the
    rattlers), as the implicit derivative has. Results are cached.
    """
    cache: dict[str, tuple[np.ndarray, float]] = {}

    def fd(name: str) -> tuple[np.ndarray, float]:
        if name not in cache:
            result = central_difference(
                packing_relaxer,
                packing_relaxed.positions,
                packing_system.params,
                unit_tangent(packing_system, name),
                FD_STEP,
            )
            result.plus.require_converged()
            result.minus.require_converged()
            cache[name] = (result.dx, (result.plus.energy - result.minus.energy) / (2 * FD_STEP))
        return cache[name]

    return fd


@pytest.fixture(scope="session")
def lj_crystal_overrides() -> list[str]:
    """Overrides of lj-fcc-vacancy for a small crystal (2 x 2 x 2, 31 atoms) that relaxes in seconds.

    Half the 3.10 box is 1.55: the recipe's 2.5 sigma cutoff would reach beyond the minimum image,
    so the switch runs from 1.2 to 1.5 sigma and only the first shell interacts.
    """
    return [
        "lattice.repeat=[2,2,2]",
        "potential.r_onset=1.2",
        "potential.r_cutoff=1.5",
        "potential.sigma=1.0",
        "potential.epsilon=1.0",
        "minimizer.dt_start=0.005",
        "minimizer.dt_max=0.02",
        "minimizer.fmax=1e-12",
    ]
