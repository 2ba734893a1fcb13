"""Tests of mdsens.plot on small synthetic run directories (no physics is run)."""

from __future__ import annotations

import json

import ase
import ase.build
import ase.cluster
import ase.io
import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

import mdsens.plot
from mdsens.cli import app
from mdsens.errors import UserError
from mdsens.plot import _centre, _distances, _periodic_images, _Run, _species_labels, _view, plot_run

N = 10


@pytest.fixture(autouse=True)
def low_resolution(monkeypatch):
    """Coarser figures: rendering at full resolution would dominate the run time of these tests."""
    monkeypatch.setattr(mdsens.plot, "DPI", 60)


def make_run(run_dir, dim=2, sensitivities=("diameter.A", "epsilon"), species_names="A,B"):
    """Write a run directory like the relaxation and sensitivity steps do; return positions."""
    rng = np.random.default_rng(0)
    box = np.array([5.0, 4.0, 3.0])[:dim]
    positions = rng.uniform(0, 1, (N, dim)) * box
    # One particle straddles the corner, so it has periodic images.
    positions[0, :2] = [0.1, 3.95]
    types = np.arange(N) % 2
    xyz = np.zeros((N, 3))
    xyz[:, :dim] = positions
    cell = np.zeros(3)
    cell[:dim] = box
    atoms = ase.Atoms(numbers=np.zeros(N, dtype=int), positions=xyz, cell=cell, pbc=[True, True, dim == 3])
    atoms.new_array("type", types)
    atoms.new_array("diameter", np.where(types == 0, 1.0, 0.6))
    atoms.info.update(energy=1e-3, max_force=1e-13, steps=100, converged=True)
    if species_names is not None:
        atoms.info["species_names"] = species_names
    run_dir.mkdir(parents=True, exist_ok=True)
    ase.io.write(run_dir / "relaxed.extxyz", atoms, format="extxyz")
    np.savez(run_dir / "relaxed.npz", positions=positions)
    if sensitivities:
        arrays = {name: rng.normal(size=(N, dim)) for name in sensitivities}
        np.savez(run_dir / "sensitivity.npz", **arrays)
    return positions


def assert_png(path):
    assert path.is_file()
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 200 and image.shape[1] > 200
    # Something is drawn: a blank figure would be all white.
    assert np.mean(image[..., :3].min(axis=2) < 0.9) > 0.01


def test_all_parameters_give_one_figure_each_and_a_histogram(tmp_path):
    make_run(tmp_path)
    paths = plot_run(tmp_path)
    names = [
        "sensitivity-diameter.A.png",
        "sensitivity-epsilon.png",
        "sensitivity-histogram.png",
        "sensitivity-distance.png",
    ]
    assert paths == [tmp_path / name for name in names]
    for path in paths:
        assert_png(path)
    assert not (tmp_path / "configuration.png").exists()
    # The atomic writer leaves no temporary files behind.
    assert not list(tmp_path.glob(".*tmp*"))


def test_selected_parameter_and_separate_out_dir(tmp_path):
    make_run(tmp_path / "run")
    out = tmp_path / "figures"
    paths = plot_run(tmp_path / "run", params=["epsilon"], out_dir=out)
    names = ["sensitivity-epsilon.png", "sensitivity-histogram.png", "sensitivity-distance.png"]
    assert paths == [out / name for name in names]
    for path in paths:
        assert_png(path)
    assert not list((tmp_path / "run").glob("*.png"))


def test_unknown_parameter_lists_available_names(tmp_path):
    make_run(tmp_path)
    with pytest.raises(UserError, match=r"alpha.*available: diameter\.A, epsilon") as info:
        plot_run(tmp_path, params=["alpha"])
    assert "\n" not in str(info.value)


def test_parameter_requested_without_sensitivity_file(tmp_path):
    make_run(tmp_path, sensitivities=())
    with pytest.raises(UserError, match="no sensitivity.npz"):
        plot_run(tmp_path, params=["epsilon"])


