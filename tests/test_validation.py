"""Every recipe value is checked before any array is built: bad values are one-line errors.

* The values of issue 14 that used to pass (``fmax = inf``, ``rattle = nan``, …) or end in a
  traceback (``n_particles = 10²⁰``, ``--seed 10²³``, …) exit 2 with one line and write nothing.
* A run name is a name, never a path.
* A property-style sweep: values of the wrong kind (strings, NaN, ±inf, negatives, zero, huge
  integers, lists, booleans, tables), drawn by a seeded generator from pools that are wrong for
  the field, fed to every recipe field through ``mdsens relax --set``.
* Per-atom diameters of a structure file that vary within a species become per-particle values.
* A periodic cell so large that its cell list would not fit in memory falls back to all pairs
  (or is refused with ``neighbors.mode = always``); all pairs of too many particles are refused.
* The resolved description stays true after overrides; building and using a system writes
  nothing into it after construction.
"""

from __future__ import annotations

import random
from pathlib import Path

import ase
import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, describe
from typer.testing import CliRunner

import mdsens  # noqa: F401  (float64)
from mdsens import neighbors
from mdsens.cli import app
from mdsens.errors import UserError
from mdsens.list_coverage import for_params
from mdsens.recipe import apply_overrides, load_recipe, resolve
from mdsens.run import atoms_at
from mdsens.system import load_system
from mdsens.validate import MAX_PARTICLES, SEED_LIMIT

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory (so that a default results/ would land in it)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def relax(workdir: Path, *args: str):
    """``mdsens relax ARGS --out work/run``: the result, after checking that nothing was written."""
    result = runner.invoke(app, ["relax", *args, "--out", str(workdir / "run")])
    assert sorted(workdir.parent.rglob("*")) == [workdir], describe(result)
    return result


# --- the cases of issue 14 --------------------------------------------------------------------

FOUND = {
    "fmax-inf": (["--set", "minimizer.fmax=inf"], ["minimizer.fmax", "finite"]),
    "fmax-zero": (["--set", "minimizer.fmax=0"], ["minimizer.fmax", "above 0"]),
    "fmax-negative": (["--set", "minimizer.fmax=-1e-10"], ["minimizer.fmax", "above 0"]),
    "fmax-nan": (["--set", "minimizer.fmax=nan"], ["minimizer.fmax", "finite"]),
    "rattle-nan": (["--set", "rattle=nan"], ["rattle", "finite"]),
    "skin-nan": (["--set", "neighbors.skin=nan"], ["neighbors.skin", "finite"]),
    "dt-start-nan": (["--set", "minimizer.dt_start=nan"], ["minimizer.dt_start", "finite"]),
    "n-beyond-int64": (["--set", "n_particles=99999999999999999999"], ["n_particles", "MAX_PARTICLES"]),
    "n-trillion": (["--set", "n_particles=1000000000000"], ["n_particles", str(MAX_PARTICLES)]),
    "fraction-nan": (["--set", "species.A.fraction=nan"], ["species.A.fraction", "finite"]),
    "diameter-1e300": (["--set", "species.A.diameter=1e300"], ["species.A.diameter", "at most"]),
    "packing-1e-300": (["--set", "box.packing_fraction=1e-300"], ["box.packing_fraction", "at least"]),
    "side-inf": (["--set", "box.side=inf"], ["box.side", "finite"]),
    "seed-huge": (["--seed", "99999999999999999999999"], ["seed", "at most"]),
    "seed-negative": (["--seed", "-1"], ["seed", "at least 0"]),
    "step-size-nan": (
        ["--set", "minimizer.name=gradient_descent", "--set", "minimizer.step_size=nan"],
        ["minimizer.step_size"],
    ),
    "tol-nan": (["--set", "sensitivity.tol=nan"], ["sensitivity.tol", "finite"]),
    "capacity-inf": (["--set", "neighbors.capacity=inf"], ["neighbors.capacity"]),
    "name-escapes": (["--set", "name=../ESCAPED"], ["name", "--out"]),
    "name-absolute": (["--set", 'name="/some/absolute/dir"'], ["name"]),
}


@pytest.mark.parametrize(("args", "needles"), list(FOUND.values()), ids=list(FOUND))
def test_found_values_are_one_line_errors_that_write_nothing(args, needles, workdir):
    assert_one_line_error(relax(workdir, *args), *needles)


