"""Structure files in and out: read → relax → write → read, and bad structure input on the CLI.

* A rattled, triclinic, periodic Ar/Kr fcc crystal (32 atoms) written by ASE as extxyz, CIF,
  POSCAR and LAMMPS data (with and without a Masses section) is loaded with
  ``load_system(structure=...)``, relaxed, saved and exported again in its own format; order,
  symbols, cell and periodicity must survive every step. The reference is the ASE object the
  test wrote, never anything mdsens printed.
* Species names of any atoms, as ASE reads them back from extxyz (``species_of``): chemical
  symbols, ``species_names`` (also when extxyz parses it as booleans or integers), per-type
  symbols, ``T<type>``.
* ``mdsens relax --structure FILE`` with a bad file is a one-line error, exit code 2, with nothing
  written; ``mdsens export`` of a free cluster in a periodic-only format likewise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
from ase.data import atomic_numbers
from cli_helpers import assert_one_line_error, cli, describe
from typer.testing import CliRunner

from mdsens.errors import UserError
from mdsens.relaxation import Relaxer
from mdsens.run import export_structure, load_run, save_relaxation
from mdsens.structures import species_of
from mdsens.system import load_system

N_ATOMS = 32
KR_SITES = (0, 3, 5, 6, 9, 12, 14, 17, 20, 26, 29, 31)
TAGS = np.arange(N_ATOMS) * 7 + 100  # distinct, not the atom index


def binary_crystal() -> ase.Atoms:
    """2 × 2 × 2 fcc Ar/Kr, sheared into a triclinic cell, rattled; tags mark every atom.

    The cell is lower triangular (a along x, b in the xy plane): the orientation in which CIF
    and LAMMPS data store a cell, so the cell read back can be compared component-wise.
    """
    atoms = ase.build.bulk("Ar", "fcc", a=1.63, cubic=True).repeat((2, 2, 2))
    symbols = np.array(["Ar"] * N_ATOMS)
    symbols[list(KR_SITES)] = "Kr"
    atoms.set_chemical_symbols(symbols.tolist())
    cell = atoms.cell[:] + np.array([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.2, 0.1, 0.0]])
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.02, seed=1)
    atoms.set_tags(TAGS)
    atoms.pbc = True
    return atoms


def lj_overrides(ar: str, kr: str) -> list[str]:
    """LJ parameters per species and one pair override; cutoff inside half the cell's width."""
    return [
        f"species.{ar}.sigma=1.0",
        f"species.{kr}.sigma=1.1",
        "potential.epsilon=1.0",
        f"pairs.{ar}-{kr}.epsilon=0.9",
        "potential.r_onset=1.2",
        "potential.r_cutoff=1.45",
        "minimizer.dt_start=0.005",
        "minimizer.dt_max=0.02",
        "minimizer.fmax=1e-10",
    ]


# case: (input file name, ase.io.write keywords, export format, names the reader gives Ar and Kr,
#        absolute precision of positions in the format)
CASES = {
    "extxyz": ("input.extxyz", {"format": "extxyz"}, "extxyz", ("Ar", "Kr"), 1e-8),
    "cif": ("input.cif", {"format": "cif"}, "cif", ("Ar", "Kr"), 1e-12),
    "poscar": ("POSCAR", {"format": "vasp"}, "vasp", ("Ar", "Kr"), 1e-12),
    # With a Masses section ASE's reader guesses the elements back from the masses.
    "lammps-data": (
        "input.lammps-data",
        {"format": "lammps-data", "atom_style": "atomic", "masses": True},
        "lammps-data",
        ("Ar", "Kr"),
        1e-12,
    ),
    # Without it the reader only knows types 1, 2 (sorted species order), read as H and He.
    "lammps-data-types": (
        "types.lammps-data",
        {"format": "lammps-data", "atom_style": "atomic"},
        "lammps-data",
        ("H", "He"),
        1e-12,
    ),
}
# The reference for comparing relaxed states across formats: full precision, not wrapped.
REFERENCE_CASE = "poscar"


