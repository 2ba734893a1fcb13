"""Observables: scalar functions q(x, θ) of a relaxed state, by name.

An :class:`Observable` is a plain JAX function ``q(x, params) -> scalar`` closed over its system,
so it composes with ``jax.grad``, ``jax.jvp`` and ``jax.vmap`` like any other. Built in
(:func:`parse_observable` reads these names):

* ``energy``: E(x, θ).
* ``pressure`` and ``stress:ab`` (``stress:xx``, ``stress:xy``, ...), periodic cells only: the
  virial stress of the pair potential at zero temperature, σ_ab = (1/V) ∂E/∂ε_ab, the energy's
  derivative by a homogeneous strain ε of the cell and the positions together, at ε = 0, and
  the pressure P = −tr σ / d. ASE's sign convention: a compressed packing has negative stress
  and positive pressure. Units: energy / length^d (energy per area in 2-D).
* ``distance:I,J``: the minimum-image distance between particles I and J (0-based).
* ``gap:I,J``: their surface gap r − σ_IJ, with σ_IJ the pair value of the contact parameter
  (the diameter of soft spheres; σ of Lennard-Jones and Morse): negative while they overlap.
* ``FILE.py:FUNCTION``: a user observable, ``FUNCTION(positions, system, params) -> scalar``, a
  JAX function of the (N, d) positions, the :class:`mdsens.system.System` and the parameter
  pytree θ. For example::

      import jax.numpy as jnp

      def spread(positions, system, params):
          # mean squared distance of the particles from their centroid
          centred = positions - positions.mean(axis=0)
          return jnp.mean(jnp.sum(centred**2, axis=1))

Their total derivatives dq/dθ = ∂q/∂θ + ∂q/∂x · dx*/dθ are in :mod:`mdsens.observable_gradients`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.contacts import candidate_pairs
from mdsens.errors import UserError
from mdsens.potentials import metric_from, pair_values_at
from mdsens.system import System

AXES = "xyz"


@dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jax.jit
class Observable:
    """A scalar function of a state and the parameters, ``fn(x, params)``, traceable by JAX.

    Attributes:
        name: the name it was asked for by (``pressure``, ``distance:3,17``, ``f.py:spread``).
        fn: ``fn(x, params) -> scalar`` for positions ``x`` (N, d) and the parameter pytree.
        units: its units, in words (``energy``, ``energy / length^2``, ``length``).
    """

    name: str
    fn: Callable = field(repr=False)
    units: str = ""

    def __call__(self, x, params):
        return self.fn(x, params)


def energy(system: System) -> Observable:
    """E(x, θ)."""
    return Observable("energy", system.energy_fn, "energy")


def strained_energy(system: System, x, params, strain):
    """E of the pairs at ``x`` after the homogeneous deformation x ↦ (I + strain) x of positions
    and cell together; equal to E(x, θ) at ``strain = 0``. NaN where the neighbour list cannot
    hold the pairs at ``x``."""
    i, j, valid, overflow = candidate_pairs(system, x)
    vectors = jax.vmap(system.displacement)(x[i], x[j])
    vectors = vectors @ (jnp.eye(x.shape[1]) + strain).T
    r2 = jnp.where(valid, jnp.sum(vectors**2, axis=-1), 1.0)
    values = pair_values_at(system.potential, params, system.overridden, jnp.asarray(system.types), i, j)
    pair = system.potential.pair_fn(jnp.sqrt(r2), **values, **system.settings)
    total = jnp.sum(jnp.where(valid, pair, 0.0))
    return jnp.where(overflow, jnp.nan, total)


def _volume(system: System) -> float:
    if system.space_kind == "free":
        raise UserError("stress and pressure need a periodic cell; this system is a free cluster")
    return float(abs(np.linalg.det(system.cell)))


def stress_tensor(system: System, x, params):
    """The (d, d) virial stress (1/V) ∂E/∂ε at ε = 0, symmetrised (see the module docstring)."""
    d = x.shape[1]
    gradient = jax.grad(lambda e: strained_energy(system, x, params, e))(jnp.zeros((d, d)))
    return 0.5 * (gradient + gradient.T) / _volume(system)


def pressure(system: System) -> Observable:
    """P = −tr σ / d (positive for a compressed packing)."""
    _volume(system)
    d = system.dimension
    return Observable(
        "pressure", lambda x, params: -jnp.trace(stress_tensor(system, x, params)) / d, f"energy / length^{d}"
    )


def stress(system: System, component: str) -> Observable:
    """One component σ_ab of the virial stress, ``component`` = ``ab`` (``xx``, ``xy``, ...)."""
    d = system.dimension
    axes = AXES[:d]
    if len(component) != 2 or any(c not in axes for c in component):
        raise UserError(f"stress component {component!r}: give two of {', '.join(axes)} (stress:xy)")
    _volume(system)
    a, b = (axes.index(c) for c in component)
    return Observable(
        f"stress:{component}",
        lambda x, params: stress_tensor(system, x, params)[a, b],
        f"energy / length^{d}",
    )


def _atom_pair(system: System, kind: str, argument: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", argument)
    if match is None:
        raise UserError(f"{kind}:{argument}: give two atom indices, {kind}:I,J (0-based)")
    i, j = (int(v) for v in match.groups())
    n = system.n_particles
    for index in (i, j):
        if not 0 <= index < n:
            raise UserError(f"{kind}:{argument}: atom index {index} is out of range 0..{n - 1}")
    if i == j:
        raise UserError(f"{kind}:{argument}: the two atoms must differ")
    return i, j


def distance(system: System, i: int, j: int) -> Observable:
    """The minimum-image distance between particles ``i`` and ``j``."""
    metric = metric_from(system.displacement)
    return Observable(f"distance:{i},{j}", lambda x, params: metric(x[i], x[j]), "length")


def gap(system: System, i: int, j: int) -> Observable:
    """r_ij − σ_ij, σ_ij the pair value of the contact parameter (or of the range parameter)."""
    potential = system.potential
    key = potential.contact_parameter or potential.range_parameter
    metric = metric_from(system.displacement)
    types = jnp.asarray(system.types)

    def fn(x, params):
        sigma = pair_values_at(potential, params, system.overridden, types, jnp.array(i), jnp.array(j))[key]
        return metric(x[i], x[j]) - sigma

    return Observable(f"gap:{i},{j}", fn, "length")


def _load_user_function(spec: str) -> Callable:
    path_text, _, function = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"observable {spec!r}: no file {path_text}")
    module_name = f"mdsens_user_observable_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure of the user's file is a user error
        sys.modules.pop(module_name, None)
        raise UserError(f"observable {spec!r}: {path_text} fails to load: {_one_line(error)}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"observable {spec!r}: {path_text} has no function {function!r}")
    return fn


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def user_observable(system: System, spec: str) -> Observable:
    """``FILE.py:FUNCTION`` with ``FUNCTION(positions, system, params) -> scalar`` (see the
    module docstring); checked here by tracing it once at the system's positions.

    Raises:
        UserError: no such file or function, the file fails to import, or the function raises,
            does not return one real number, or cannot be differentiated when traced.
    """
    user = _load_user_function(spec)

    def fn(x, params):
        return user(x, system, params)

    x = jnp.asarray(system.positions)
    try:
        shape = jax.eval_shape(fn, x, system.params)
    except Exception as error:  # noqa: BLE001 - whatever the user's function raises
        raise UserError(f"observable {spec!r} raised {_one_line(error)}") from None
    if getattr(shape, "shape", None) != () or not jnp.issubdtype(shape.dtype, jnp.floating):
        raise UserError(
            f"observable {spec!r} returns {getattr(shape, 'shape', type(shape))}"
            f" {getattr(shape, 'dtype', '')}: it must return one real number (a scalar array)"
        )
    try:  # differentiated later: a function JAX cannot differentiate is the user's to fix
        jax.eval_shape(jax.grad(fn, argnums=(0, 1)), x, system.params)
    except Exception as error:  # noqa: BLE001 - whatever the user's function raises
        raise UserError(f"observable {spec!r} cannot be differentiated by JAX: {_one_line(error)}") from None
    return Observable(spec, fn, "user")


BUILT_IN = ("energy", "pressure", "stress:ab", "distance:I,J", "gap:I,J", "FILE.py:FUNCTION")


def parse_observable(system: System, spec: str) -> Observable:
    """The observable named ``spec`` (one of :data:`BUILT_IN`; see the module docstring).

    Raises:
        UserError: an unknown name, a bad atom index or stress component, stress or pressure of
            a free cluster, or a user observable that cannot be loaded or traced.
    """
    spec = spec.strip()
    if spec == "energy":
        return energy(system)
    if spec == "pressure":
        return pressure(system)
    kind, colon, argument = spec.partition(":")
    if colon and kind == "stress":
        return stress(system, argument.strip())
    if colon and kind in ("distance", "gap"):
        i, j = _atom_pair(system, kind, argument)
        return (distance if kind == "distance" else gap)(system, i, j)
    if colon and spec.rpartition(":")[0].endswith(".py"):
        return user_observable(system, spec)
    if spec.endswith(".py"):
        raise UserError(f"observable {spec!r}: name the function too, {spec}:FUNCTION")
    raise UserError(f"unknown observable {spec!r}; known: {', '.join(BUILT_IN)}")
