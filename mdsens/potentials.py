"""Pair potentials with named, differentiable parameters, per species and per pair.

A potential is one :class:`Potential` entry in :data:`POTENTIALS`: a pair function φ(r; p_ij)
and the specification of its parameters. Each parameter is either

* *per species* (``level="species"``): one value per species, combined into a pair value by a
  mixing rule (``arithmetic``: (a + b)/2, e.g. additive diameters and Lorentz's σ;
  ``geometric``: √(ab), Berthelot's ε), or
* *global* (``level="global"``): one value for every pair (an exponent, say),

and any pair may be overridden explicitly. Settings (cutoffs) are fixed numbers, not parameters.

The parameter pytree θ, passed at call time so one compiled energy serves every value, is::

    {"sigma": (S,) or (), ..., "pair": {"sigma": (S, S), ...}}

The pair value used for species (a, b) is ``pair[p][a, b]`` where the pair is overridden, and
``mix(p)[a, b] + pair[p][a, b]`` elsewhere, where ``pair[p]`` is zero: this makes every pair
value an independent parameter (``sigma.Ar-Kr``) that can be differentiated without touching
the species values.

Per-particle parameters are optional: ``θ["atom"][p]`` of shape (N,) holds an offset per particle
added to its species' value before mixing, so particles i and j interact with
``mix(p_{t_i} + δ_i, p_{t_j} + δ_j) + pair[p]`` (overridden pairs keep their own value). With the
offsets at zero the energy is unchanged, and its gradient with respect to them is the
derivative by each particle's own value (one diameter per particle). Only species-level
parameters have per-particle offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from mdsens.jaxmd import smap, space

PAIR = "pair"
ATOM = "atom"
EnergyFn = Callable[[Any, dict], Any]


@dataclass(frozen=True)
class Parameter:
    """One named parameter of a potential.

    Attributes:
        level: ``species`` (a value per species, mixed into pairs) or ``global``.
        mixing: ``arithmetic`` or ``geometric`` for species-level parameters.
        default: value used when a recipe gives none; ``None`` means it must be given (per
            species in ``[species.X]``, or for all species in ``[potential]``).
        doc: one line for the docs.
    """

    level: str
    mixing: str | None = None
    default: float | None = None
    doc: str = ""


@dataclass(frozen=True)
class Potential:
    """A registry entry: the pair function, its parameters and its fixed settings.

    ``pair_fn(r, **pair_values, **settings)`` is the energy of one pair at distance ``r`` (arrays
    broadcast), where ``pair_values`` maps each parameter name to its pair value.
    """

    name: str
    parameters: dict[str, Parameter]
    pair_fn: Callable
    doc: str
    settings: dict[str, float] = field(default_factory=dict)
    contact_parameter: str | None = None
    """Name of the parameter whose pair value is the contact distance of a finite-range
    repulsion (two particles touch when closer); ``None`` where contacts are not defined. Used
    to find rattlers (:mod:`mdsens.contacts`)."""
    stiffness: Callable[[dict], Any] | None = None
    """``stiffness(tables) -> (S, S)``: φ''(r) at each pair's minimum (ω² of a pair of unit
    masses), which sets the minimiser's default time steps
    (:func:`mdsens.recipe.scaled_time_steps`); ``None`` keeps JAX-MD's FIRE steps, which were
    chosen for soft spheres."""
    range_parameter: str = "sigma"
    """Name of the parameter whose pair value sets the interaction range: the range is its
    largest pair value times the ``r_cutoff`` setting (1 where the potential has none)."""

    def reach(self, tables: dict, settings: dict):
        """Interaction range: no pair interacts beyond it (``inf`` without a cutoff). Traceable."""
        return jnp.max(tables[self.range_parameter]) * settings.get("r_cutoff", 1.0)

    def non_smooth_radii(self, tables: dict, settings: dict) -> dict:
        """The (S, S) pair distances at which φ(r) is only C¹, by name: ``contact`` (a finite-range
        repulsion's contact distance), ``r_onset`` and ``r_cutoff`` (the switch's ends, times σ;
        none without a cutoff). A pair crossing one of them has no second derivative there."""
        radii = {} if self.contact_parameter is None else {"contact": tables[self.contact_parameter]}
        if np.isfinite(settings.get("r_cutoff", np.inf)):
            for key in ("r_onset", "r_cutoff"):
                radii[key] = tables[self.range_parameter] * settings[key]
        return radii


def _switch(r, sigma, onset: float, cutoff: float):
    """JAX-MD's smooth multiplicative cutoff (HOOMD-blue's XPLOR form), in units of each pair's σ.

    1 below ``onset·σ``, 0 beyond ``cutoff·σ``, C¹ in between; with ``cutoff = inf`` it is 1.
    """
    if np.isinf(cutoff):
        return 1.0
    r_onset, r_cutoff = onset * sigma, cutoff * sigma
    rc2, ro2, r2 = r_cutoff**2, r_onset**2, r**2
    inner = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r < r_onset, 1.0, jnp.where(r < r_cutoff, inner, 0.0))


def _positive(r):
    # r = 0 only on the diagonal (a particle with itself), which smap masks out; keeping the
    # value finite there keeps its (masked) gradient finite too.
    return jnp.where(r > 0, r, 1.0)


@jax.custom_jvp
def _power(u, a):
    """u ** a for u > 0, as u·u when every a is 2 (the harmonic default: XLA's pow costs as much
    as the rest of a force evaluation) and as exp(a log u) otherwise (four times faster than pow)."""
    return jax.lax.cond(jnp.all(a == 2.0), lambda: u * u, lambda: jnp.exp(a * jnp.log(u)))


def _power_jvp(primals, tangents):
    # Symbolic zeros skip the log when only positions move (forces, Hessian-vector products).
    (u, a), (du, da) = primals, tangents
    y = _power(u, a)
    out = jnp.zeros_like(y)
    if type(du) is not SymbolicZero:
        out = out + a * (y / u) * du
    if type(da) is not SymbolicZero:
        out = out + y * jnp.log(u) * da
    return y, out


_power.defjvp(_power_jvp, symbolic_zeros=True)


def _soft_sphere(r, diameter, epsilon, alpha):
    # JAX-MD's energy.soft_sphere, with a cheaper power and a safe one: (1 - r/σ) ≤ 0 is masked.
    u = 1.0 - r / diameter
    inside = u > 0
    return jnp.where(inside, epsilon / alpha * _power(jnp.where(inside, u, 1.0), alpha), 0.0)


def _lennard_jones(r, sigma, epsilon, r_onset, r_cutoff):
    r = _positive(r)
    x6 = (sigma / r) ** 6
    return 4.0 * epsilon * (x6 * x6 - x6) * _switch(r, sigma, r_onset, r_cutoff)


def _morse(r, sigma, epsilon, alpha, r_onset, r_cutoff):
    u = epsilon * (1.0 - jnp.exp(-alpha * (r - sigma))) ** 2 - epsilon
    return u * _switch(r, sigma, r_onset, r_cutoff)


POTENTIALS: dict[str, Potential] = {
    "soft_sphere": Potential(
        name="soft_sphere",
        parameters={
            "diameter": Parameter("species", "arithmetic", None, "particle diameter d; σ_ij = (d_i + d_j)/2"),
            "epsilon": Parameter("global", None, 1.0, "energy scale ε"),
            "alpha": Parameter("global", None, 2.0, "exponent α (2 harmonic, 2.5 Hertzian)"),
        },
        pair_fn=_soft_sphere,
        doc="U(r) = ε/α (1 − r/σ_ij)^α for r < σ_ij, 0 beyond (finite range, repulsive)",
        contact_parameter="diameter",
        range_parameter="diameter",
    ),
    "lennard_jones": Potential(
        name="lennard_jones",
        parameters={
            "sigma": Parameter("species", "arithmetic", None, "length σ (Lorentz: σ_ij = (σ_i + σ_j)/2)"),
            "epsilon": Parameter("species", "geometric", None, "well depth ε (Berthelot: √(ε_i ε_j))"),
        },
        pair_fn=_lennard_jones,
        doc="U(r) = 4ε[(σ/r)^12 − (σ/r)^6] × S(r), S switching smoothly from 1 at r_onset·σ_ij "
        "to 0 at r_cutoff·σ_ij (no energy shift; r_cutoff = inf: no cutoff)",
        settings={"r_onset": 2.0, "r_cutoff": 2.5},
        # At r = 2^(1/6) σ: 4ε(156 σ¹²/r¹⁴ − 42 σ⁶/r⁸) = 72 ε / r².
        stiffness=lambda t: 72.0 * np.asarray(t["epsilon"]) / (2 ** (1 / 3) * np.asarray(t["sigma"]) ** 2),
    ),
    "morse": Potential(
        name="morse",
        parameters={
            "sigma": Parameter("species", "arithmetic", None, "equilibrium distance r₀ (arithmetic mixing)"),
            "epsilon": Parameter("species", "geometric", None, "well depth D₀ (geometric mixing)"),
            "alpha": Parameter("global", None, 5.0, "stiffness a"),
        },
        pair_fn=_morse,
        doc="U(r) = ε[(1 − e^{−α(r − σ)})² − 1] × S(r), S as for lennard_jones",
        settings={"r_onset": 2.0, "r_cutoff": 2.5},
        stiffness=lambda t: 2.0 * np.asarray(t["epsilon"]) * np.asarray(t["alpha"]) ** 2,
    ),
}


def mix(rule: str | None, values):
    """Pair matrix (S, S) from per-species values (rule) or a global value (broadcast)."""
    if rule == "arithmetic":
        return 0.5 * (values[:, None] + values[None, :])
    if rule == "geometric":
        return jnp.sqrt(values[:, None] * values[None, :])
    return values


def mix_pairs(rule: str | None, a, b):
    """The pair value of two values ``a``, ``b`` (arrays of the same shape) by a mixing rule."""
    if rule == "arithmetic":
        return 0.5 * (a + b)
    if rule == "geometric":
        return jnp.sqrt(a * b)
    raise ValueError(f"no per-particle values for a parameter without a mixing rule ({rule!r})")


def pair_tables(potential: Potential, params: dict, overridden: dict[str, np.ndarray], n_species: int):
    """Pair value matrices (S, S) of every parameter (see the module docstring), per-particle
    offsets not included (see :func:`bounding_tables`)."""
    tables = {}
    for name, spec in potential.parameters.items():
        base = jnp.broadcast_to(mix(spec.mixing, params[name]), (n_species, n_species))
        offset = params[PAIR][name]
        tables[name] = jnp.where(overridden[name], offset, base + offset)
    return tables


def bounding_tables(potential: Potential, params: dict, overridden: dict[str, np.ndarray], n_species: int):
    """:func:`pair_tables` where every species value is raised by the largest per-particle offset:
    no two particles have a larger pair value (both mixing rules increase with their arguments).
    The same as :func:`pair_tables` without per-particle offsets. Used for interaction ranges."""
    offsets = params.get(ATOM, {})
    if not offsets:
        return pair_tables(potential, params, overridden, n_species)
    raised = {**params, **{k: params[k] + jnp.maximum(jnp.max(v), 0.0) for k, v in offsets.items()}}
    return pair_tables(potential, raised, overridden, n_species)


def pair_values_at(potential: Potential, params: dict, overridden, types, i, j) -> dict:
    """Every parameter's value for the pairs (i[k], j[k]) (index arrays of any one shape),
    per-particle offsets included; ``types`` is the (N,) species index array. Indices out of
    range (padding) give some pair's values: mask them."""
    n_species = len(next(iter(overridden.values())))
    ti, tj = types[i], types[j]
    values = {k: t[ti, tj] for k, t in pair_tables(potential, params, overridden, n_species).items()}
    for name, offsets in params.get(ATOM, {}).items():
        own = params[name]
        mixed = mix_pairs(potential.parameters[name].mixing, own[ti] + offsets[i], own[tj] + offsets[j])
        own_pair = jnp.asarray(overridden[name])[ti, tj]
        values[name] = jnp.where(own_pair, values[name], mixed + params[PAIR][name][ti, tj])
    return values


