"""Parameters addressed by name: ``diameter`` (every species), ``diameter.B`` (one species),
``sigma.Ar-Kr`` (one pair), ``epsilon`` (global), ``diameter[17]`` (particle 17's own value,
once per-particle offsets are in θ: :func:`with_per_particle`); their values and unit
directions in θ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import UserError
from mdsens.potentials import ATOM, PAIR
from mdsens.system import System


def parameter_names(system: System) -> list[str]:
    """Every independent scalar parameter of the system, e.g. ``diameter.A``, ``epsilon``.

    Species-level parameters give one name per species (``sigma.Ar``), global ones their bare
    name (``alpha``), and explicitly set pair values one per pair (``sigma.Ar-Kr``).
    """
    names = []
    for key, spec in system.potential.parameters.items():
        names += [f"{key}.{s}" for s in system.species] if spec.level == "species" else [key]
        a, b = np.nonzero(np.triu(system.overridden[key]))
        names += [f"{key}.{system.species[i]}-{system.species[j]}" for i, j in zip(a, b, strict=True)]
    return names


def per_particle_keys(system: System, selection) -> list[str]:
    """The species-level parameters named in ``selection`` (``diameter.B`` → ``diameter``), in
    order: those that :func:`with_per_particle` makes one parameter per particle.

    Raises:
        UserError: a name is unknown, or none of them is per species.
    """
    keys = []
    for name in expand_parameters(system, selection):
        key = name.partition(".")[0]
        if system.potential.parameters[key].level == "species" and key not in keys:
            keys.append(key)
    if not keys:
        per_species = [k for k, v in system.potential.parameters.items() if v.level == "species"]
        raise UserError(
            f"per-particle values exist for per-species parameters only ({', '.join(per_species)});"
            f" none is among {', '.join(selection)}"
        )
    return keys


def with_per_particle(system: System, params: dict, keys) -> dict:
    """``params`` with a per-particle offset, zero, for each species-level parameter in ``keys``
    (see :mod:`mdsens.potentials`): the energy is unchanged and ``diameter[i]`` becomes a
    parameter. Existing offsets are kept."""
    atom = dict(params.get(ATOM, {}))
    for key in keys:
        atom.setdefault(key, jnp.zeros(system.n_particles, dtype=jnp.float64))
    return {**params, ATOM: atom}


def per_particle_name(key: str, index: int) -> str:
    """The name of particle ``index``'s own value of ``key``: ``diameter[17]``."""
    return f"{key}[{index}]"


def _particle(system: System, name: str) -> tuple[str, int] | None:
    """(parameter, particle index) of a per-particle name ``diameter[17]``; None for other names."""
    if not name.endswith("]") or "[" not in name:
        return None
    key, _, index = name[:-1].partition("[")
    spec = system.potential.parameters.get(key)
    if spec is None or spec.level != "species":
        raise UserError(f"{name!r}: per-particle values exist for per-species parameters only")
    if not index.isdigit() or int(index) >= system.n_particles:
        raise UserError(f"{name!r}: the particle index must be in 0..{system.n_particles - 1}")
    return key, int(index)


def _address(system: System, name: str) -> tuple[str, str, tuple[int, ...]]:
    """(parameter, level, species indices) of a scalar name: ``epsilon``, ``sigma.Ar``, ``sigma.Ar-Kr``."""
    key, _, rest = name.partition(".")
    spec = system.potential.parameters.get(key)
    if spec is None:
        raise UserError(
            f"unknown parameter {name!r}; {system.potential.name} has: "
            + ", ".join(system.potential.parameters)
        )
    if not rest:
        if spec.level == "species":
            raise UserError(f"{key!r} is per species: name one ({key}.{system.species[0]}) or expand it")
        return key, "global", ()
    parts = rest.split("-")
    if any(p not in system.species for p in parts) or len(parts) > 2:
        raise UserError(f"unknown species in parameter {name!r}; species: {', '.join(system.species)}")
    indices = tuple(sorted(system.species.index(p) for p in parts))
    if len(indices) == 1:
        if spec.level != "species":
            raise UserError(f"{key!r} is one value for all species; use {key!r} or a pair {key}.A-B")
        return key, "species", indices
    return key, "pair", indices


def _canonical(system: System, name: str) -> str:
    key, level, indices = _address(system, name)
    if level == "pair":
        return f"{key}.{system.species[indices[0]]}-{system.species[indices[1]]}"
    return name


def expand_parameters(system: System, selection: list[str] | tuple[str, ...]) -> list[str]:
    """Check every name and expand a bare parameter name to all its independent entries.

    ``diameter`` → ``diameter.A``, ``diameter.B`` (and set pairs); ``sigma.Kr-Ar`` →
    ``sigma.Ar-Kr`` (species order). Keeps order, drops repeats.

    Raises:
        UserError: an unknown parameter or species.
    """
    known = parameter_names(system)
    out: list[str] = []
    for name in selection:
        if "." not in name and name in system.potential.parameters:
            group = [n for n in known if n == name or n.startswith(name + ".")]
        else:
            group = [_canonical(system, name)]
        out += [n for n in group if n not in out]
    return out


def unit_tangent(system: System, name: str, params: dict | None = None) -> dict:
    """A tangent pytree shaped like ``params`` (default ``system.params``): 1 at parameter
    ``name``, 0 elsewhere. A per-particle name needs ``params`` with its offsets."""
    params = system.params if params is None else params
    tangent = jax.tree_util.tree_map(jnp.zeros_like, params)
    particle = _particle(system, name)
    if particle is not None:
        key, index = particle
        if key not in params.get(ATOM, {}):
            raise UserError(f"{name!r} needs per-particle {key} values in θ (with_per_particle)")
        tangent[ATOM] = {**tangent[ATOM], key: tangent[ATOM][key].at[index].set(1.0)}
        return tangent
    key, level, indices = _address(system, name)
    if level == "global":
        tangent[key] = jnp.ones_like(tangent[key])
    elif level == "species":
        tangent[key] = tangent[key].at[indices[0]].set(1.0)
    else:
        i, j = indices
        tangent[PAIR] = {**tangent[PAIR], key: tangent[PAIR][key].at[i, j].set(1.0).at[j, i].set(1.0)}
    return tangent


def directional(tree, tangent) -> float:
    """Σ tree · tangent over the pytree: a gradient's component along a parameter direction."""
    products = jax.tree_util.tree_map(lambda a, b: jnp.sum(a * b), tree, tangent)
    return float(jax.tree_util.tree_reduce(lambda a, b: a + b, products))


def parameter_value(system: System, params: dict, name: str) -> float:
    """The value of the scalar parameter ``name`` in ``params`` (a pair's value after mixing,
    a particle's own value with its offset)."""
    particle = _particle(system, name)
    if particle is not None:
        key, index = particle
        offset = params.get(ATOM, {}).get(key)
        own = params[key][system.types[index]]
        return float(own if offset is None else own + offset[index])
    key, level, indices = _address(system, name)
    if level == "pair":
        return float(system.pair_values(params)[key][indices[0], indices[1]])
    value = params[key]
    return float(value[indices[0]] if level == "species" else value)
