"""System recipes: TOML files that say how to build a system, with defaults and overrides.

A recipe names the source of positions (a structure file, a lattice, or a random box: dimension,
particle count, species fractions, packing fraction or side), the potential and its parameters
(per species, global, per pair), the minimiser and its tolerances, the linear solver of the
sensitivity stage, how pairs are found (``[neighbors]``: all pairs or a neighbour list, see
:mod:`mdsens.neighbors`), and the seed. :func:`load_recipe` finds a recipe by
name (the files shipped in ``systems/``) or by path, :func:`apply_overrides` applies
``KEY=VALUE`` strings with dotted keys, and :func:`resolve` fills in every default and validates
the result, so that the resolved recipe stored with a run reproduces it exactly.
"""

from __future__ import annotations

import copy
import importlib.resources
import math
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from mdsens import neighbors
from mdsens import validate as check
from mdsens.errors import UserError
from mdsens.potentials import POTENTIALS

Recipe = dict[str, Any]

MINIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "fire": {"fmax": 1e-12, "max_steps": 100_000, "dt_start": 0.1, "dt_max": 0.4},
    # FIRE 2.0 (mdsens/fire2.py). LAMMPS's dt_min (0.02 dt_start), dmax, f_inc, f_dec, f_alpha;
    # measured on soft-sphere packings, JAX-MD's dt_max, alpha_start and delay instead of LAMMPS's
    # 10 dt_start, 0.25 and 20 (see the module). newton_switch > 0 finishes with Newton-CG below
    # that max|F| (0: never).
    "fire2": {
        "fmax": 1e-12,
        "max_steps": 100_000,
        "dt_start": 0.1,
        "dt_max": 0.4,
        "dt_min": 0.002,
        "dmax": 0.1,
        "n_delay": 5,
        "f_inc": 1.1,
        "f_dec": 0.5,
        "alpha_start": 0.1,
        "f_alpha": 0.99,
        "newton_switch": 0.0,
    },
    "gradient_descent": {"fmax": 1e-12, "max_steps": 1_000_000, "step_size": 0.05},
}
TIME_STEPS = ("dt_start", "dt_max", "dt_min")
"""The minimisers' time-step settings, scaled together by :func:`scaled_time_steps`."""
STEPS_PER_VIBRATION = 0.05 * math.sqrt(72 / 2 ** (1 / 3))
"""ω × the scale of :func:`scaled_time_steps`: the shipped Lennard-Jones recipes' steps
(``dt_start = 0.005``, ``dt_max = 0.02``, 1/20 of FIRE's defaults) at σ = ε = 1, where ω² = 72/2^(1/3)."""
SENSITIVITY_DEFAULTS: dict[str, Any] = {"solver": "cg", "tol": 1e-12, "maxiter": 0}
SOLVERS = ("cg", "dense")
TOP_LEVEL = {"name": "run", "description": "", "seed": 0}
# Optional: positions from a file (structure, structure_index), or random (dimension,
# n_particles); rattle displaces every initial position by a Gaussian of this width (seeded).
OPTIONAL_TOP_LEVEL = ("dimension", "n_particles", "structure", "structure_index", "rattle")
LATTICES = {"fcc": 4, "bcc": 2, "sc": 1}
"""Lattice kinds and their sites per cubic cell."""
LATTICE_DEFAULTS: dict[str, Any] = {
    "kind": "fcc",
    "a": 1.5496,
    "symbol": "A",
    "repeat": [3, 3, 3],
    "vacancies": [],
}


def available_recipes() -> list[str]:
    """Names of the recipes shipped with mdsens."""
    files = importlib.resources.files("mdsens.systems").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read a recipe by shipped name (``binary-packing``) or by path to a TOML file.

    A relative ``structure`` path in the recipe is taken relative to the recipe's directory and
    made absolute, so the recipe means the same from any working directory.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or path.exists() or "/" in text:
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
    else:
        path = Path(str(importlib.resources.files("mdsens.systems"))) / f"{text}.toml"
        if not path.is_file():
            raise UserError(
                f"unknown system {text!r}; shipped systems: {', '.join(available_recipes())}"
                " (or give a path to a .toml recipe)"
            )
    try:
        recipe = tomllib.loads(path.read_bytes().decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"cannot read recipe {text}: {error}") from None
    if isinstance(recipe.get("structure"), str):
        recipe["structure"] = str((path.resolve().parent / recipe["structure"]).resolve())
    return recipe