def read_back(path: Path, fmt: str, symbols: list[str]) -> ase.Atoms:
    """Read a file with ASE; LAMMPS types are mapped to elements in ASE's (sorted) order."""
    if fmt == "lammps-data":
        z_of_type = {i + 1: atomic_numbers[s] for i, s in enumerate(sorted(set(symbols)))}
        return ase.io.read(path, format=fmt, atom_style="atomic", Z_of_type=z_of_type)
    return ase.io.read(path, format=fmt)


def reduce_to_cell(delta: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Cartesian differences with whole lattice vectors removed (the nearest image)."""
    frac = delta @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell


@pytest.fixture(scope="module")
def crystal() -> ase.Atoms:
    return binary_crystal()


@pytest.fixture(scope="module")
def round_trips(crystal, tmp_path_factory):
    """``get(case)``: write the input, load, relax, save and export it once; cached."""
    cache: dict[str, dict] = {}

    def get(case: str) -> dict:
        if case in cache:
            return cache[case]
        name, write_kw, fmt, (ar, kr), precision = CASES[case]
        base = tmp_path_factory.mktemp(case)
        path = base / name
        ase.io.write(path, crystal, **write_kw)
        system = load_system(structure=path, potential="lennard_jones", overrides=lj_overrides(ar, kr))
        result = Relaxer(system).relax()
        result.require_converged()
        run = save_relaxation(base / "run", system, result)
        exported = export_structure(run, fmt, base / f"exported.{fmt}")
        expected = [{"Ar": ar, "Kr": kr}[s] for s in crystal.get_chemical_symbols()]
        cache[case] = {
            "system": system,
            "result": result,
            "run": run,
            "fmt": fmt,
            "exported": exported,
            "symbols": expected,
            "precision": precision,
        }
        return cache[case]

    return get


def assert_same_order(crystal: ase.Atoms, positions: np.ndarray) -> None:
    """Atom i of ``positions`` is nearest (minimum image) to atom i of the input, and far from
    every other input atom: the relaxation moves atoms little next to their spacing."""
    cell = crystal.cell[:]
    delta = positions[:, None, :] - crystal.positions[None, :, :]
    distances = np.linalg.norm(reduce_to_cell(delta.reshape(-1, 3), cell), axis=1).reshape(N_ATOMS, N_ATOMS)
    assert np.all(np.argmin(distances, axis=1) == np.arange(N_ATOMS))
    assert np.max(np.diag(distances)) < 0.2
    np.fill_diagonal(distances, np.inf)
    assert np.min(distances) > 0.8


@pytest.mark.parametrize("case", list(CASES))
def test_structure_loads_with_order_symbols_cell_pbc(case, crystal, round_trips):
    trip = round_trips(case)
    system = trip["system"]
    assert system.n_particles == N_ATOMS and system.dimension == 3
    assert system.space_kind == "periodic_general"
    assert system.atoms.get_chemical_symbols() == trip["symbols"]
    # Species are named after the symbols and types index them in the input's order.
    assert [system.species[t] for t in system.types] == trip["symbols"]
    np.testing.assert_allclose(system.cell, crystal.cell[:], atol=1e-12)
    np.testing.assert_array_equal(system.pbc, [True, True, True])
    offset = reduce_to_cell(system.positions - crystal.positions, crystal.cell[:])
    assert np.max(np.abs(offset)) <= trip["precision"]


@pytest.mark.parametrize("case", list(CASES))
def test_relaxed_extxyz_keeps_order_symbols_cell_pbc(case, crystal, round_trips):
    trip = round_trips(case)
    result = trip["result"]
    assert result.converged and result.energy < result.initial_energy
    back = ase.io.read(trip["run"] / "relaxed.extxyz", format="extxyz")
    assert back.get_chemical_symbols() == trip["symbols"]
    np.testing.assert_allclose(back.cell[:], crystal.cell[:], atol=1e-12)
    np.testing.assert_array_equal(back.pbc, crystal.pbc)
    np.testing.assert_allclose(back.positions, result.positions, atol=1e-8)  # 8 decimals
    assert_same_order(crystal, back.positions)
    assert back.info["species_names"] is not None
    if case == "extxyz":  # the only input format here that stores tags
        np.testing.assert_array_equal(back.get_tags(), TAGS)


@pytest.mark.parametrize("case", CASES)
def test_export_in_the_input_format_reads_back(case, crystal, round_trips):
    trip = round_trips(case)
    back = read_back(trip["exported"], trip["fmt"], trip["symbols"])
    assert back.get_chemical_symbols() == trip["symbols"]
    np.testing.assert_allclose(back.cell[:], crystal.cell[:], atol=1e-12)
    np.testing.assert_array_equal(back.pbc, crystal.pbc)
    # Full-precision relaxed positions, to the format's precision (formats may wrap into the cell).
    offset = reduce_to_cell(back.positions - trip["result"].positions, crystal.cell[:])
    assert np.max(np.abs(offset)) <= trip["precision"]
    assert_same_order(crystal, back.positions)
    if case == "extxyz":
        np.testing.assert_array_equal(back.get_tags(), TAGS)


@pytest.mark.parametrize("case", list(CASES))
def test_load_run_rebuilds_the_structure_system(case, round_trips):
    trip = round_trips(case)
    system, result, _ = load_run(trip["run"])
    assert system.species == trip["system"].species
    np.testing.assert_array_equal(system.types, trip["system"].types)
    np.testing.assert_array_equal(system.positions, trip["system"].positions)
    np.testing.assert_array_equal(result.positions, trip["result"].positions)


@pytest.mark.parametrize("case", [c for c in CASES if c != REFERENCE_CASE])
def test_every_format_relaxes_to_the_same_state(case, crystal, round_trips):
    """Same atoms and parameters (H/He named as Ar/Kr) → the same minimum, whatever the format.

    The starts differ by the formats' rounding (extxyz: 8 decimals) and by lattice vectors
    (CIF wraps positions into the cell); the minimum is the same up to a rigid translation.
    """
    trip, reference = round_trips(case), round_trips(REFERENCE_CASE)
    assert trip["result"].energy == pytest.approx(reference["result"].energy, rel=1e-9)
    offset = reduce_to_cell(trip["result"].positions - reference["result"].positions, crystal.cell[:])
    offset -= offset.mean(axis=0)
    assert np.max(np.abs(offset)) < 1e-6


# --- bad structure input on the command line ------------------------------------------------------

runner = CliRunner()
LJ_AR = (
    "--potential",
    "lennard_jones",
    "--set",
    "species.Ar.sigma=1.0",
    "--set",
    "species.Ar.epsilon=1.0",
)
FREE_RUN = Path("results") / "cluster"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_bad_inputs() -> None:
    """Every bad structure of BAD_STRUCTURES, in the working directory."""
    Path("garbage.xyz").write_bytes(bytes(range(256)) * 4)
    Path("malformed.xyz").write_text("5\ncomment line\nAr 0 0 0\nAr 1 1\n")
    Path("empty.xyz").write_text("")
    Path("notes.txt").write_text("my notes\nnot a structure\n")
    ase.io.write("no_atoms.extxyz", ase.Atoms())
    triangle = [[0.0, 0.0, 0.0], [1.12, 0.0, 0.0], [0.56, 0.97, 0.0]]
    ase.io.write("xenon.xyz", ase.Atoms("Ar2Xe", positions=triangle))
    ase.io.write("coincident.xyz", ase.Atoms("Ar3", positions=[triangle[0], triangle[1], triangle[1]]))
    # ASE's trajectory keeps float64: 1e-30 apart, (σ/r)^12 overflows to inf.
    touching = [triangle[0], triangle[1], [1.12, 1e-30, 0.0]]
    ase.io.write("touching.traj", ase.Atoms("Ar3", positions=touching))
    ase.io.write(
        "slab.extxyz", ase.Atoms("Ar3", positions=triangle, cell=[4, 4, 4], pbc=[True, False, False])
    )
    ase.io.write("ok.xyz", ase.Atoms("Ar3", positions=triangle))


# case: (arguments after `relax`, substrings the error line must contain)
BAD_STRUCTURES = {
    "binary-garbage": (["--structure", "garbage.xyz", *LJ_AR], ["cannot read structure", "garbage.xyz"]),
    "malformed": (["--structure", "malformed.xyz", *LJ_AR], ["cannot read structure", "malformed.xyz"]),
    "missing": (["--structure", "missing.xyz", *LJ_AR], ["not found", "missing.xyz"]),
    "empty": pytest.param(["--structure", "empty.xyz", *LJ_AR], ["empty.xyz"]),
    "unknown-format": pytest.param(["--structure", "notes.txt", *LJ_AR], ["notes.txt"]),
    "no-atoms": (["--structure", "no_atoms.extxyz", *LJ_AR], ["no atoms", "no_atoms.extxyz"]),
    "element-without-parameters": (
        ["--structure", "xenon.xyz", *LJ_AR],
        ["species Xe has no sigma", "--set species.Xe.sigma"],
    ),
    "coincident-atoms": pytest.param(
        ["--structure", "coincident.xyz", *LJ_AR], ["not finite", "atoms 1 and 2"]
    ),
    "atoms-1e-30-apart": pytest.param(
        ["--structure", "touching.traj", *LJ_AR], ["not finite", "atoms 1 and 2"]
    ),
    "unknown-potential": (
        ["--structure", "ok.xyz", "--potential", "nonsense"],
        ["unknown potential 'nonsense'", "lennard_jones"],
    ),
    "mixed-periodicity": (
        ["--structure", "slab.extxyz", *LJ_AR],
        ["mixed periodicity", "True, False, False"],
    ),
}


@pytest.mark.parametrize(("args", "needles"), list(BAD_STRUCTURES.values()), ids=list(BAD_STRUCTURES))
def test_bad_structure_is_a_one_line_error_and_writes_nothing(args, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_bad_inputs()
    before = snapshot(tmp_path)
    result = cli("relax", *args)
    assert_one_line_error(result, *needles)
    assert result.stdout == ""
    assert not (tmp_path / "results").exists()
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def free_run_template(tmp_path_factory) -> Path:
    """A relaxed 3-atom free LJ cluster, from a structure file through the CLI; read-only."""
    base = tmp_path_factory.mktemp("free-cluster")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        _write_bad_inputs()
        Path("ok.xyz").rename("cluster.xyz")
        result = cli(
            "relax",
            "--structure",
            "cluster.xyz",
            *LJ_AR,
            "--set",
            "potential.r_cutoff=inf",
            "--set",
            "minimizer.dt_start=0.005",
            "--set",
            "minimizer.dt_max=0.02",
        )
        assert result.exit_code == 0, describe(result)
        assert result.stdout.splitlines()[-1] == str(FREE_RUN)
    return base


@pytest.fixture
def free_run(free_run_template, tmp_path, monkeypatch) -> Path:
    """A copy of the free-cluster run (and its structure file) in the working directory."""
    shutil.copytree(free_run_template, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return FREE_RUN


@pytest.mark.parametrize(
    ("param", "needles"),
    [("nonsense", ["unknown parameter 'nonsense'", "sigma, epsilon"]), ("sigma.Xe", ["sigma.Xe", "Ar"])],
    ids=["unknown-name", "unknown-species"],
)
def test_unknown_sensitivity_parameter_is_a_one_line_error(param, needles, free_run, tmp_path):
    before = snapshot(tmp_path)
    result = cli("sensitivity", "--run", free_run, "--param", param)
    assert_one_line_error(result, *needles)
    assert snapshot(tmp_path) == before
    assert not list(free_run.glob("sensitivity.*"))


def test_export_of_a_free_cluster_as_poscar_is_a_one_line_error(free_run, tmp_path):
    before = snapshot(tmp_path)
    assert_one_line_error(cli("export", "--format", "vasp", "--run", free_run), "cannot write vasp")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("fmt", "precision"), [("xyz", 1e-8), ("cif", 1e-12)])
def test_export_of_a_free_cluster_reads_back_with_the_relaxed_positions(fmt, precision, free_run):
    result = cli("export", "--format", fmt, "--run", free_run)
    assert result.exit_code == 0, describe(result)
    path = Path(result.stdout.splitlines()[-1])
    assert path == free_run / f"export.{fmt}"
    back = ase.io.read(path, format=fmt)
    with np.load(free_run / "relaxed.npz") as data:
        relaxed = data["positions"]
    # The relaxed equilateral triangle: every side at the LJ minimum 2^(1/6) σ.
    sides = np.linalg.norm(relaxed - np.roll(relaxed, 1, axis=0), axis=1)
    np.testing.assert_allclose(sides, 2 ** (1 / 6), rtol=1e-10)
    assert back.get_chemical_symbols() == ["Ar"] * 3
    assert not back.pbc.any()
    np.testing.assert_allclose(back.positions, relaxed, atol=precision)


def extxyz_round_trip(atoms: ase.Atoms, tmp_path: Path) -> ase.Atoms:
    """The atoms as ASE reads them back from extxyz (which parses "T,F" and "1,2" in info)."""
    path = tmp_path / "atoms.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    return ase.io.read(path, format="extxyz")


def typed(symbols: list[str], types: list[int], names: str | None = None) -> ase.Atoms:
    atoms = ase.Atoms(symbols, positions=np.arange(3 * len(symbols), dtype=float).reshape(-1, 3))
    atoms.arrays["type"] = np.array(types)
    if names is not None:
        atoms.info["species_names"] = names
    return atoms


@pytest.mark.parametrize(
    ("atoms", "names", "types"),
    [
        (ase.Atoms("KrArKr"), ("Kr", "Ar"), [0, 1, 0]),
        (typed(["X"] * 3, [1, 0, 1], "A, B"), ("A", "B"), [1, 0, 1]),
        (typed(["X"] * 3, [1, 0, 1], "T,F"), ("T", "F"), [1, 0, 1]),
        (typed(["X"] * 3, [1, 0, 1], "1,2"), ("1", "2"), [1, 0, 1]),
        (typed(["X"] * 3, [1, 0, 1], "A"), ("T0", "T1"), [1, 0, 1]),
        (typed(["Ar", "Kr", "Ar"], [2, 5, 2]), ("Ar", "Kr"), [0, 1, 0]),
        (typed(["Ar", "Kr", "Ar"], [2, 5, 2], "A,B"), ("Ar", "Kr"), [0, 1, 0]),
        (typed(["Ar", "Ar", "Kr"], [2, 5, 5]), ("T2", "T5"), [0, 1, 1]),
    ],
    ids=[
        "symbols",
        "names",
        "boolean-names",
        "integer-names",
        "too-few-names",
        "type-symbols",
        "names-for-other-types",
        "mixed-symbols",
    ],
)
def test_species_of_names_every_species_once(atoms, names, types, tmp_path):
    back = extxyz_round_trip(atoms, tmp_path)
    got_names, got_types = species_of(back)
    assert got_names == names
    assert got_types.tolist() == types


def test_species_of_refuses_negative_types():
    with pytest.raises(UserError, match="non-negative integers"):
        species_of(typed(["X", "X"], [0, -1]))
