"""System recipes: TOML files that say how to build a system, with defaults and overrides.

A recipe names the dimension, particle count, species (fraction and diameter each), the box
(packing fraction or side), the potential and its parameters, the minimiser and its tolerances,
the linear solver of the sensitivity stage, and the seed. :func:`load_recipe` finds a recipe by
name (the files shipped in ``systems/``) or by path, :func:`apply_overrides` applies
``KEY=VALUE`` strings with dotted keys, and :func:`resolve` fills in every default and validates
the result, so that the resolved recipe stored with a run reproduces it exactly.
"""

from __future__ import annotations

import copy
import importlib.resources
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from mdsens.errors import UserError
from mdsens.potentials import POTENTIALS

Recipe = dict[str, Any]

MINIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "fire": {"fmax": 1e-12, "max_steps": 100_000, "dt_start": 0.1, "dt_max": 0.4},
    "gradient_descent": {"fmax": 1e-12, "max_steps": 1_000_000, "step_size": 0.05},
}
SENSITIVITY_DEFAULTS: dict[str, Any] = {"solver": "cg", "tol": 1e-12, "maxiter": 0}
SOLVERS = ("cg", "dense")
TOP_LEVEL = {"name": "", "description": "", "dimension": 2, "n_particles": 0, "seed": 0}