def test_an_escaping_name_writes_nothing_outside_results(workdir):
    result = runner.invoke(app, ["relax", "--set", "name=../ESCAPED"])
    assert_one_line_error(result, "name")
    assert not (workdir.parent / "ESCAPED").exists() and not (workdir / "results").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../ESCAPED",
        "/some/absolute/dir",
        "a/b",
        "a\\b",
        "..",
        ".",
        "",
        "   ",
        "bell\x07",
        "tab\there",
        "x\ny",
    ],
)
def test_a_name_is_not_a_path(name):
    with pytest.raises(UserError, match="name"):
        resolve({**load_recipe("binary-packing"), "name": name})


@pytest.mark.parametrize("name", ["binary-packing", "my run 2", "Ar_Kr.v2", "ünïcode"])
def test_plain_names_pass(name):
    assert resolve({**load_recipe("binary-packing"), "name": name})["name"] == name


def test_a_nameless_recipe_resolves_to_a_name_that_resolves_again():
    recipe = load_recipe("binary-packing")
    del recipe["name"]
    resolved = resolve(recipe)
    assert resolve(resolved) == resolved and resolved["name"] == "run"


@pytest.mark.parametrize("seed", [SEED_LIMIT, 2**64, -1])
def test_load_system_refuses_a_seed_outside_the_prng_range(seed):
    with pytest.raises(UserError, match="seed"):
        load_system("binary-packing", seed=seed)


def test_the_largest_seed_passes():
    assert resolve({**load_recipe("binary-packing"), "seed": SEED_LIMIT - 1})["seed"] == SEED_LIMIT - 1


def test_r_onset_must_be_below_r_cutoff():
    with pytest.raises(UserError, match="r_onset"):
        resolve(apply_overrides(load_recipe("lj-fcc-vacancy"), ["potential.r_onset=2.5"]))
    # Without a cutoff, the onset does not matter.
    assert resolve(apply_overrides(load_recipe("lj-cluster"), ["potential.r_onset=3.0"]))


@pytest.mark.parametrize(
    ("name", "item"),
    [
        ("lj-fcc-vacancy", "n_particles=64"),
        ("lj-cluster", "dimension=3"),
        ("binary-packing", "structure_index=nan"),
        ("binary-packing", "structure_index=2"),
    ],
)
def test_a_value_for_another_source_of_positions_is_refused_not_ignored(name, item):
    with pytest.raises(UserError, match="does not apply"):
        resolve(apply_overrides(load_recipe(name), [item]))


@pytest.mark.parametrize(
    "item", ["lattice.repeat=[1000, 1000, 1000]", "lattice.vacancies=[256]", "lattice.vacancies=[-1]"]
)
def test_lattice_sites_are_counted_before_building(item):
    with pytest.raises(UserError, match="lattice"):
        resolve(apply_overrides(load_recipe("lj-fcc-vacancy"), [item]))


# --- every field, values of the wrong kind ------------------------------------------------------

STRINGS = ['"abc"', "word", '""']
NONFINITE = ["nan", "inf", "-inf"]
NEGATIVE = ["-1", "-0.5", "-1e300"]
ZERO = ["0", "0.0"]
HUGE_INT = ["99999999999999999999", "123456789012345678901234567890"]
HUGE = ["1e300", "1e400", *HUGE_INT]
CONTAINERS = ["[]", '["a"]', "[1, 2, 3]", "[[1]]", "{a = 1}"]
BOOLS = ["true", "false"]
OTHERS = [*CONTAINERS, *BOOLS]