def build_energy(potential: Potential, metric, types: np.ndarray, overridden, settings: dict):
    """``energy_fn(x, params)``: the sum of φ over all pairs (dense N × N; no neighbour list)."""
    n_species = int(types.max()) + 1
    pair_fn = potential.pair_fn

    def pair_energy(r, **values):
        return pair_fn(r, **values, **settings)

    # Species blocks with one scalar per parameter each (JAX-MD's static-species path): no
    # N × N parameter arrays. The (S, S) tables are passed at call time, so smap.pair must be
    # built without ignore_unused_parameters, which would drop them and silently use defaults.
    pair = smap.pair(pair_energy, metric, species=np.asarray(types))
    # Per-particle values have no species blocks: every pair once, from a static index list
    # (systems without a neighbour list are small, so N(N − 1)/2 pairs fit).
    i, j = np.triu_indices(len(types), k=1)
    metric_pairs = jax.vmap(metric)
    types = jnp.asarray(types)

    def energy_fn(x, params):
        if params.get(ATOM):
            values = pair_values_at(potential, params, overridden, types, i, j)
            return jnp.sum(pair_fn(_positive(metric_pairs(x[i], x[j])), **values, **settings))
        return pair(x, **pair_tables(potential, params, overridden, n_species))

    return energy_fn


def build_pair_energy(potential: Potential, displacement, types: np.ndarray, overridden, settings: dict):
    """``energy_fn(x, params, pairs)``: the sum of φ over the listed pairs.

    ``pairs`` is a (2, M) integer array, each pair once, unused slots padded with N (JAX-MD's
    ordered-sparse neighbour list). Pairs beyond their interaction range contribute 0, so the
    list may hold more pairs than interact.
    """
    types = jnp.asarray(types)
    pair_fn = potential.pair_fn
    displacement_pairs = jax.vmap(displacement)

    def energy_fn(x, params, pairs):
        i, j = pairs
        valid = i < x.shape[0]
        dr = displacement_pairs(x[i], x[j])
        # Padded slots gather the last particle twice (r = 0); a safe r keeps their masked
        # gradient finite.
        r2 = jnp.where(valid, jnp.sum(dr**2, axis=-1), 1.0)
        r = jnp.sqrt(r2)
        values = pair_values_at(potential, params, overridden, types, i, j)
        return jnp.sum(jnp.where(valid, pair_fn(r, **values, **settings), 0.0))

    return energy_fn


def metric_from(displacement):
    """The distance function of a JAX-MD displacement function."""
    return space.canonicalize_displacement_or_metric(displacement)
