"""Tests of mdsens.plot on small synthetic run directories (no physics is run)."""

from __future__ import annotations

import json

import ase
import ase.io
import numpy as np
import pytest
from matplotlib.image import imread

from mdsens.errors import UserError
from mdsens.plot import _periodic_images, _Run, _species_labels, plot_run

N = 10


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
    atoms = ase.Atoms(numbers=np.ones(N, dtype=int), positions=xyz, cell=cell, pbc=[True, True, dim == 3])
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
    names = ["sensitivity-diameter.A.png", "sensitivity-epsilon.png", "sensitivity-histogram.png"]
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
    assert paths == [out / "sensitivity-epsilon.png", out / "sensitivity-histogram.png"]
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
    assert paths == [tmp_path / "sensitivity-alpha.png", tmp_path / "sensitivity-histogram.png"]
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
    # extxyz parses "1,2,3" into an integer array.
    assert _species_labels(np.array([1, 2, 3]), types) == ["1", "2", "3"]


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
    centres, owners = _periodic_images(run, xy)
    # The disc at (0.1, 3.95) of radius 0.5 reaches across both edges: four copies.
    corner = centres[owners == 0]
    expected = [[0.1, 3.95], [5.1, 3.95], [0.1, -0.05], [5.1, -0.05]]
    assert sorted(map(tuple, np.round(corner, 9))) == sorted(map(tuple, expected))
    # Every other particle appears at least once, and copies only where they reach the box.
    assert set(owners) == set(range(N))
    assert len(owners) >= N + 3
