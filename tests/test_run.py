"""The run-directory file contract (mdsens.run), through the public Python API.

One small system (32 particles of the binary packing) is relaxed and differentiated once per
module; the files are written once into a module directory and only read by the tests, and the
tests that change files work on copies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import ase.io
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens
from mdsens import atomic, manifest
from mdsens.manifest import read_manifest
from mdsens.run import latest_run, mark_latest
from mdsens.run_files import read_run

N = 32
PARAMS = ["diameter.A", "diameter.B", "epsilon", "alpha"]
RELAX_FILES = ("system.toml", "relaxed.npz", "relaxed.extxyz")
SENSITIVITY_FILES = ("sensitivity.npz", "sensitivity.json", "sensitivity.extxyz")


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (hidden ones included): relative path -> (bytes, mtime in ns)."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def max_force(system, positions) -> float:
    forces = system.force_fn(jnp.asarray(positions), system.params)
    return float(jnp.max(jnp.linalg.norm(forces, axis=-1)))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # Default run directories and the latest-run marker are relative to the working directory:
    # keep them out of the repository.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def computed():
    """(system, relaxed, sensitivity) of a 32-particle packing, every parameter."""
    system = mdsens.load_system("binary-packing", overrides=[f"n_particles={N}"], seed=3)
    # mdsens.Relaxer(...).relax() rather than mdsens.relax(...): see test_mdsens_relax_is_callable.
    relaxed = mdsens.Relaxer(system).relax()
    assert relaxed.converged
    result = mdsens.compute_sensitivity(system, relaxed, ["diameter", "epsilon", "alpha"])
    return system, relaxed, result


@pytest.fixture(scope="module")
def unconverged(computed):
    """The same system stopped after 5 FIRE steps: not relaxed."""
    result = mdsens.Relaxer(computed[0], max_steps=5).relax()
    assert not result.converged and result.steps == 5
    return result


@pytest.fixture(scope="module")
def run_dir(computed, tmp_path_factory) -> Path:
    """A run directory written by save_relaxation + save_sensitivity (read-only for the tests)."""
    system, relaxed, result = computed
    base = tmp_path_factory.mktemp("run-module")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        run = mdsens.save_relaxation(base / "results" / "packing", system, relaxed)
        paths = mdsens.save_sensitivity(run, system, result)
    assert run == base / "results" / "packing"
    assert [p.name for p in paths] == list(SENSITIVITY_FILES)
    return run


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A private copy of the module run (mtimes preserved), for tests that change files."""
    copy = tmp_path / "results" / "packing"
    shutil.copytree(run_dir, copy)
    return copy


def test_save_relaxation_writes_the_relax_files(run_dir, computed):
    system, _, _ = computed
    for name in RELAX_FILES + SENSITIVITY_FILES:
        assert (run_dir / name).is_file(), name
    recipe = tomllib.loads((run_dir / "system.toml").read_text())
    assert recipe == system.recipe
    assert recipe["seed"] == 3 and recipe["n_particles"] == N
    # No temporary file, staging directory or lock of the commits is left behind.
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [*RELAX_FILES, *SENSITIVITY_FILES, "manifest.json"]
    )
    listed = read_manifest(run_dir).files
    assert {name: entry.stage for name, entry in listed.items()} == {
        **dict.fromkeys(RELAX_FILES, "relax"),
        **dict.fromkeys(SENSITIVITY_FILES, "sensitivity"),
    }


