"""Recipes: loading, overrides, validation, round trip through TOML, and what they build."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

import mdsens  # noqa: F401  (float64)
from mdsens.errors import UserError
from mdsens.recipe import (
    MINIMIZER_DEFAULTS,
    apply_overrides,
    available_recipes,
    dump_recipe,
    load_recipe,
    resolve,
)
from mdsens.structures import species_counts
from mdsens.system import build_system, load_system

SHIPPED = Path(__file__).parents[1] / "systems" / "binary-packing.toml"


@pytest.fixture
def packing_recipe() -> dict:
    return load_recipe("binary-packing")


# --------------------------------------------------------------------------------------------
# loading


def test_load_by_name_and_by_path_agree(tmp_path):
    expected = tomllib.loads(SHIPPED.read_text())
    assert "binary-packing" in available_recipes()
    assert load_recipe("binary-packing") == expected
    assert load_recipe(SHIPPED) == expected
    assert load_recipe(str(SHIPPED)) == expected
    # A path need not end in .toml if the file exists.
    other = tmp_path / "my-recipe.txt"
    other.write_text(SHIPPED.read_text())
    assert load_recipe(other) == expected


def test_load_returns_a_fresh_copy():
    first = load_recipe("binary-packing")
    first["species"]["B"]["diameter"] = 99.0
    assert load_recipe("binary-packing")["species"]["B"]["diameter"] == 0.6


def test_unknown_name_lists_shipped_recipes():
    with pytest.raises(UserError) as caught:
        load_recipe("no-such-system")
    message = str(caught.value)
    assert "no-such-system" in message
    for name in available_recipes():
        assert name in message


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("n_particles = [unclosed\n")
    with pytest.raises(UserError, match="cannot read"):
        load_recipe(bad)
    with pytest.raises(UserError):
        load_system(tmp_path / "absent.toml")


def test_load_system_names_a_nameless_recipe_after_its_file(tmp_path):
    text = SHIPPED.read_text().replace('name = "binary-packing"', "")
    path = tmp_path / "unnamed-packing.toml"
    path.write_text(text)
    assert "name" not in load_recipe(path)
    system = load_system(path)
    assert system.name == "unnamed-packing"


# --------------------------------------------------------------------------------------------
# overrides


def test_overrides_with_dotted_keys_and_toml_values(packing_recipe):
    original = load_recipe("binary-packing")
    out = apply_overrides(
        packing_recipe,
        [
            "species.B.diameter=0.7",
            "n_particles=64",
            "minimizer.fmax=1e-10",
            "sensitivity.solver=dense",  # a bare word is a string
            'description="quoted string"',
            "box.side=[8.0, 9.5]",
            "seed = 3",  # spaces around the key and value are allowed
        ],
    )
    assert out["species"]["B"]["diameter"] == 0.7
    assert isinstance(out["species"]["B"]["diameter"], float)
    assert out["n_particles"] == 64 and isinstance(out["n_particles"], int)
    assert out["minimizer"]["fmax"] == 1e-10
    assert out["sensitivity"]["solver"] == "dense"
    assert out["description"] == "quoted string"
    assert out["box"] == {"side": [8.0, 9.5]}
    assert out["seed"] == 3
    assert packing_recipe == original  # the input is not modified
    resolved = resolve(out)
    assert resolved["species"]["B"]["diameter"] == 0.7
    assert resolved["species"]["A"]["diameter"] == 1.0  # untouched fields stay


def test_override_value_may_contain_equals_sign(packing_recipe):
    out = apply_overrides(packing_recipe, ['description="a=b"'])
    assert out["description"] == "a=b"


@pytest.mark.parametrize(
    "item", ["n_particles", "=3", "", "species..diameter=1", ".seed=1", "seed.=1", "  =1"]
)
def test_bad_set_syntax(packing_recipe, item):
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides(packing_recipe, [item])


def test_override_below_a_scalar(packing_recipe):
    with pytest.raises(UserError, match="not a table"):
        apply_overrides(packing_recipe, ["seed.x=1"])


@pytest.mark.parametrize(
    "item",
    [
        "foo=1",
        "species.A.radius=0.5",
        "box.volume=10.0",
        "potential.sigma=1.0",
        "minimizer.step_size=0.1",  # a gradient-descent setting while the minimiser is FIRE
        "sensitivity.rtol=1e-8",
    ],
)
def test_unknown_key(packing_recipe, item):
    with pytest.raises(UserError, match="unknown key"):
        resolve(apply_overrides(packing_recipe, [item]))
    with pytest.raises(UserError):
        load_system("binary-packing", [item])


@pytest.mark.parametrize(
    "item",
    [
        "n_particles=1.5",
        "n_particles=128.0",
        'n_particles="many"',
        "n_particles=true",
        "n_particles=0",
        "n_particles=-4",
        "dimension=4",
        "dimension=1",
        "seed=0.5",
        "species.A.diameter=-1.0",
        "species.A.diameter=0",
        "species.B.fraction=-0.5",
        "species.B.diameter=big",
        "box.packing_fraction=0",
        "box.packing_fraction=-0.5",
        "box.side=-8.0",
        "box.side=[8.0, -1.0]",
        "box.side=[8.0, 8.0, 8.0]",  # three lengths for a 2-D box
        "box.side=[8.0, true]",
        "potential.epsilon=-1.0",
        "potential.alpha=0",
        "potential.name=no_such_potential",
        "minimizer.fmax=0",
        "minimizer.fmax=true",
        "minimizer.max_steps=0",
        "minimizer.max_steps=10.5",
        "minimizer.name=bfgs",
        "sensitivity.solver=lu",
        "sensitivity.tol=-1e-12",
        "sensitivity.maxiter=1.5",
        "species=3",
        "box=3",
    ],
)
def test_wrong_type_or_range(packing_recipe, item):
    with pytest.raises(UserError):
        resolve(apply_overrides(packing_recipe, [item]))


def test_negative_maxiter_is_rejected(packing_recipe):
    with pytest.raises(UserError):
        resolve(apply_overrides(packing_recipe, ["sensitivity.maxiter=-5"]))


def test_box_side_replaces_packing_fraction(packing_recipe):
    out = apply_overrides(packing_recipe, ["box.side=10.0"])
    assert out["box"] == {"side": 10.0}
    system = build_system(out)
    np.testing.assert_array_equal(system.box, [10.0, 10.0])
    back = apply_overrides(out, ["box.packing_fraction=0.9"])
    assert back["box"] == {"packing_fraction": 0.9}
    # Both at once in a hand-written recipe is an error, not a silent choice.
    both = {**packing_recipe, "box": {"side": 10.0, "packing_fraction": 0.9}}
    with pytest.raises(UserError, match="exactly one"):
        resolve(both)


def test_box_side_per_dimension(packing_recipe):
    system = build_system(apply_overrides(packing_recipe, ["box.side=[8.0, 9.5]", "seed=4"]))
    np.testing.assert_array_equal(system.box, [8.0, 9.5])
    assert np.all((system.positions >= 0) & (system.positions < system.box))


def test_switching_minimizer_drops_stale_settings(packing_recipe):
    out = resolve(apply_overrides(packing_recipe, ["minimizer.name=gradient_descent"]))
    # FIRE's time steps go; the settings both methods have (fmax, max_steps) stay as they were.
    assert out["minimizer"] == {
        "name": "gradient_descent",
        "fmax": packing_recipe["minimizer"]["fmax"],
        "max_steps": packing_recipe["minimizer"]["max_steps"],
        "step_size": MINIMIZER_DEFAULTS["gradient_descent"]["step_size"],
    }
    # A setting given together with the switch is kept.
    out = resolve(
        apply_overrides(packing_recipe, ["minimizer.name=gradient_descent", "minimizer.step_size=0.01"])
    )
    assert out["minimizer"]["step_size"] == 0.01


# --------------------------------------------------------------------------------------------
# resolved recipes: defaults, round trip, reproduction


def test_resolve_fills_defaults():
    minimal = {
        "n_particles": 10,
        "box": {"side": 5},
        "species": {"A": {"fraction": 1, "diameter": 1}},
    }
    out = resolve(minimal)
    assert out["dimension"] == 2 and out["seed"] == 0
    assert out["box"] == {"side": 5.0} and isinstance(out["box"]["side"], float)
    assert out["species"]["A"] == {"fraction": 1.0, "diameter": 1.0}
    assert out["potential"] == {"name": "soft_sphere", "epsilon": 1.0, "alpha": 2.0}
    assert out["minimizer"] == {"name": "fire", **MINIMIZER_DEFAULTS["fire"]}
    assert out["sensitivity"] == {"solver": "cg", "tol": 1e-12, "maxiter": 0}
    assert resolve(out) == out  # idempotent
    assert minimal["box"] == {"side": 5}  # the input is not modified


def test_missing_fields():
    with pytest.raises(UserError, match="species"):
        resolve({"n_particles": 4, "box": {"side": 5.0}})
    with pytest.raises(UserError, match="diameter"):
        build_system({"n_particles": 4, "box": {"side": 5.0}, "species": {"A": {"fraction": 1.0}}})
    with pytest.raises(UserError, match="box"):
        resolve({"n_particles": 4, "species": {"A": {"fraction": 1.0, "diameter": 1.0}}})


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "box.side=[8.0, 9.5]",
            "seed=7",
            "species.B.diameter=0.7",
            "minimizer.name=gradient_descent",
        ],
    ],
    ids=["shipped", "overridden"],
)
def test_dump_round_trip_reproduces_the_system(packing_recipe, overrides):
    resolved = resolve(apply_overrides(packing_recipe, overrides))
    text = dump_recipe(resolved)
    loaded = tomllib.loads(text)
    assert loaded == resolved
    assert resolve(loaded) == resolved
    original, rebuilt = build_system(resolved), build_system(loaded)
    np.testing.assert_array_equal(rebuilt.positions, original.positions)
    np.testing.assert_array_equal(rebuilt.box, original.box)
    np.testing.assert_array_equal(rebuilt.types, original.types)
    assert rebuilt.recipe == original.recipe == resolved


def test_dumped_recipe_loads_as_a_system(tmp_path):
    system = load_system("binary-packing", ["n_particles=32"], seed=5)
    path = tmp_path / "system.toml"
    path.write_text(dump_recipe(system.recipe))
    again = load_system(path)
    assert again.recipe == system.recipe
    np.testing.assert_array_equal(again.positions, system.positions)


def test_seed_changes_positions_only():
    first = load_system("binary-packing")
    second = load_system("binary-packing", seed=1)
    assert second.recipe["seed"] == 1
    assert not np.allclose(first.positions, second.positions)
    np.testing.assert_array_equal(first.box, second.box)
    np.testing.assert_array_equal(first.types, second.types)


# --------------------------------------------------------------------------------------------
# what a recipe builds


@pytest.mark.parametrize(
    ("fractions", "n"),
    [
        ([0.5, 0.5], 128),
        ([0.5, 0.5], 5),
        ([1, 1, 1], 100),
        ([0.2, 0.3, 0.5], 7),
        ([3, 1], 9),
        ([0.01, 0.99], 10),
        ([1.0], 17),
    ],
)
def test_species_counts_sum_to_n(fractions, n):
    counts = species_counts(fractions, n)
    assert sum(counts) == n
    assert len(counts) == len(fractions)
    for count, fraction in zip(counts, fractions, strict=True):
        exact = fraction / sum(fractions) * n
        assert math.floor(exact) <= count <= math.ceil(exact)


def test_species_counts_largest_remainder():
    # 7 × (0.2, 0.3, 0.5) = (1.4, 2.1, 3.5): floors (1, 2, 3), the one left goes to 0.5.
    assert species_counts([0.2, 0.3, 0.5], 7) == [1, 2, 4]
    assert species_counts([0.5, 0.5], 128) == [64, 64]
    assert species_counts([3, 1], 8) == [6, 2]


def test_species_without_particle_is_an_error():
    with pytest.raises(UserError, match="no particle"):
        load_system("binary-packing", ["n_particles=1"])


def test_binary_packing_fraction_and_species():
    system = load_system("binary-packing")
    diameters = np.asarray(system.params["diameter"])[system.types]
    area = np.prod(system.box)
    assert np.sum(np.pi * diameters**2 / 4) / area == pytest.approx(0.98, rel=1e-12)
    assert system.species == ("A", "B")
    np.testing.assert_array_equal(np.bincount(system.types), [64, 64])
    np.testing.assert_array_equal(np.asarray(system.params["diameter"]), [1.0, 0.6])
    # Half the particles of diameter 1, half of D = 0.6: L = sqrt((N/2) π (D² + 1) / 4 / φ).
    side = math.sqrt(64 * math.pi * (0.36 + 1) / 4 / 0.98)
    assert system.box[0] == pytest.approx(side, rel=1e-12)
    assert system.positions.shape == (128, 2) and system.positions.dtype == np.float64
    assert np.all((system.positions >= 0) & (system.positions < system.box))


def test_packing_fraction_in_three_dimensions():
    system = load_system("binary-packing", ["dimension=3", "n_particles=30", "box.packing_fraction=0.5"])
    diameters = np.asarray(system.params["diameter"])[system.types]
    volume = np.prod(system.box)
    assert system.positions.shape == (30, 3)
    assert np.sum(np.pi * diameters**3 / 6) / volume == pytest.approx(0.5, rel=1e-12)