@pytest.mark.parametrize("missing", ["relaxed.npz", "relaxed.extxyz"])
def test_missing_run_file(tmp_path, missing):
    make_run(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(UserError, match=missing):
        plot_run(tmp_path)


def test_missing_run_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path / "nowhere")


def test_without_sensitivities_only_the_configuration(tmp_path):
    make_run(tmp_path, sensitivities=())
    assert plot_run(tmp_path) == [tmp_path / "configuration.png"]
    assert_png(tmp_path / "configuration.png")
    assert not (tmp_path / "sensitivity-histogram.png").exists()


def test_three_dimensional_run(tmp_path):
    make_run(tmp_path, dim=3, sensitivities=("alpha",))
    paths = plot_run(tmp_path)
    names = ["sensitivity-alpha.png", "sensitivity-histogram.png", "sensitivity-distance.png"]
    assert paths == [tmp_path / name for name in names]
    for path in paths:
        assert_png(path)


def test_sensitivity_of_wrong_shape(tmp_path):
    make_run(tmp_path)
    np.savez(tmp_path / "sensitivity.npz", epsilon=np.zeros((N - 1, 2)))
    with pytest.raises(UserError, match="'epsilon' has shape"):
        plot_run(tmp_path)


def test_zeros_and_values_spanning_decades_in_histogram(tmp_path):
    make_run(tmp_path, sensitivities=())
    sens = np.zeros((N, 2))
    sens[1:, 0] = np.logspace(-8, 0, N - 1)
    np.savez(tmp_path / "sensitivity.npz", alpha=sens, epsilon=np.zeros((N, 2)))
    for path in plot_run(tmp_path):
        assert_png(path)


def test_npz_positions_and_json_values_are_used(tmp_path):
    positions = make_run(tmp_path)
    (tmp_path / "sensitivity.json").write_text(
        json.dumps({"parameters": {"epsilon": {"value": 1.5}, "alpha": "not a mapping"}})
    )
    run = _Run(tmp_path)
    # Bit-for-bit the npz positions, not the rounded extxyz text.
    np.testing.assert_array_equal(run.positions, positions)
    assert run.values == {"epsilon": 1.5}
    assert run.species == ["A", "B"]


def test_species_labels():
    types = np.array([0, 1, 2, 1])
    assert _species_labels("A,B,C", types) == ["A", "B", "C"]
    assert _species_labels(None, types) == ["0", "1", "2"]
    # Fewer names than species: the index stands in for the rest.
    assert _species_labels("A", types) == ["A", "1", "2"]
    # extxyz parses "1,2,3" into an integer array, "T,F" into booleans.
    assert _species_labels(np.array([1, 2, 3]), types) == ["1", "2", "3"]
    assert _species_labels([True, False], types[:2]) == ["T", "F"]
    # Without species_names: the chemical symbol of each type, unless it is the placeholder X.
    symbols = ["Ar", "Kr", "X", "Kr"]
    assert _species_labels(None, types, symbols) == ["Ar", "Kr", "2"]
    assert _species_labels("A", types, symbols) == ["A", "Kr", "2"]
    # Two types of one element, or one type of two elements.
    assert _species_labels(None, np.array([0, 1, 2]), ["Ar", "Ar", "Kr"]) == ["Ar (0)", "Ar (1)", "Kr"]
    assert _species_labels(None, np.array([0, 0]), ["Ar", "Kr"]) == ["0"]


def test_missing_species_names_still_plots(tmp_path):
    make_run(tmp_path, species_names=None)
    assert _Run(tmp_path).species == ["0", "1"]
    assert_png(plot_run(tmp_path, params=[])[0])