# Values that are wrong for every field of a kind (none of them may be valid for any field).
WRONG = {
    "scale": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, *HUGE, "1e-300", *OTHERS],
    "packing": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, *HUGE, "1e-300", "11", *OTHERS],
    "fraction": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, "1.5", "2", *HUGE_INT, *OTHERS],
    "tolerance": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, "1e400", *OTHERS],
    "count": [*STRINGS, *NONFINITE, "-4", "0", "2.5", "128.0", *HUGE_INT, "1000000000000", *OTHERS],
    "whole": [*STRINGS, *NONFINITE, "-1", "-7", "0.5", "3.0", *HUGE_INT, *OTHERS],
    "dimension": ["1", "4", "0", "-2", "2.0", "3.5", *STRINGS, *NONFINITE, *OTHERS],
    "rattle": [*STRINGS, *NONFINITE, *NEGATIVE, *HUGE, *OTHERS],
    "choice": ["nonsense", '"nope"', '""', "1", "nan", *OTHERS],
    "name": [
        '"../ESCAPED"',
        '"/tmp/absolute"',
        '"a/b"',
        '"a\\\\b"',
        "..",
        ".",
        '""',
        '"   "',
        '"bell\\u0007"',
        '"tab\\there"',
        "1",
        "nan",
        *OTHERS,
    ],
    "text": ["1", "2.5", "nan", "inf", *OTHERS],
    "share": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, "11", *HUGE, *OTHERS],
    "capacity": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, "0.5", "101", *HUGE, *OTHERS],
    "index": [*STRINGS, *NONFINITE, "0.5", *HUGE_INT, "-99999999999999999999", *OTHERS],
    "cutoff": [*STRINGS, "nan", "-inf", *NEGATIVE, *ZERO, "1e-300", "1.5", *HUGE_INT, *OTHERS],
    "onset": [*STRINGS, *NONFINITE, *NEGATIVE, *ZERO, "3.0", *HUGE, *OTHERS],
    "path": ["1", "nan", '""', '"no/such/file.xyz"', *OTHERS],
    "symbol": ['"a.b"', '"a-b"', '""', '"a b"', "1", *OTHERS],
    "repeat": [
        "[1, 2]",
        "[0, 1, 1]",
        "[1.5, 1, 1]",
        "[-1, 1, 1]",
        "[1000, 1000, 1000]",
        "[true, 1, 1]",
        "[nan, 1, 1]",
        "[99999999999999999999, 1, 1]",
        "3",
        '"x"',
    ],
    "vacancies": [
        "[-1]",
        "[0.5]",
        '["a"]',
        "[256]",
        "[99999999999999999999]",
        "[nan]",
        "[true]",
        "3",
        "{a = 1}",
    ],
}

PACKING: list[str] = []
GRADIENT_DESCENT = ["--set", "minimizer.name=gradient_descent"]
LATTICE = ["--system", "lj-fcc-vacancy"]
CLUSTER = ["--system", "lj-cluster"]
# Every recipe field: (the arguments that make it a field of the recipe, its kind).
FIELDS = {
    "name": (PACKING, "name"),
    "description": (PACKING, "text"),
    "seed": (PACKING, "whole"),
    "dimension": (PACKING, "dimension"),
    "n_particles": (PACKING, "count"),
    "rattle": (PACKING, "rattle"),
    "box.packing_fraction": (PACKING, "packing"),
    "box.side": (PACKING, "scale"),
    "species.A.fraction": (PACKING, "fraction"),
    "species.A.diameter": (PACKING, "scale"),
    "species.B.fraction": (PACKING, "fraction"),
    "species.B.diameter": (PACKING, "scale"),
    "pairs.A-B.diameter": (PACKING, "scale"),
    "potential.name": (PACKING, "choice"),
    "potential.epsilon": (PACKING, "scale"),
    "potential.alpha": (PACKING, "scale"),
    "minimizer.name": (PACKING, "choice"),
    "minimizer.fmax": (PACKING, "tolerance"),
    "minimizer.max_steps": (PACKING, "count"),
    "minimizer.dt_start": (PACKING, "scale"),
    "minimizer.dt_max": (PACKING, "scale"),
    "minimizer.step_size": (GRADIENT_DESCENT, "scale"),
    "sensitivity.solver": (PACKING, "choice"),
    "sensitivity.tol": (PACKING, "tolerance"),
    "sensitivity.maxiter": (PACKING, "whole"),
    "neighbors.mode": (PACKING, "choice"),
    "neighbors.skin": (PACKING, "share"),
    "neighbors.margin": (PACKING, "share"),
    "neighbors.capacity": (PACKING, "capacity"),
    "lattice.kind": (LATTICE, "choice"),
    "lattice.a": (LATTICE, "scale"),
    "lattice.symbol": (LATTICE, "symbol"),
    "lattice.repeat": (LATTICE, "repeat"),
    "lattice.vacancies": (LATTICE, "vacancies"),
    "potential.sigma": (LATTICE, "scale"),
    "species.Ar.epsilon": (LATTICE, "scale"),
    "pairs.Ar-Ar.sigma": (LATTICE, "scale"),
    "potential.r_onset": (LATTICE, "onset"),
    "potential.r_cutoff": (LATTICE, "cutoff"),
    "structure": (CLUSTER, "path"),
    "structure_index": (CLUSTER, "index"),
}
CASES_PER_FIELD = 5


@pytest.mark.parametrize("key", list(FIELDS))
def test_wrong_values_for_every_field_are_one_line_errors(key, workdir):
    base, kind = FIELDS[key]
    draw = random.Random(f"issue-14 {key}")  # seeded: the same cases on every run
    for value in draw.sample(WRONG[kind], min(CASES_PER_FIELD, len(WRONG[kind]))):
        result = relax(workdir, *base, "--set", f"{key}={value}")
        assert_one_line_error(result)