def test_relaxed_extxyz_is_readable_by_ase(run_dir, computed):
    system, relaxed, _ = computed
    atoms = ase.io.read(run_dir / "relaxed.extxyz", format="extxyz")
    assert len(atoms) == N
    # Positions: the relaxed ones (the text keeps 8 decimals), in the plane z = 0.
    np.testing.assert_allclose(atoms.positions[:, :2], relaxed.positions, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(atoms.positions[:, 2], 0.0)
    np.testing.assert_allclose(atoms.cell.array, np.diag([*system.box, 0.0]), rtol=0, atol=1e-12)
    assert atoms.pbc.tolist() == [True, True, False]

    assert np.issubdtype(atoms.arrays["type"].dtype, np.integer)
    np.testing.assert_array_equal(atoms.arrays["type"], system.types)
    assert sorted(set(atoms.arrays["type"].tolist())) == [0, 1]
    np.testing.assert_allclose(
        atoms.arrays["diameter"], np.asarray(system.params["diameter"])[system.types], atol=1e-8
    )
    np.testing.assert_allclose(atoms.arrays["diameter"][atoms.arrays["type"] == 1], 0.6)

    info = atoms.info
    assert info["converged"] is True
    assert info["steps"] == relaxed.steps
    assert info["max_force"] == pytest.approx(relaxed.max_force, rel=1e-12)
    assert info["max_force"] <= 1e-12
    assert info["diameter.A"] == 1.0
    assert info["diameter.B"] == 0.6
    assert info["epsilon"] == 1.0
    assert info["alpha"] == 2.0
    # ASE moves "energy" from the comment line into a SinglePointCalculator.
    assert atoms.get_potential_energy() == pytest.approx(relaxed.energy, rel=1e-12)


def test_relaxed_npz_keeps_full_precision(run_dir, computed):
    system, relaxed, _ = computed
    with np.load(run_dir / "relaxed.npz") as data:
        positions = data["positions"]
        assert positions.dtype == np.float64
        np.testing.assert_array_equal(positions, relaxed.positions)
        assert bool(data["converged"]) is True
        assert float(data["energy"]) == relaxed.energy
        assert float(data["max_force"]) == relaxed.max_force
        assert int(data["steps"]) == relaxed.steps
        np.testing.assert_array_equal(data["types"], system.types)
        np.testing.assert_array_equal(data["cell"], system.cell)
    # Still relaxed after the round trip (an 8-decimal copy would not be: max|F| ~ 1e-8).
    assert max_force(system, positions) <= 1e-12


def test_load_run_round_trip(run_dir, computed):
    system, relaxed, _ = computed
    loaded_system, loaded, path = mdsens.load_run(run_dir)
    assert path == run_dir
    assert loaded_system.recipe == system.recipe
    np.testing.assert_array_equal(loaded_system.positions, system.positions)  # same initial state
    np.testing.assert_array_equal(loaded.positions, relaxed.positions)
    assert loaded.positions.dtype == np.float64
    assert (loaded.energy, loaded.max_force, loaded.steps, loaded.converged) == (
        relaxed.energy,
        relaxed.max_force,
        relaxed.steps,
        True,
    )
    assert loaded.minimizer == "fire" and loaded.fmax == 1e-12
    # The system rebuilt from system.toml agrees that the stored state is relaxed.
    assert max_force(loaded_system, loaded.positions) <= 1e-12


def test_sensitivity_npz_matches_the_result(run_dir, computed):
    _, _, result = computed
    assert list(result.parameters) == PARAMS
    with np.load(run_dir / "sensitivity.npz") as data:
        assert sorted(data.files) == sorted(PARAMS)
        for name in PARAMS:
            assert data[name].shape == (N, 2)
            assert data[name].dtype == np.float64
            np.testing.assert_array_equal(data[name], result.parameters[name].dx)


def test_sensitivity_json_has_energies_diagnostics_timings_versions(run_dir, computed):
    _, _, result = computed
    summary = json.loads((run_dir / "sensitivity.json").read_text())
    assert summary["state"] == read_manifest(run_dir).state
    assert summary["state_relaxed"] is True
    assert summary["system"] == "binary-packing"
    assert summary["max_force"] <= 1e-12
    assert summary["removed_modes"] == ["translation.x", "translation.y"]
    assert summary["wall_time"] > 0
    assert set(summary["parameters"]) == set(PARAMS)
    for name, entry in summary["parameters"].items():
        expected = result.parameters[name]
        assert entry["denergy"] == expected.denergy
        assert entry["value"] == expected.value
        assert entry["solver"] == "cg"
        assert entry["iterations"] == expected.iterations
        # dx*/dε = 0 for a soft-sphere packing (E is proportional to ε): the right-hand side
        # vanishes, no solve runs, and there is no residual to report.
        assert entry["exactly_zero"] is (name == "epsilon")
        if name == "epsilon":
            assert entry["residual"] is None and entry["iterations"] == 0
            assert not expected.dx.any()
        else:
            assert entry["residual"] == expected.residual <= 1e-10
        # An exact zero has nothing to resolve; the others are signal, well above the noise.
        assert entry["resolved"] is (name != "epsilon") is expected.resolved
        assert entry["converged"] is True
        assert entry["wall_time"] >= 0
        assert entry["extxyz_column"] == "dx_d_" + name.replace(".", "_")
        assert entry["extxyz_energy_key"] == "dE_d_" + name.replace(".", "_")
        # max|dx*/dθ| is the largest per-particle vector length, not the largest component.
        lengths = np.linalg.norm(expected.dx, axis=1)
        assert entry["max_particle_dx"] == pytest.approx(lengths.max(), rel=1e-15)
        assert "max_abs_dx" not in entry
    for package in ("python", "mdsens", "jax", "jaxlib", "jax-md", "numpy", "ase"):
        assert summary["versions"][package] not in ("", "unknown"), package
    assert summary["versions"]["mdsens"] == mdsens.__version__


def test_sensitivity_extxyz_has_the_vectors_as_per_atom_arrays(run_dir, computed):
    system, relaxed, result = computed
    atoms = ase.io.read(run_dir / "sensitivity.extxyz", format="extxyz")
    assert len(atoms) == N
    np.testing.assert_allclose(atoms.positions[:, :2], relaxed.positions, atol=1e-7)
    np.testing.assert_array_equal(atoms.arrays["type"], system.types)
    columns = {"diameter.A": "dx_d_diameter_A", "diameter.B": "dx_d_diameter_B"}
    columns.update(epsilon="dx_d_epsilon", alpha="dx_d_alpha")
    for name, column in columns.items():
        vectors = atoms.arrays[column]
        assert vectors.shape == (N, 3)
        # Same particle order as sensitivity.npz, to the 8 decimals of the text format.
        np.testing.assert_allclose(vectors[:, :2], result.parameters[name].dx, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(vectors[:, 2], 0.0)
        energy_key = "dE_d_" + column.removeprefix("dx_d_")
        assert atoms.info[energy_key] == pytest.approx(result.parameters[name].denergy, rel=1e-12)


def test_unconverged_sensitivity_is_marked(computed, unconverged, tmp_path):
    system, _, _ = computed
    start = unconverged
    with pytest.raises(mdsens.NotConvergedError):
        mdsens.compute_sensitivity(system, start, ["epsilon"])
    result = mdsens.compute_sensitivity(system, start, ["epsilon"], allow_unconverged=True)
    run = mdsens.save_relaxation(tmp_path / "unconverged", system, start)
    mdsens.save_sensitivity(run, system, result)
    with np.load(run / "relaxed.npz") as data:
        assert bool(data["converged"]) is False
    atoms = ase.io.read(run / "relaxed.extxyz", format="extxyz")
    assert not atoms.info["converged"]
    assert atoms.info["max_force"] > 1e-12
    assert json.loads((run / "sensitivity.json").read_text())["state_relaxed"] is False
    assert mdsens.load_run(run)[1].converged is False


def test_mdsens_relax_is_callable(computed):
    import importlib

    system, relaxed, _ = computed
    importlib.import_module("mdsens.relaxation")  # as mdsens.sensitivity (and any user code) does
    again = mdsens.relax(system)
    np.testing.assert_array_equal(again.positions, relaxed.positions)


# --- atomicity -------------------------------------------------------------------------------


def _boom(tmp: Path) -> None:
    tmp.write_bytes(b"half a file")
    raise RuntimeError("disk full")


def test_write_all_failing_midway_changes_nothing(run_copy):
    before = snapshot(run_copy)
    writers = {
        run_copy / "relaxed.npz": lambda tmp: tmp.write_bytes(b"new contents"),
        run_copy / "relaxed.extxyz": _boom,
        run_copy / "new-file.txt": lambda tmp: tmp.write_text("never"),
    }
    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_all(writers)
    assert snapshot(run_copy) == before  # same files, bytes and mtimes; no temporary file


def test_write_all_writes_every_file_with_normal_permissions(tmp_path):
    a, b = tmp_path / "sub" / "a.txt", tmp_path / "b.npz"
    atomic.write_all({a: lambda tmp: tmp.write_text("A"), b: lambda tmp: np.savez(tmp, x=np.ones(3))})
    assert a.read_text() == "A"
    with np.load(b) as data:
        np.testing.assert_array_equal(data["x"], np.ones(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.npz", "sub"]
    mask = os.umask(0)
    os.umask(mask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_sensitivity_failing_midway_keeps_the_earlier_files(run_copy, computed, monkeypatch):
    system, _, result = computed
    before = snapshot(run_copy)

    def failing_write(*args, **kwargs):
        raise RuntimeError("extxyz writer failed")

    # sensitivity.npz and sensitivity.json are staged before the extxyz writer fails.
    monkeypatch.setattr(ase.io, "write", failing_write)
    with pytest.raises(RuntimeError, match="extxyz writer failed"):
        mdsens.save_sensitivity(run_copy, system, result)
    assert snapshot(run_copy) == before


def test_save_relaxation_failing_midway_keeps_the_earlier_run(run_copy, computed, unconverged, monkeypatch):
    system, _, _ = computed
    (run_copy / "sensitivity-epsilon.png").write_bytes(b"\x89PNG figure")
    before = snapshot(run_copy)
    other = unconverged

    def failing_write(*args, **kwargs):
        raise RuntimeError("extxyz writer failed")

    monkeypatch.setattr(ase.io, "write", failing_write)
    with pytest.raises(RuntimeError, match="extxyz writer failed"):
        mdsens.save_relaxation(run_copy, system, other)
    # Neither the relax files nor the sensitivity files and figures of the earlier state changed.
    assert snapshot(run_copy) == before


def test_relax_removes_what_mdsens_made_from_the_earlier_state_and_nothing_else(
    run_copy, computed, unconverged
):
    system, relaxed, _ = computed
    written = mdsens.plot_run(run_copy, ["epsilon"])
    check = mdsens.run.save_check(run_copy, system, relaxed, {"passed": True})
    export = mdsens.run.export_structure(run_copy, "extxyz")
    mine = {"notes.txt": b"the user's own file", "sensitivity-mine.png": b"\x89PNG not by mdsens"}
    for name, data in mine.items():
        (run_copy / name).write_bytes(data)
    assert json.loads(check.read_text())["state"] == read_manifest(run_copy).state
    mdsens.save_relaxation(run_copy, system, unconverged)
    names = sorted(p.name for p in run_copy.iterdir())
    assert names == sorted([*RELAX_FILES, "manifest.json", *mine])
    assert not {p.name for p in [*written, check, export]} & set(names)
    assert {name: (run_copy / name).read_bytes() for name in mine} == mine
    with np.load(run_copy / "relaxed.npz") as data:
        np.testing.assert_array_equal(data["positions"], unconverged.positions)
        assert bool(data["converged"]) is False
    assert mdsens.load_run(run_copy)[1].steps == 5


def test_latest_run_is_the_marked_one_else_the_newest_relaxation(computed, tmp_path):
    system, relaxed, _ = computed
    first = mdsens.save_relaxation(tmp_path / "results" / "first", system, relaxed)
    second = mdsens.save_relaxation(Path("results") / "second", system, relaxed)
    # save_relaxation marks nothing: without a marker the newest relaxed.npz under results/ wins.
    assert not Path("results/.latest-run").exists()
    assert latest_run().resolve() == second.resolve()
    mdsens.save_relaxation(first, system, relaxed)
    assert latest_run().resolve() == first.resolve()
    # The marker (mdsens relax sets it) wins over a newer relaxation.
    mark_latest(second)
    mdsens.save_relaxation(first, system, relaxed)
    assert latest_run().resolve() == second.resolve()
    # load_run() without a directory reads the latest run.
    assert mdsens.load_run()[2].resolve() == second.resolve()


def test_load_run_rejects_missing_and_unreadable_runs(run_copy, tmp_path, monkeypatch):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(mdsens.UserError, match="no run found"):
        mdsens.load_run()
    with pytest.raises(mdsens.UserError, match="does not exist"):
        mdsens.load_run(tmp_path / "does" / "not" / "exist")
    with pytest.raises(mdsens.UserError, match="missing"):
        mdsens.load_run(empty)
    (run_copy / "relaxed.npz").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(mdsens.UserError, match="cannot read"):
        mdsens.load_run(run_copy)
    (run_copy / "system.toml").write_text("this is [ not TOML")
    with pytest.raises(mdsens.UserError, match="cannot read"):
        mdsens.load_run(run_copy)


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing-key"])
def test_load_run_reports_a_damaged_npz_as_user_error(run_copy, damage):
    path = run_copy / "relaxed.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with np.load(path) as data:
            positions = data["positions"]
        np.savez(path, positions=positions)
    with pytest.raises(mdsens.UserError):
        mdsens.load_run(run_copy)


def _interrupted_commit(*args, **kwargs):
    raise KeyboardInterrupt  # as if Ctrl-C came while the stage's files were being staged


def test_an_interrupted_relaxation_leaves_the_earlier_run_as_it_was(
    run_copy, computed, unconverged, monkeypatch
):
    system, relaxed, _ = computed
    mdsens.plot_run(run_copy, ["epsilon"])
    before = snapshot(run_copy)
    monkeypatch.setattr(manifest, "_commit", _interrupted_commit)
    with pytest.raises(KeyboardInterrupt):
        mdsens.save_relaxation(run_copy, system, unconverged)
    # Every file of the earlier run, figures included, is still there and still its own.
    assert snapshot(run_copy) == before
    np.testing.assert_array_equal(mdsens.load_run(run_copy)[1].positions, relaxed.positions)


def test_an_interrupted_sensitivity_leaves_the_earlier_files_and_figures(run_copy, computed, monkeypatch):
    system, _, result = computed
    mdsens.plot_run(run_copy, ["epsilon"])
    before = snapshot(run_copy)
    monkeypatch.setattr(manifest, "_commit", _interrupted_commit)
    with pytest.raises(KeyboardInterrupt):
        mdsens.save_sensitivity(run_copy, system, result)
    assert snapshot(run_copy) == before


# --- reading a run without building its system ------------------------------------------------


def test_read_run_gives_what_was_written(run_dir, computed):
    system, relaxed, result = computed
    files = read_run(run_dir)
    assert files.path == run_dir
    np.testing.assert_array_equal(files.positions, relaxed.positions)
    assert files.structure.species == system.species == ("A", "B")
    np.testing.assert_array_equal(files.structure.types, system.types)
    np.testing.assert_allclose(files.structure.cell, np.diag([*system.box, 0.0]), atol=1e-12)
    assert files.structure.pbc.tolist() == [True, True, False]
    np.testing.assert_allclose(
        files.structure.diameters, np.asarray(system.params["diameter"])[system.types], atol=1e-8
    )
    assert files.structure.defect is None
    assert list(files.sensitivities) == PARAMS
    for name, entry in result.parameters.items():
        np.testing.assert_array_equal(files.sensitivities[name], entry.dx)
        assert files.values[name] == entry.value


def test_figures_of_a_written_run(run_copy, computed):
    from matplotlib.quiver import Quiver

    from mdsens.plot import run_figures
    from mdsens.plot_centers import find_center
    from mdsens.plot_geometry import RunGeometry, select_view

    _, _, result = computed
    run = RunGeometry(read_run(run_copy))
    drawn = dict(run_figures(run, ["diameter.B"], select_view(run, None), find_center(run, None)))
    figure = drawn["sensitivity-diameter.B.png"]
    assert figure.get_suptitle().splitlines()[0] == "dx*/dθ, θ = diameter.B = 0.6"
    (ax,) = figure.axes
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["A", "B"]
    (arrows,) = [c for c in ax.collections if isinstance(c, Quiver)]
    assert arrows.N == N
    longest = np.linalg.norm(result.parameters["diameter.B"].dx, axis=1).max()
    # The longest arrow spans one diameter of the larger species.
    assert arrows.scale == pytest.approx(longest / 1.0)
    assert [p.name for p in mdsens.plot_run(run_copy, ["diameter.B"])] == list(drawn)


# --- docs/file-formats.md shows every key that is written ----------------------------------------


def documented_example(heading: str) -> dict:
    """The JSON example under ``heading`` in docs/file-formats.md, comments removed."""
    text = (Path(__file__).parents[1] / "docs" / "file-formats.md").read_text()
    block = text.split(heading, 1)[1].split("```jsonc\n", 1)[1].split("\n```", 1)[0]
    return json.loads(re.sub(r"\s*//[^\n]*", "", block))


def test_the_documented_sensitivity_json_has_the_written_keys(run_dir):
    written = json.loads((run_dir / "sensitivity.json").read_text())
    documented = documented_example("## `sensitivity.json`")
    assert list(documented) == list(written)
    assert set(documented["hessian_spectrum"]) == set(written["hessian_spectrum"])
    for name, entry in documented["parameters"].items():
        assert list(entry) == list(written["parameters"]["diameter.B"]), name
    assert set(documented["versions"]) == set(written["versions"])


def test_the_documented_manifest_has_the_written_keys(run_dir):
    written = json.loads((run_dir / "manifest.json").read_text())
    documented = documented_example("## `manifest.json`")
    assert list(documented) == list(written)
    for entry in documented["files"].values():
        assert list(entry) == list(written["files"]["relaxed.npz"])