def test_periodic_images_of_a_disc_in_a_corner(tmp_path):
    make_run(tmp_path, sensitivities=())
    run = _Run(tmp_path)
    run.diameters[:] = 0.1
    run.diameters[0] = 1.0
    xy = np.mod(run.positions, run.box)
    centres, owners = _periodic_images(run, xy, run.diameters)
    # The disc at (0.1, 3.95) of radius 0.5 reaches across both edges: four copies.
    corner = centres[owners == 0]
    expected = [[0.1, 3.95], [5.1, 3.95], [0.1, -0.05], [5.1, -0.05]]
    assert sorted(map(tuple, np.round(corner, 9))) == sorted(map(tuple, expected))
    # Every other particle appears at least once, and copies only where they reach the box.
    assert set(owners) == set(range(N))
    assert len(owners) >= N + 3


# --- crystals, clusters and 3-D views -------------------------------------------------------------


def write_atoms_run(run_dir, atoms, dim=3, sensitivities=("sigma.Ar-Kr", "epsilon.Ar")):
    """Write ``atoms`` (with a per-atom ``type``) as a run directory; return the sensitivities."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ase.io.write(run_dir / "relaxed.extxyz", atoms, format="extxyz")
    np.savez(run_dir / "relaxed.npz", positions=atoms.positions[:, :dim])
    rng = np.random.default_rng(1)
    arrays = {name: rng.normal(size=(len(atoms), dim)) for name in sensitivities}
    # Values spanning decades and an exact zero, as near a defect: a log axis that must skip zeros.
    if arrays:
        first = next(iter(arrays))
        arrays[first] *= np.logspace(-6, 0, len(atoms))[:, None]
        arrays[first][0] = 0.0
        np.savez(run_dir / "sensitivity.npz", **arrays)
    return arrays


def triclinic_atoms(species_names=None):
    """A sheared (monoclinic) 3-D Ar/Kr crystal, periodic in 3-D, without a diameter array."""
    atoms = ase.build.bulk("Ar", "fcc", a=5.26).repeat((3, 3, 2))
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0, 0], [0.4, 1, 0], [0, 0.2, 1.0]]), scale_atoms=True)
    types = np.arange(len(atoms)) % 2
    atoms.symbols[types == 1] = "Kr"
    atoms.new_array("type", types)
    if species_names is not None:
        atoms.info["species_names"] = species_names
    return atoms


@pytest.mark.parametrize("species_names", [None, "Ar,Kr"])
def test_triclinic_crystal_with_symbols_and_no_diameters(tmp_path, species_names):
    atoms = triclinic_atoms(species_names)
    assert not atoms.cell.orthorhombic and atoms.pbc.all()
    write_atoms_run(tmp_path, atoms)
    run = _Run(tmp_path)
    assert run.species == ["Ar", "Kr"]
    # No images or wrapping in a non-orthogonal cell; atoms sized by their nearest-neighbour distance.
    assert not run.wrap.any() and not run.sized
    distances = atoms.get_all_distances(mic=True) + np.diag(np.full(len(atoms), np.inf))
    np.testing.assert_allclose(run.diameters, 0.5 * np.median(distances.min(axis=1)), rtol=1e-6)
    if species_names is not None:
        return  # the figures are the same
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == [
        "sensitivity-sigma.Ar-Kr.png",
        "sensitivity-epsilon.Ar.png",
        "sensitivity-histogram.png",
        "sensitivity-distance.png",
    ]
    for path in paths:
        assert_png(path)


def test_free_cluster_with_zero_cell(tmp_path):
    atoms = ase.cluster.Icosahedron("Ar", noshells=2, latticeconstant=5.26)
    assert len(atoms) == 13
    atoms.set_cell(np.zeros(3))
    atoms.pbc = False
    atoms.new_array("type", np.zeros(13, dtype=int))
    write_atoms_run(tmp_path, atoms, sensitivities=("epsilon",))
    run = _Run(tmp_path)
    assert run.species == ["Ar"] and not run.periodic and not run.wrap.any()
    # Default centre of a free cluster: the centroid (the central atom of the icosahedron).
    centre = _centre(run, None)
    assert centre.text.startswith("centroid of the atoms") and centre.label is None
    np.testing.assert_allclose(centre.point, atoms.positions.mean(axis=0), atol=1e-12)
    assert np.sum(_distances(run, centre.point) < 1e-6) == 1
    for path in plot_run(tmp_path):
        assert_png(path)
    assert_png(plot_run(tmp_path, params=[], slice_width=2.0)[0])


def test_defect_position_is_the_default_centre_and_distances_use_minimum_images(tmp_path):
    atoms = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)
    defect = atoms.positions[0].copy()  # the origin, a corner of the cell
    del atoms[0]
    atoms.new_array("type", np.zeros(len(atoms), dtype=int))
    atoms.info["species_names"] = "Ar"
    atoms.info["defect_position"] = defect
    write_atoms_run(tmp_path, atoms, sensitivities=("epsilon",))
    run = _Run(tmp_path)
    # ASE reads the space-separated info value back as an array.
    assert isinstance(run.defect, np.ndarray)
    centre = _centre(run, None)
    assert centre.text == "defect at (0, 0, 0)" and centre.label == "defect"
    distances = _distances(run, centre.point)
    # The vacancy's 12 nearest neighbours lie a / √2 away, most of them across the cell's faces.
    assert np.sum(np.isclose(distances, 5.26 / np.sqrt(2))) == 12
    assert distances.max() <= np.sqrt(3) * 1.5 * 5.26 + 1e-9
    for path in plot_run(tmp_path):
        assert_png(path)


def test_cell_centre_is_the_default_centre_of_a_periodic_run(tmp_path):
    make_run(tmp_path)
    centre = _centre(_Run(tmp_path), None)
    assert centre.text == "cell centre (2.5, 2)" and centre.label is None
    np.testing.assert_array_equal(centre.point, [2.5, 2.0, 0.0])


def test_centre_by_atom_index_and_by_coordinates(tmp_path):
    make_run(tmp_path, dim=3, sensitivities=("alpha",))
    run = _Run(tmp_path)
    by_index = _centre(run, 3)
    assert by_index.text == "atom 3 (B)" and by_index.label == "atom 3"
    np.testing.assert_array_equal(by_index.point, run.positions[3])
    assert _distances(run, by_index.point)[3] == 0
    by_point = _centre(run, (1, 2.5, 0.25))
    assert by_point.text == "point (1, 2.5, 0.25)"
    np.testing.assert_array_equal(by_point.point, [1, 2.5, 0.25])
    for path in plot_run(tmp_path, center=np.int64(3)):
        assert_png(path)


def test_centre_in_two_dimensions_takes_two_or_three_coordinates(tmp_path):
    make_run(tmp_path)
    run = _Run(tmp_path)
    np.testing.assert_array_equal(_centre(run, (1, 2)).point, [1, 2, 0])
    np.testing.assert_array_equal(_centre(run, (1, 2, 0)).point, [1, 2, 0])


@pytest.mark.parametrize(
    ("center", "match"),
    [
        (N, "atom index 10 is out of range: the run has 10 atoms, 0 to 9"),
        (-1, "atom index -1 is out of range"),
        ((1.0, 2.0), "3 finite coordinates"),
        ((1.0, 2.0, float("nan")), "3 finite coordinates"),
        ("3", "atom index or 3 finite coordinates, not '3'"),
        (True, "atom index or 3"),
        ({"x": 1}, "atom index or 3"),
    ],
)
def test_bad_centre(tmp_path, center, match):
    make_run(tmp_path, dim=3)
    with pytest.raises(UserError, match=match):
        plot_run(tmp_path, center=center)
    # Nothing is drawn before the arguments are checked.
    assert not list(tmp_path.glob("*.png"))


def test_malformed_defect_position(tmp_path):
    make_run(tmp_path, dim=3, sensitivities=("alpha",))
    atoms = ase.io.read(tmp_path / "relaxed.extxyz")
    atoms.info["defect_position"] = "vacancy"
    ase.io.write(tmp_path / "relaxed.extxyz", atoms, format="extxyz")
    with pytest.raises(UserError, match="defect_position.*pass a centre"):
        plot_run(tmp_path)
    # An explicit centre does not need it.
    assert plot_run(tmp_path, params=[], center=0) == [tmp_path / "configuration.png"]


def test_slice_of_a_three_dimensional_run(tmp_path):
    positions = make_run(tmp_path, dim=3, sensitivities=("alpha",))
    run = _Run(tmp_path)
    # Periodic in z: about the middle of the cell, z = 1.5.
    view = _view(run, 1.0)
    np.testing.assert_array_equal(view.shown, np.abs(positions[:, 2] - 1.5) < 0.5)
    assert 0 < view.shown.sum() < N
    assert view.text.startswith("slice |z − 1.5| < 0.5 (middle of the cell)")
    assert view.text.endswith(f"{view.shown.sum()} of {N} atoms")
    # Minimum image in z: 4.6 and -1.4 are 0.1 from the middle, 1.5, as is 1.6.
    np.testing.assert_array_equal(view.inside(np.array([1.6, 2.1, 4.6, -1.4])), [True, False, True, True])
    assert _view(run, None).text == f"x-y projection of all {N} atoms"
    assert _view(run, None).shown.all()
    for path in plot_run(tmp_path, slice_width=1.0, center=0):
        assert_png(path)


def test_slice_of_a_free_cluster_is_about_the_middle_of_its_atoms(tmp_path):
    atoms = ase.Atoms("Ar4", positions=[[0, 0, 10], [1, 0, 11], [0, 1, 12], [1, 1, 14]])
    atoms.new_array("type", np.zeros(4, dtype=int))
    write_atoms_run(tmp_path, atoms, sensitivities=())
    view = _view(_Run(tmp_path), 2.5)
    np.testing.assert_array_equal(view.shown, [False, True, True, False])
    assert "(middle of the atoms' z-range): 2 of 4 atoms" in view.text


@pytest.mark.parametrize(
    ("dim", "width", "match"),
    [
        (2, 1.0, "a slice needs a 3-D run; this one is 2-D"),
        (3, 0.0, "must be positive"),
        (3, float("inf"), "must be positive"),
        (3, 1e-9, "no atom within the slice"),
    ],
)
def test_bad_slice(tmp_path, dim, width, match):
    make_run(tmp_path, dim=dim)
    with pytest.raises(UserError, match=match):
        plot_run(tmp_path, slice_width=width)


# --- the command line ------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_plot_with_centre_and_slice(tmp_path):
    make_run(tmp_path, dim=3, sensitivities=("alpha",))
    result = runner.invoke(app, ["plot", "--center", "3", "--slice", "1.5", "--run", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = ["sensitivity-alpha.png", "sensitivity-histogram.png", "sensitivity-distance.png"]
    assert result.stdout.splitlines() == [str(tmp_path / name) for name in names]
    # Coordinates, on a run without sensitivities: the configuration figure alone.
    (tmp_path / "sensitivity.npz").unlink()
    result = runner.invoke(app, ["plot", "--center", "1.0, 2,0.5", "--run", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / "configuration.png")]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--center", "a,b"], "--center 'a,b' is neither an atom index"),
        (["--center", "1,2"], "3 finite coordinates"),
        (["--center", "99"], "atom index 99 is out of range"),
        (["--slice", "-1"], "must be positive"),
    ],
)
def test_cli_plot_bad_centre_or_slice_is_a_one_line_error(tmp_path, args, match):
    make_run(tmp_path, dim=3, sensitivities=("alpha",))
    result = runner.invoke(app, ["plot", *args, "--run", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Error" in lines[0] and match in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))