def _prune_parameters(recipe: Recipe, potential: str) -> None:
    """Drop species and pair values of parameters that ``potential`` does not have."""
    known = POTENTIALS[potential].parameters if isinstance(potential, str) and potential in POTENTIALS else {}
    for section, keep in (("species", {"fraction"}), ("pairs", set())):
        for entry in recipe.get(section, {}).values():
            if isinstance(entry, dict):
                for key in [k for k in entry if k not in known and k not in keep]:
                    del entry[key]


def _potential_defaults() -> dict[str, dict[str, float]]:
    return {name: {**p.parameters, **p.settings} for name, p in POTENTIALS.items()}


def _parse_value(text: str) -> Any:
    # A TOML value (1e-10, true, "fire", [1, 2]); anything else is taken as a bare string.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """Return a copy of ``recipe`` with ``KEY=VALUE`` overrides applied (dotted keys).

    Keys must name a field the recipe has or may have (checked by :func:`resolve`). Setting
    ``box.side`` drops ``box.packing_fraction`` and vice versa, since a box has one of them;
    setting ``minimizer.name`` or ``potential.name`` drops the settings the new method lacks.
    A ``description`` that the overrides do not replace gets the changed values appended, since
    it may state the values they change ("128 particles").
    """
    recipe = copy.deepcopy(recipe)
    changes = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"bad --set {item!r}: expected KEY=VALUE, e.g. species.B.diameter=0.7")
        *parents, leaf = key.split(".")
        table = recipe
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise UserError(f"bad --set key {key!r}: {part!r} is not a table")
        value = _parse_value(raw.strip())
        if key not in ("name", "description") and (leaf not in table or table[leaf] != value):
            changes.append(f"{key} = {raw.strip()}")
        table[leaf] = value
        if parents == ["box"]:
            other = {"side": "packing_fraction", "packing_fraction": "side"}.get(leaf)
            table.pop(other, None)
        elif key in ("minimizer.name", "potential.name") and isinstance(value, str):
            # A new method keeps only the settings it understands (the rest take its defaults);
            # a name that is not a string is left for resolve() to refuse.
            registry = MINIMIZER_DEFAULTS if parents == ["minimizer"] else _potential_defaults()
            allowed = registry.get(value, {})
            for stale in [k for k in table if k != "name" and k not in allowed]:
                del table[stale]
            if parents == ["potential"]:
                _prune_parameters(recipe, value)
    described = recipe.get("description")
    if (
        changes
        and isinstance(described, str)
        and described
        and not any(item.partition("=")[0].strip() == "description" for item in overrides)
    ):
        recipe["description"] = f"{described}; but with {', '.join(changes)}"
    return recipe


def _check_keys(table: dict, allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown key {where}{unknown[0]!r} in recipe; allowed here: {', '.join(sorted(allowed))}"
        )


def _check_species_name(name: str) -> None:
    # "." separates a parameter from its species and "-" the two species of a pair.
    if not name or "." in name or "-" in name or " " in name or not name.isprintable():
        raise UserError(f"bad species name {name!r}: use letters, digits and '_' only")


def _resolve_box(box: dict, dimension: int) -> dict:
    box = dict(box)
    _check_keys(box, {"packing_fraction", "side"}, "box.")
    if len(box) != 1:
        raise UserError("recipe table [box] needs exactly one of 'packing_fraction' or 'side'")
    if "packing_fraction" in box:
        box["packing_fraction"] = check.real(
            box["packing_fraction"], "box.packing_fraction", *check.PACKING_FRACTIONS
        )
    elif isinstance(box["side"], list):
        if len(box["side"]) != dimension:
            raise UserError(f"recipe key 'box.side' needs {dimension} lengths, got {box['side']}")
        box["side"] = [check.scale(v, "box.side") for v in box["side"]]
    else:
        box["side"] = check.scale(box["side"], "box.side")
    return box


def _resolve_lattice(lattice: dict) -> dict:
    _check_keys(lattice, LATTICE_DEFAULTS, "lattice.")
    out = {**LATTICE_DEFAULTS, **lattice}
    out["kind"] = check.choice(out["kind"], "lattice.kind", tuple(LATTICES))
    out["a"] = check.scale(out["a"], "lattice.a")
    _check_species_name(check.text(out["symbol"], "lattice.symbol"))
    repeat = out["repeat"]
    if not (isinstance(repeat, list) and len(repeat) == 3):
        raise UserError(f"recipe key 'lattice.repeat' must be 3 integers, got {repeat!r}")
    out["repeat"] = [check.integer(n, "lattice.repeat", 1, check.MAX_PARTICLES) for n in repeat]
    sites = LATTICES[out["kind"]] * math.prod(out["repeat"])
    if sites > check.MAX_PARTICLES:
        raise UserError(
            f"lattice.repeat {out['repeat']} makes {sites} sites, more than MAX_PARTICLES ="
            f" {check.MAX_PARTICLES} (what fits in memory)"
        )
    if not isinstance(out["vacancies"], list):
        raise UserError("recipe key 'lattice.vacancies' must be a list of site indices")
    out["vacancies"] = [
        check.integer(n, "lattice.vacancies", 0, sites - 1, " (the last site)") for n in out["vacancies"]
    ]
    return out


def _table(recipe: Recipe, key: str) -> dict:
    value = recipe.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"recipe key {key!r} must be a table")
    return value


def _resolve_top_level(recipe: Recipe, out: Recipe) -> None:
    """Name, description, seed, rattle and the source of positions, checked in ``out``."""
    out["name"] = check.run_name(out["name"])
    out["description"] = check.text(out["description"], "description")
    out["seed"] = check.integer(out["seed"], "seed", 0, check.SEED_LIMIT - 1, " (2**32 - 1)")
    out["rattle"] = check.real(out.get("rattle", 0.0), "rattle", 0.0, check.LARGEST)
    sources = [key for key in ("structure", "lattice", "box") if key in recipe]
    if len(sources) != 1:
        raise UserError(
            "a recipe needs exactly one source of positions: 'structure' (a file), [lattice] or [box]"
            + (f"; it has {', '.join(sources)}" if sources else "")
        )
    # A value for another source of positions would be ignored: refuse it instead.
    applies = {"structure": {"structure_index"}, "lattice": set(), "box": {"dimension", "n_particles"}}
    for key in ("structure_index", "dimension", "n_particles"):
        if key in out and key not in applies[sources[0]]:
            raise UserError(f"recipe key {key!r} does not apply to positions from {sources[0]!r}")
    if "structure" in recipe:
        if not isinstance(recipe["structure"], str) or not recipe["structure"]:
            raise UserError("recipe key 'structure' must be a file path")
        index = out.get("structure_index", -1)
        out["structure_index"] = check.integer(index, "structure_index", -check.MAX_INDEX, check.MAX_INDEX)
    elif "lattice" in recipe:
        out["lattice"] = _resolve_lattice(_table(recipe, "lattice"))
    else:
        out["dimension"] = check.integer(out.get("dimension", 2), "dimension", 2, 3)
        out["n_particles"] = check.integer(
            out.get("n_particles", 0),
            "n_particles",
            1,
            check.MAX_PARTICLES,
            " (MAX_PARTICLES: what fits in memory)",
        )
        out["box"] = _resolve_box(_table(recipe, "box"), out["dimension"])


def _resolve_potential(recipe: Recipe, out: Recipe):
    """The potential, its settings and every parameter value (species, global, pairs)."""
    potential = dict(_table(recipe, "potential"))
    name = check.choice(potential.pop("name", "soft_sphere"), "potential", sorted(POTENTIALS))
    spec = POTENTIALS[name]
    _check_keys(potential, set(spec.parameters) | set(spec.settings), "potential.")
    out["potential"] = {"name": name}
    for key, default in spec.settings.items():
        # A cutoff may be infinite (no cutoff at all); every other setting is finite.
        value = check.scale(potential.get(key, default), f"potential.{key}", infinite=key == "r_cutoff")
        out["potential"][key] = value
    if "r_onset" in spec.settings and not out["potential"]["r_onset"] < out["potential"]["r_cutoff"]:
        raise UserError(
            f"potential.r_onset ({out['potential']['r_onset']:g}) must be below potential.r_cutoff"
            f" ({out['potential']['r_cutoff']:g}): the switch runs from one to the other"
        )
    for key, parameter in spec.parameters.items():
        value = potential.get(key, parameter.default)
        if value is not None:
            out["potential"][key] = check.scale(value, f"potential.{key}")

    species_keys = {"fraction"} | {k for k, p in spec.parameters.items() if p.level == "species"}
    out["species"] = {}
    for species, entry in _table(recipe, "species").items():
        _check_species_name(species)
        if not isinstance(entry, dict):
            raise UserError(f"recipe key 'species.{species}' must be a table")
        _check_keys(entry, species_keys, f"species.{species}.")
        out["species"][species] = {
            k: (check.fraction if k == "fraction" else check.scale)(v, f"species.{species}.{k}")
            for k, v in entry.items()
        }
    if "box" in out:
        if not out["species"]:
            raise UserError("a recipe with random positions needs at least one [species.NAME] table")
        for species, entry in out["species"].items():
            if "fraction" not in entry:
                raise UserError(f"recipe needs species.{species}.fraction")

    out["pairs"] = {}
    for pair, entry in _table(recipe, "pairs").items():
        names = pair.split("-")
        if len(names) != 2 or not all(names):
            raise UserError(f"bad pair name {pair!r} in [pairs]: expected 'A-B' (two species names)")
        if not isinstance(entry, dict):
            raise UserError(f"recipe key 'pairs.{pair}' must be a table")
        _check_keys(entry, spec.parameters, f"pairs.{pair}.")
        out["pairs"][pair] = {k: check.scale(v, f"pairs.{pair}.{k}") for k, v in entry.items()}


def _minimizer_value(key: str, value: Any) -> Any:
    """One checked value of the ``minimizer`` table."""
    where = f"minimizer.{key}"
    if key == "fmax":
        return check.tolerance(value, where)
    if key == "max_steps":
        return check.integer(value, where, 1, check.MAX_STEPS)
    if key == "n_delay":
        return check.integer(value, where, 0, check.MAX_STEPS)
    if key == "f_inc":
        return check.real(value, where, 1.0, 10.0)
    if key in ("f_dec", "alpha_start", "f_alpha"):
        return check.fraction(value, where)
    if key == "dmax":  # inf: no limit
        return check.scale(value, where, infinite=True)
    if key == "newton_switch":  # 0: no Newton finish
        return check.real(value, where, 0.0, check.LARGEST)
    return check.scale(value, where)  # time steps and step sizes


def _resolve_methods(recipe: Recipe, out: Recipe) -> None:
    """The minimiser, the sensitivity solver and the neighbour-list settings."""
    minimizer = dict(_table(recipe, "minimizer"))
    name = check.choice(minimizer.pop("name", "fire"), "minimizer", tuple(MINIMIZER_DEFAULTS))
    defaults = MINIMIZER_DEFAULTS[name]
    _check_keys(minimizer, defaults, "minimizer.")
    out["minimizer"] = {"name": name}
    for key, default in defaults.items():
        out["minimizer"][key] = _minimizer_value(key, minimizer.get(key, default))
    if name == "fire2":
        steps = out["minimizer"]
        if not steps["dt_min"] <= steps["dt_start"] <= steps["dt_max"]:
            raise UserError(
                "minimizer time steps must satisfy dt_min <= dt_start <= dt_max, got"
                f" {steps['dt_min']:g}, {steps['dt_start']:g}, {steps['dt_max']:g}"
            )

    sensitivity = {**SENSITIVITY_DEFAULTS, **_table(recipe, "sensitivity")}
    _check_keys(sensitivity, SENSITIVITY_DEFAULTS, "sensitivity.")
    sensitivity["solver"] = check.choice(sensitivity["solver"], "sensitivity.solver", SOLVERS)
    sensitivity["tol"] = check.tolerance(sensitivity["tol"], "sensitivity.tol")
    # 0 means 10 × the number of degrees of freedom.
    sensitivity["maxiter"] = check.integer(sensitivity["maxiter"], "sensitivity.maxiter", 0, check.MAX_STEPS)
    out["sensitivity"] = sensitivity

    table = {**neighbors.DEFAULTS, **_table(recipe, "neighbors")}
    _check_keys(table, neighbors.DEFAULTS, "neighbors.")
    table["mode"] = check.choice(table["mode"], "neighbors.mode", neighbors.MODES)
    # skin and margin are fractions of a cutoff; capacity multiplies the pairs found.
    table["skin"] = check.real(table["skin"], "neighbors.skin", 0.0, 10.0, low_open=True)
    table["margin"] = check.real(table["margin"], "neighbors.margin", 0.0, 10.0, low_open=True)
    table["capacity"] = check.real(table["capacity"], "neighbors.capacity", 1.0, 100.0)
    out["neighbors"] = table


def scaled_time_steps(minimizer: dict, given: set[str], omega: float) -> dict:
    """The ``minimizer`` table with its default time steps fitted to the fastest pair vibration
    ω (of unit masses at a pair's minimum): each multiplied by :data:`STEPS_PER_VIBRATION` / ω.

    The defaults of :data:`MINIMIZER_DEFAULTS` (JAX-MD's FIRE steps) suit harmonic soft spheres;
    a Lennard-Jones or Morse wall stiffens under compression and needs about 20× smaller steps at
    σ = ε = 1, and steps in proportion to σ/√ε in other units. Steps the recipe sets (``given``,
    any of :data:`TIME_STEPS`) are its own: then none is changed.
    """
    if given & set(TIME_STEPS) or not (math.isfinite(omega) and omega > 0):
        return minimizer
    scale = STEPS_PER_VIBRATION / omega
    # Six digits: the recipe stored with a run reads as a choice, not as round-off.
    return {k: float(f"{v * scale:.6g}") if k in TIME_STEPS else v for k, v in minimizer.items()}


def resolve(recipe: Recipe) -> Recipe:
    """Fill in defaults and validate; the result is complete and reproduces the run exactly.

    Positions come from exactly one source: a ``structure`` file (any format ``ase.io.read``
    reads), a ``[lattice]``, or random positions in a ``[box]`` (with ``n_particles`` and species
    fractions). Every value is checked for type, finiteness and range (:mod:`mdsens.validate`)
    before any array is built. Whether every species has every parameter is checked when the
    system is built, since a structure file decides which species there are.

    Raises:
        UserError: unknown key, missing field, wrong type or out-of-range value.
    """
    sections = {"box", "lattice", "species", "pairs", "potential", "minimizer", "sensitivity", "neighbors"}
    _check_keys(recipe, set(TOP_LEVEL) | set(OPTIONAL_TOP_LEVEL) | sections, "")
    out: Recipe = {**TOP_LEVEL, **{k: v for k, v in recipe.items() if k not in sections}}
    _resolve_top_level(recipe, out)
    _resolve_potential(recipe, out)
    _resolve_methods(recipe, out)
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML text (what ``RUN/system.toml`` holds)."""
    header = "# Resolved mdsens recipe: `mdsens relax --system THIS_FILE` reproduces the run.\n"
    return header + tomli_w.dumps(recipe)