def available_recipes() -> list[str]:
    """Names of the recipes shipped with mdsens."""
    files = importlib.resources.files("mdsens.systems").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read a recipe by shipped name (``binary-packing``) or by path to a TOML file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or path.exists() or "/" in text:
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        source = path.read_bytes()
    else:
        resource = importlib.resources.files("mdsens.systems") / f"{text}.toml"
        if not resource.is_file():
            raise UserError(
                f"unknown system {text!r}; shipped systems: {', '.join(available_recipes())}"
                " (or give a path to a .toml recipe)"
            )
        source = resource.read_bytes()
    try:
        return tomllib.loads(source.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read recipe {text}: {error}") from None


def _potential_defaults() -> dict[str, dict[str, float]]:
    return {name: potential.defaults for name, potential in POTENTIALS.items()}


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
    """
    recipe = copy.deepcopy(recipe)
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
        table[leaf] = _parse_value(raw.strip())
        if parents == ["box"]:
            other = {"side": "packing_fraction", "packing_fraction": "side"}.get(leaf)
            table.pop(other, None)
        elif key in ("minimizer.name", "potential.name"):
            # A new method keeps only the settings it understands (the rest take its defaults).
            registry = MINIMIZER_DEFAULTS if parents == ["minimizer"] else _potential_defaults()
            allowed = registry.get(table[leaf], {})
            for stale in [k for k in table if k != "name" and k not in allowed]:
                del table[stale]
    return recipe


def _check_keys(table: dict, allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown key {where}{unknown[0]!r} in recipe; allowed here: {', '.join(sorted(allowed))}"
        )


def _number(value: Any, key: str, *, integer: bool = False, positive: bool = True) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(
            f"recipe key {key!r} must be {'an integer' if integer else 'a number'}, got {value!r}"
        )
    if positive and value <= 0:
        raise UserError(f"recipe key {key!r} must be positive, got {value!r}")
    return value if integer else float(value)


def _table(recipe: Recipe, key: str) -> dict:
    value = recipe.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"recipe key {key!r} must be a table")
    return value


def resolve(recipe: Recipe) -> Recipe:
    """Fill in defaults and validate; the result is complete and reproduces the run exactly.

    Raises:
        UserError: unknown key, missing field, wrong type or out-of-range value.
    """
    sections = {"box", "species", "potential", "minimizer", "sensitivity"}
    _check_keys(recipe, set(TOP_LEVEL) | sections, "")
    out: Recipe = {**TOP_LEVEL, **{k: v for k, v in recipe.items() if k not in sections}}
    if not isinstance(out["name"], str) or not isinstance(out["description"], str):
        raise UserError("recipe keys 'name' and 'description' must be strings")
    out["dimension"] = _number(out["dimension"], "dimension", integer=True)
    if out["dimension"] not in (2, 3):
        raise UserError(f"recipe key 'dimension' must be 2 or 3, got {out['dimension']}")
    out["n_particles"] = _number(out["n_particles"], "n_particles", integer=True)
    out["seed"] = _number(out["seed"], "seed", integer=True, positive=False)

    box = dict(_table(recipe, "box"))
    _check_keys(box, {"packing_fraction", "side"}, "box.")
    if len(box) != 1:
        raise UserError("recipe table [box] needs exactly one of 'packing_fraction' or 'side'")
    if "packing_fraction" in box:
        box["packing_fraction"] = _number(box["packing_fraction"], "box.packing_fraction")
    elif isinstance(box["side"], list):
        if len(box["side"]) != out["dimension"]:
            raise UserError(f"recipe key 'box.side' needs {out['dimension']} lengths, got {box['side']}")
        box["side"] = [_number(v, "box.side") for v in box["side"]]
    else:
        box["side"] = _number(box["side"], "box.side")
    out["box"] = box

    species = _table(recipe, "species")
    if not species:
        raise UserError("recipe needs at least one [species.NAME] table")
    out["species"] = {}
    for name, entry in species.items():
        if not isinstance(entry, dict):
            raise UserError(f"recipe key 'species.{name}' must be a table")
        _check_keys(entry, {"fraction", "diameter"}, f"species.{name}.")
        for key in ("fraction", "diameter"):
            if key not in entry:
                raise UserError(f"recipe needs species.{name}.{key}")
        out["species"][name] = {
            "fraction": _number(entry["fraction"], f"species.{name}.fraction"),
            "diameter": _number(entry["diameter"], f"species.{name}.diameter"),
        }

    potential = dict(_table(recipe, "potential"))
    name = potential.pop("name", "soft_sphere")
    if name not in POTENTIALS:
        raise UserError(f"unknown potential {name!r}; known: {', '.join(sorted(POTENTIALS))}")
    defaults = POTENTIALS[name].defaults
    _check_keys(potential, defaults, "potential.")
    out["potential"] = {"name": name}
    for key, default in defaults.items():
        out["potential"][key] = _number(potential.get(key, default), f"potential.{key}")

    minimizer = dict(_table(recipe, "minimizer"))
    name = minimizer.pop("name", "fire")
    if name not in MINIMIZER_DEFAULTS:
        raise UserError(f"unknown minimizer {name!r}; known: {', '.join(MINIMIZER_DEFAULTS)}")
    defaults = MINIMIZER_DEFAULTS[name]
    _check_keys(minimizer, defaults, "minimizer.")
    out["minimizer"] = {"name": name}
    for key, default in defaults.items():
        out["minimizer"][key] = _number(
            minimizer.get(key, default), f"minimizer.{key}", integer=isinstance(default, int)
        )

    sensitivity = {**SENSITIVITY_DEFAULTS, **_table(recipe, "sensitivity")}
    _check_keys(sensitivity, SENSITIVITY_DEFAULTS, "sensitivity.")
    if sensitivity["solver"] not in SOLVERS:
        raise UserError(f"unknown sensitivity.solver {sensitivity['solver']!r}; known: {', '.join(SOLVERS)}")
    sensitivity["tol"] = _number(sensitivity["tol"], "sensitivity.tol")
    sensitivity["maxiter"] = _number(
        sensitivity["maxiter"], "sensitivity.maxiter", integer=True, positive=False
    )
    if sensitivity["maxiter"] < 0:
        raise UserError("recipe key 'sensitivity.maxiter' must be >= 0 (0: 10 × degrees of freedom)")
    out["sensitivity"] = sensitivity
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML text (what ``RUN/system.toml`` holds)."""
    header = "# Resolved mdsens recipe: `mdsens relax --system THIS_FILE` reproduces the run.\n"
    return header + tomli_w.dumps(recipe)