def test_every_resolved_field_is_swept():
    """The sweep covers every field a resolved recipe has (a new field needs its kind here)."""

    def keys(table: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in table.items():
            if isinstance(value, dict) and key not in ("species", "pairs"):
                found |= keys(value, f"{prefix}{key}.")
            elif key not in ("species", "pairs"):
                found.add(prefix + key)
        return found

    resolved = set()
    for name in ("binary-packing", "lj-fcc-vacancy", "lj-cluster"):
        resolved |= keys(resolve(load_recipe(name)))
    resolved |= keys(
        resolve(apply_overrides(load_recipe("binary-packing"), ['minimizer.name="gradient_descent"']))
    )
    assert resolved <= set(FIELDS), sorted(resolved - set(FIELDS))


# --- structure files ----------------------------------------------------------------------------


def _disks(diameters, symbols) -> ase.Atoms:
    """A loose 2-D periodic row of disks with a per-atom diameter array."""
    n = len(diameters)
    atoms = ase.Atoms(
        symbols,
        positions=[[1.5 * i, 0.0, 0.0] for i in range(n)],
        cell=[1.5 * n, 6.0, 0.0],
        pbc=[True, True, False],
    )
    atoms.arrays["diameter"] = np.asarray(diameters, dtype=np.float64)
    return atoms


def test_diameters_that_vary_within_a_species_become_per_particle_values(tmp_path):
    diameters = np.array([0.80, 0.95, 1.19, 1.05])
    path = tmp_path / "polydisperse.extxyz"
    ase.io.write(path, _disks(diameters, "X4"))
    system = load_system(structure=path, potential="soft_sphere")
    mean = float(np.asarray(system.params["diameter"])[0])
    assert mean == pytest.approx(diameters.mean(), rel=1e-15)
    own = mean + np.asarray(system.params["atom"]["diameter"])
    np.testing.assert_allclose(own, diameters, rtol=1e-15)
    # The energy is the sum over pairs with each particle's own diameter (arithmetic mixing),
    # computed here by hand at positions where neighbours overlap.
    x = np.array(system.positions)
    x[:, 0] *= 0.7
    expected = 0.0
    for i in range(4):
        for j in range(i + 1, 4):
            dx = x[i] - x[j]
            dx -= system.box * np.round(dx / system.box)
            sigma = (diameters[i] + diameters[j]) / 2
            r = np.linalg.norm(dx)
            expected += 0.5 * max(1 - r / sigma, 0.0) ** 2
    assert float(system.energy_fn(jnp.asarray(x), system.params)) == pytest.approx(expected, rel=1e-12)
    # Set explicitly, one diameter for the species is the user's choice.
    system = load_system(structure=path, potential="soft_sphere", overrides=["species.X.diameter=1.0"])
    assert np.asarray(system.params["diameter"]).tolist() == [1.0] and "atom" not in system.params


def test_one_diameter_per_species_is_read_from_the_file(tmp_path):
    path = tmp_path / "bidisperse.extxyz"
    ase.io.write(path, _disks([0.8, 1.2, 0.8, 1.2], "HeArHeAr"))
    system = load_system(structure=path, potential="soft_sphere")
    assert system.species == ("He", "Ar")
    assert np.asarray(system.params["diameter"]).tolist() == [0.8, 1.2]


def test_a_relaxed_file_with_a_diameter_out_of_range_is_refused(tmp_path):
    path = tmp_path / "huge.extxyz"
    ase.io.write(path, _disks([1e300] * 3, "X3"))
    with pytest.raises(UserError, match="diameter of species X"):
        load_system(structure=path, potential="soft_sphere")


def test_non_finite_positions_are_refused(tmp_path):
    atoms = ase.Atoms("Ar3", positions=[[0, 0, 0], [1.1, 0, 0], [np.nan, 0, 0]])
    ase.io.write(tmp_path / "nan.traj", atoms)
    with pytest.raises(UserError, match="not finite"):
        load_system(
            structure=tmp_path / "nan.traj",
            potential="lennard_jones",
            overrides=["potential.sigma=1.0", "potential.epsilon=1.0"],
        )


# --- memory of pair lists -------------------------------------------------------------------------

LJ = ["potential.sigma=1.0", "potential.epsilon=1.0"]


@pytest.fixture
def sparse_crystal(tmp_path) -> Path:
    """64 atoms spread through a periodic cube 10⁶ wide."""
    rng = np.random.default_rng(12)
    atoms = ase.Atoms("Ar64", positions=rng.uniform(0, 1e6, (64, 3)), cell=[1e6] * 3, pbc=True)
    path = tmp_path / "sparse.extxyz"
    ase.io.write(path, atoms)
    return path


def test_a_huge_sparse_cell_falls_back_to_all_pairs(sparse_crystal):
    system = load_system(structure=sparse_crystal, potential="lennard_jones", overrides=LJ)
    assert system.n_particles >= neighbors.AUTO_MIN_PARTICLES and system.pair_list is None
    assert np.isfinite(float(system.energy_fn(jnp.asarray(system.positions), system.params)))


def test_a_huge_sparse_cell_refuses_a_cell_list(sparse_crystal):
    with pytest.raises(UserError, match="MEMORY_LIMIT"):
        load_system(
            structure=sparse_crystal, potential="lennard_jones", overrides=[*LJ, 'neighbors.mode="always"']
        )


def test_all_pairs_of_too_many_particles_are_refused():
    with pytest.raises(UserError, match="MEMORY_LIMIT"):
        load_system("binary-packing", ["n_particles=100000", 'neighbors.mode="never"'])


@pytest.mark.parametrize(("side", "capacity"), [(10.0, 1.5), (13.0, 2.0), (31.0, 1.0)])
def test_cell_list_memory_estimate_matches_jax_md(side, capacity):
    from mdsens.jaxmd import partition

    rng = np.random.default_rng(3)
    box = np.array([side, side * 1.3])
    x = rng.uniform(0, 1, (200, 2)) * box
    cutoff = 1.1
    cells = partition.cell_list(jnp.asarray(box), cutoff, capacity).allocate(jnp.asarray(x))
    actual = cells.position_buffer.size + cells.id_buffer.size
    assert neighbors.cell_list_bytes(box, cutoff, capacity, x) == actual * 8


# --- what a system keeps, and what its recipe says ------------------------------------------------


def test_overrides_keep_the_description_true():
    resolved = load_system("binary-packing", ["n_particles=32"]).recipe
    assert resolved["description"].startswith("2-D bidisperse")
    assert resolved["description"].endswith("but with n_particles = 32")
    unchanged = apply_overrides(load_recipe("binary-packing"), ["n_particles=128", "seed=0"])
    assert unchanged["description"] == load_recipe("binary-packing")["description"]
    mine = apply_overrides(load_recipe("binary-packing"), ["n_particles=32", 'description="mine"'])
    assert mine["description"] == "mine"


def test_a_structure_replacing_the_positions_replaces_the_description(sparse_crystal):
    system = load_system("lj-fcc-vacancy", structure=sparse_crystal)
    assert system.recipe["description"] == "sparse.extxyz with the settings of recipe lj-fcc-vacancy"


def test_a_system_and_its_pair_list_are_not_written_after_construction():
    system = load_system("binary-packing", ["n_particles=64", "minimizer.fmax=1e-10"])
    before, list_before = dict(vars(system)), dict(vars(system.pair_list))
    x = jnp.asarray(system.positions)
    system.contact_changes(x, system.params, x + 1e-3, system.params)
    for_params(system, system.params, x)
    assert vars(system).keys() == before.keys() and vars(system.pair_list).keys() == list_before.keys()


@pytest.mark.parametrize("mode", ["always", "never"])
def test_atoms_on_top_of_each_other_in_a_periodic_packing_are_named(tmp_path, mode):
    """Two atoms of a 2-D periodic packing one box length apart (the same point by periodicity)
    and a pair 1e-9 apart: refused naming the first pair, with and without a neighbour list."""
    system = load_system("binary-packing", ["n_particles=256"])
    x = system.positions.copy()
    x[17] = x[3] + [system.cell[0, 0], 0.0]
    path = tmp_path / "coincident.traj"  # full precision, one species X
    settings = ["potential.diameter=0.8", f'neighbors.mode="{mode}"']
    ase.io.write(path, atoms_at(system, x))
    with pytest.raises(UserError, match=r"not finite: atoms 3 and 17 are \S+ apart"):
        load_system(structure=path, potential="soft_sphere", overrides=settings)
    x[17] = system.positions[17]
    x[40] = x[41] + [1e-9, 0.0]
    ase.io.write(path, atoms_at(system, x))
    with pytest.raises(UserError, match="atoms 40 and 41 are 1e-09 apart"):
        load_system(structure=path, potential="soft_sphere", overrides=settings)
