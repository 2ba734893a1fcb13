"""Figures of a run (mdsens.plot, mdsens.plot_geometry) on tiny run directories; no physics runs.

The run directories are written once per module the way the relaxation and sensitivity steps
write them (tests that change files work on copies). Figures are tested by what a reader sees:
titles, axis labels and scales, arrows, discs, legend entries; one test per kind of figure checks
the PNG files themselves. tests/test_run.py plots a run written by the library itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import ase
import ase.build
import ase.cluster
import ase.io
import numpy as np
import pytest
import tomli_w
from ase.geometry import get_distances
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import EllipseCollection, LineCollection, PathCollection
from matplotlib.image import imread
from matplotlib.quiver import Quiver
from typer.testing import CliRunner

import mdsens.plot
from mdsens.cli import app
from mdsens.errors import UserError
from mdsens.plot import (
    configuration_figure,
    distance_figure,
    gradient_units,
    histogram_figure,
    plot_run,
    run_figures,
)
from mdsens.plot_centers import distances_from, find_center
from mdsens.plot_geometry import RunGeometry, periodic_images, select_view
from mdsens.plot_panels import LOG_DECADES
from mdsens.plot_units import UNKNOWN_LENGTH, units_of
from mdsens.run_files import PerAtomGradient, read_run

N = 10
# The resolved recipe of a soft-sphere run: lengths in units of d_A = 1, energies in ε = 1.
SOFT_SPHERES = {
    "name": "tiny",
    "dimension": 2,
    "potential": {"name": "soft_sphere", "epsilon": 1.0, "alpha": 2.0},
    "species": {"A": {"fraction": 0.5, "diameter": 1.0}, "B": {"fraction": 0.5, "diameter": 0.6}},
}


@pytest.fixture(autouse=True)
def low_resolution(monkeypatch):
    """Coarser figures: rendering at full resolution would dominate the run time of these tests."""
    monkeypatch.setattr(mdsens.plot, "DPI", 60)


def make_run(run_dir, dim=2, sensitivities=("diameter.A", "epsilon"), species_names="A,B", recipe=None):
    """Write a run directory like the relaxation and sensitivity steps do (``system.toml`` only
    where ``recipe`` is given); return positions."""
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
    if recipe is not None:
        (run_dir / "system.toml").write_text(tomli_w.dumps(recipe))
    if sensitivities:
        arrays = {name: rng.normal(size=(N, dim)) for name in sensitivities}
        np.savez(run_dir / "sensitivity.npz", **arrays)
    return positions


def geometry(run_dir) -> RunGeometry:
    return RunGeometry(read_run(run_dir))


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    """A 2-D run with two sensitivities and their values in sensitivity.json (read-only)."""
    run = tmp_path_factory.mktemp("run2d")
    make_run(run, recipe=SOFT_SPHERES)
    values = {"diameter.A": {"value": 1.0}, "epsilon": {"value": 1.5}, "alpha": "not a mapping"}
    (run / "sensitivity.json").write_text(json.dumps({"parameters": values}))
    return run


@pytest.fixture(scope="module")
def run3d(tmp_path_factory):
    """A 3-D run with one sensitivity (read-only)."""
    run = tmp_path_factory.mktemp("run3d")
    make_run(run, dim=3, sensitivities=("alpha",))
    return run


@pytest.fixture
def copy2d(run2d, tmp_path):
    return shutil.copytree(run2d, tmp_path / "run")


@pytest.fixture
def copy3d(run3d, tmp_path):
    return shutil.copytree(run3d, tmp_path / "run")


def assert_png(path):
    assert path.is_file()
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 200 and image.shape[1] > 200
    # Something is drawn: a blank figure would be all white.
    assert np.mean(image[..., :3].min(axis=2) < 0.9) > 0.01


def title(fig) -> str:
    return fig.get_suptitle()


def said(fig) -> str:
    """The title as one line: long lines are wrapped to the figure's width."""
    return " ".join(title(fig).split())


def legend_entries(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def figure_legend_entries(fig) -> list[str]:
    (legend,) = fig.legends
    return [text.get_text() for text in legend.get_texts()]


def quivers(ax) -> list:
    return [c for c in ax.collections if isinstance(c, Quiver)]


def visible_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def only(ax, kind):
    found = [c for c in ax.collections if isinstance(c, kind)]
    assert len(found) == 1, [type(c).__name__ for c in ax.collections]
    return found[0]


def figures(run_dir, params=None, *, center=None, slice_width=None) -> dict:
    """The figures plot_run would write, by file name."""
    run = geometry(run_dir)
    params = list(run.sensitivities) if params is None else params
    view = select_view(run, slice_width)
    return dict(run_figures(run, params, view, find_center(run, center)))


# --- the files written ----------------------------------------------------------------------------


def test_all_parameters_give_one_figure_each_a_histogram_and_distances(copy2d):
    paths = plot_run(copy2d, center=3)
    names = [
        "sensitivity-diameter.A.png",
        "sensitivity-epsilon.png",
        "sensitivity-histogram.png",
        "sensitivity-distance.png",
    ]
    assert paths == [copy2d / name for name in names]
    for path in paths:
        assert_png(path)
    assert not (copy2d / "configuration.png").exists()
    # The atomic writer leaves no temporary files behind.
    assert not list(copy2d.glob(".*tmp*"))


def test_without_a_center_there_is_no_distance_figure(copy2d):
    # A packing has no defect, and ε or a species' diameter act everywhere: no natural center.
    assert find_center(geometry(copy2d), None) is None
    names = [path.name for path in plot_run(copy2d)]
    assert names == ["sensitivity-diameter.A.png", "sensitivity-epsilon.png", "sensitivity-histogram.png"]


def test_selected_parameter_and_separate_out_dir(run2d, tmp_path):
    out = tmp_path / "figures"
    paths = plot_run(run2d, params=["epsilon"], out_dir=out, center=0)
    names = ["sensitivity-epsilon.png", "sensitivity-histogram.png", "sensitivity-distance.png"]
    assert paths == [out / name for name in names]
    assert_png(paths[0])
    assert not list(run2d.glob("*.png"))


def test_without_sensitivities_only_the_configuration(copy2d):
    (copy2d / "sensitivity.npz").unlink()
    assert plot_run(copy2d) == [copy2d / "configuration.png"]
    assert_png(copy2d / "configuration.png")
    assert not (copy2d / "sensitivity-histogram.png").exists()


def test_parameter_names_are_made_file_safe(copy2d):
    np.savez(copy2d / "sensitivity.npz", **{"sigma.Ar-Kr": np.ones((N, 2)), "a/b c": np.ones((N, 2))})
    names = list(figures(copy2d))
    assert names[:2] == ["sensitivity-sigma.Ar-Kr.png", "sensitivity-a_b_c.png"]


# --- what the configuration figure shows ----------------------------------------------------------


def test_configuration_with_arrows(run2d):
    run = geometry(run2d)
    fig = configuration_figure(
        run, select_view(run, None), find_center(run, None), "epsilon", run.sensitivities["epsilon"]
    )
    (ax,) = fig.axes
    # The value comes from sensitivity.json; the units, the arrows' scale and max|dx*/dθ| are stated.
    assert title(fig).splitlines()[0] == "dx*/dθ, θ = epsilon = 1.5"
    longest = np.linalg.norm(run.sensitivities["epsilon"], axis=1).max()
    assert said(fig) == (
        "dx*/dθ, θ = epsilon = 1.5 "
        "lengths in units of d_A = 1, the diameter of species A, energies in units of ε "
        f"arrow length = {1.0 / longest:.3g} × dx*/dθ "
        f"max|dx*/dθ| = {longest:.3g} d_A/ε (largest per-particle norm)"
    )
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (d_A)", "y (d_A)")
    assert ax.get_aspect() == 1.0
    # One arrow per atom, drawn at the atoms, the longest one large diameter long.
    arrows = only(ax, Quiver)
    assert arrows.N == N
    np.testing.assert_allclose(arrows.XY, np.mod(run.positions, run.box), atol=1e-12)
    assert arrows.scale == pytest.approx(longest / 1.0)
    # A disc per atom plus its periodic images; the disc in the corner has three.
    discs = only(ax, EllipseCollection)
    centers, _ = periodic_images(run, run.wrapped_xy(run.positions3), run.diameters)
    assert len(discs.get_offsets()) == len(centers) >= N + 3
    # The box is drawn, and everything in it is in view.
    assert len(only(ax, LineCollection).get_segments()) == 12
    low, high = np.array([ax.get_xlim(), ax.get_ylim()]).T
    assert np.all(low < 0) and np.all(high > run.box)
    # Species in the legend; the default center of a periodic run (the cell's) is not marked.
    assert legend_entries(ax) == ["A", "B"]
    assert ax.get_legend().get_title().get_text() == "species"


def test_configuration_without_sensitivities(run2d):
    run = geometry(run2d)
    fig = configuration_figure(run, select_view(run, None), find_center(run, None))
    (ax,) = fig.axes
    assert title(fig).splitlines()[0] == f"relaxed configuration, N = {N}"
    assert not [c for c in ax.collections if isinstance(c, Quiver)]
    assert legend_entries(ax) == ["A", "B"]


def test_a_given_center_is_marked_in_the_legend(run2d):
    run = geometry(run2d)
    fig = configuration_figure(run, select_view(run, None), find_center(run, 3))
    assert legend_entries(fig.axes[0]) == ["A", "B", "atom 3"]
    (marker,) = fig.axes[0].get_lines()
    np.testing.assert_allclose(marker.get_xydata(), [run.positions[3]])


def test_three_dimensional_projection_and_slice(run3d):
    drawn = figures(run3d, center=0)
    assert list(drawn) == ["sensitivity-alpha.png", "sensitivity-histogram.png", "sensitivity-distance.png"]
    projection = drawn["sensitivity-alpha.png"]
    assert title(projection).splitlines()[1] == f"x-y projection of all {N} atoms"
    assert title(projection).splitlines()[2].startswith("arrows: x-y components of")
    # max|dx*/dθ| is that of the 3-D vectors, not of the x-y components drawn.
    largest = np.linalg.norm(geometry(run3d).sensitivities["alpha"], axis=1).max()
    assert f"max|dx*/dθ| = {largest:.3g} " in title(projection)
    assert only(projection.axes[0], Quiver).N == N

    run = geometry(run3d)
    view = select_view(run, 1.0)
    # Atom 0 lies outside the slice about z = 1.5: its marker says so.
    assert not view.shown[0]
    sliced = figures(run3d, slice_width=1.0, center=0)["sensitivity-alpha.png"]
    assert view.text in said(sliced)
    assert only(sliced.axes[0], Quiver).N == view.shown.sum()
    assert (
        legend_entries(sliced.axes[0])[-1] == f"atom 0\n(z = {run.positions[0, 2]:.3g},\noutside the slice)"
    )


def test_a_slice_draws_cross_sections_of_the_spheres_that_cut_its_plane(run3d):
    run = geometry(run3d)
    view = select_view(run, 1.0)
    dz = run.positions[:, 2] - 1.5
    radius = run.diameters / 2
    # In the slab, and reaching the plane z = 1.5: drawn, as a disc of radius √(r² − dz²).
    np.testing.assert_array_equal(view.shown, (np.abs(dz) < 0.5) & (np.abs(dz) < radius))
    assert 0 < view.shown.sum() < (np.abs(dz) < 0.5).sum()
    fig = configuration_figure(run, view, None)
    discs = only(fig.axes[0], EllipseCollection)
    _, owners = periodic_images(run, run.wrapped_xy(run.positions3[view.shown]), view.sizes[view.shown])
    expected = 2 * np.sqrt(radius[view.shown] ** 2 - dz[view.shown] ** 2)[owners]
    np.testing.assert_allclose(discs._widths * 2, expected)
    assert np.all(expected < run.diameters[view.shown][owners])
    # The projection draws every atom at its full size.
    np.testing.assert_array_equal(select_view(run, None).sizes, run.diameters)


# --- histograms and distances ---------------------------------------------------------------------


def test_histogram_panels(run2d):
    run = geometry(run2d)
    fig = histogram_figure(run, ["diameter.A", "epsilon"])
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["θ = diameter.A", "θ = epsilon"]
    # Units of dx*/dθ: lengths over the parameter's own unit.
    assert [ax.get_xlabel() for ax in axes] == ["|dx*/dθ| (d_A/d_A)", "|dx*/dθ| (d_A/ε)"]
    # One legend for the figure, outside the panels.
    assert figure_legend_entries(fig) == ["A", "B"]
    assert all(ax.get_legend() is None for ax in axes)
    for ax, param in zip(axes, ["diameter.A", "epsilon"], strict=True):
        assert ax.get_ylabel() == "atoms"
        # Values within two decades: a linear axis.
        assert ax.get_xscale() == "linear"
        # Every atom is counted once, in its species' bars.
        assert sum(bar.get_height() for bar in ax.patches) == N
        assert ax.get_xlim()[1] == pytest.approx(np.linalg.norm(run.sensitivities[param], axis=1).max())


def test_histogram_bars_do_not_overlap_and_have_the_legend_colours(run2d):
    fig = histogram_figure(geometry(run2d), ["epsilon"])
    (ax,) = visible_axes(fig)
    (legend,) = fig.legends
    legend_colors = {tuple(handle.get_facecolor()) for handle in legend.legend_handles}
    bars = sorted(ax.patches, key=lambda bar: bar.get_x())
    # Opaque, in a colour of the legend: nothing mixes into a colour the legend does not show.
    assert {tuple(bar.get_facecolor()) for bar in bars} == legend_colors
    assert all(bar.get_facecolor()[3] == 1.0 for bar in bars)
    # Side by side: each bar starts where the one before it ends, or later.
    for before, after in zip(bars, bars[1:], strict=False):
        assert after.get_x() >= before.get_x() + before.get_width() - 1e-12


def test_values_spanning_decades_get_a_log_scale_that_skips_zeros(copy2d):
    sens = np.zeros((N, 2))
    sens[1:, 0] = np.logspace(-8, 0, N - 1)
    np.savez(
        copy2d / "sensitivity.npz", alpha=sens, epsilon=np.zeros((N, 2)), beta=np.ones((N, 2)), gamma=sens
    )
    drawn = figures(copy2d, center=0)
    histograms = visible_axes(drawn["sensitivity-histogram.png"])
    # Four panels in a 2 × 3 grid, the other two hidden.
    assert len(drawn["sensitivity-histogram.png"].axes) == 6 and len(histograms) == 4
    alpha, epsilon, beta, _ = histograms
    # Atom 0 (dx*/dθ = 0) and the atoms below max/1e6 have no place on the log axis.
    hidden = 1 + int(np.sum(np.logspace(-8, 0, N - 1) < 1e-6))
    assert " ".join(alpha.get_title().split()) == f"θ = alpha {hidden} atoms below max/1e6 (or 0) not shown"
    assert sum(bar.get_height() for bar in alpha.patches) == N - hidden
    assert [t.get_text() for t in epsilon.texts] == ["dx*/dθ = 0 exactly"] and not epsilon.patches
    # One scale for the whole figure: β's values, all equal, are on a log axis too.
    assert [ax.get_xscale() for ax in histograms] == ["log"] * 4
    assert sum(bar.get_height() for bar in beta.patches) == N

    distance = visible_axes(drawn["sensitivity-distance.png"])
    assert [ax.get_yscale() for ax in distance] == ["log"] * 4
    points = [c for c in distance[0].collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in points) == N - hidden
    assert [t.get_text() for t in distance[1].texts] == ["dx*/dθ = 0 exactly"]
    assert not [c for c in distance[1].collections if isinstance(c, PathCollection)]


@pytest.mark.parametrize("smallest", [0.0, 1e-15, 1e-9])
def test_log_axes_stop_a_few_decades_below_the_largest_value(copy2d, smallest):
    sens = np.zeros((N, 2))
    sens[1:, 1] = np.geomspace(1e-8, 2.0, N - 1)
    sens[0, 1] = smallest
    np.savez(copy2d / "sensitivity.npz", alpha=sens)
    drawn = figures(copy2d, center=0)
    (histogram,) = visible_axes(drawn["sensitivity-histogram.png"])
    (distance,) = visible_axes(drawn["sensitivity-distance.png"])
    floor = 2.0 / 10**LOG_DECADES
    assert histogram.get_xscale() == "log" and distance.get_yscale() == "log"
    assert floor <= histogram.get_xlim()[0] < histogram.get_xlim()[1] == pytest.approx(2.0)
    assert floor <= distance.get_ylim()[0] < 2.0 < distance.get_ylim()[1]


def test_distances_from_a_given_point(run2d):
    run = geometry(run2d)
    center = find_center(run, (2.5, 2.0))
    fig = distance_figure(run, ["epsilon"], center)
    assert title(fig) == "|dx*/dθ| against distance from point (2.5, 2)"
    (ax,) = visible_axes(fig)
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "θ = epsilon",
        "distance (d_A, minimum image)",
        "|dx*/dθ| (d_A/ε)",
    )
    assert figure_legend_entries(fig) == ["A", "B"]
    # One point per atom, at its minimum-image distance and |dx*/dθ|.
    points = np.vstack([c.get_offsets() for c in ax.collections])
    expected = np.column_stack(
        [distances_from(run, center.point), np.linalg.norm(run.sensitivities["epsilon"], axis=1)]
    )
    order = np.lexsort(expected.T)
    np.testing.assert_allclose(points[np.lexsort(points.T)], expected[order])
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0


# --- units, zero sensitivities, rattlers, layout --------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "length", "epsilon", "diameter", "alpha"),
    [
        (SOFT_SPHERES, "d_A", "d_A/ε", "d_A/d_A", "d_A"),
        # Soft spheres without a diameter of 1, and an ε that is not 1: the input's units.
        (
            {"potential": {"name": "soft_sphere", "epsilon": 2.0}, "species": {"A": {"diameter": 1.4}}},
            UNKNOWN_LENGTH,
            f"{UNKNOWN_LENGTH} per unit of θ",
            f"{UNKNOWN_LENGTH} per unit of θ",
            UNKNOWN_LENGTH,
        ),
        # The shipped Lennard-Jones recipes: reduced units.
        (
            {"lattice": {}, "potential": {"name": "lennard_jones", "sigma": 1.0, "epsilon": 1.0}},
            "σ",
            "σ/ε",
            "σ/σ",
            f"{UNKNOWN_LENGTH} per unit of θ",
        ),
        # A structure file with σ in Å: ASE's units.
        (
            {
                "structure": "/data/POSCAR",
                "potential": {"name": "morse", "alpha": 1.6},
                "species": {"Cu": {"sigma": 2.6, "epsilon": 0.34}},
            },
            "Å",
            "Å/eV",
            "Å/Å",
            "Å²",
        ),
        (None, UNKNOWN_LENGTH, f"{UNKNOWN_LENGTH} per unit of θ", f"{UNKNOWN_LENGTH} per unit of θ", None),
    ],
)
def test_units_come_from_the_recipe(recipe, length, epsilon, diameter, alpha):
    units = units_of(recipe)
    assert units.length_label() == length
    assert units.sensitivity_label("epsilon.Cu") == epsilon
    assert units.sensitivity_label("sigma.Ar-Kr") == units.sensitivity_label("diameter.B") == diameter
    if alpha is not None:
        assert units.sensitivity_label("alpha") == alpha


def test_every_axis_has_units(copy2d):
    recipe = {
        "structure": "POSCAR",
        "potential": {"name": "lennard_jones", "sigma": 3.4, "epsilon": 0.0104},
    }
    (copy2d / "system.toml").write_text(tomli_w.dumps(recipe))
    drawn = figures(copy2d, center=0)
    configuration = drawn["sensitivity-epsilon.png"]
    assert (configuration.axes[0].get_xlabel(), configuration.axes[0].get_ylabel()) == ("x (Å)", "y (Å)")
    assert "lengths in Å and energies in eV, as ASE reads structure files" in title(configuration)
    histogram = visible_axes(drawn["sensitivity-histogram.png"])
    assert [ax.get_xlabel() for ax in histogram] == ["|dx*/dθ| (Å/Å)", "|dx*/dθ| (Å/eV)"]
    distance = visible_axes(drawn["sensitivity-distance.png"])
    assert {ax.get_xlabel() for ax in distance} == {"distance (Å, minimum image)"}
    assert [ax.get_ylabel() for ax in distance] == ["|dx*/dθ| (Å/Å)", "|dx*/dθ| (Å/eV)"]
    # Without system.toml nothing says what the units are, and the axes say so.
    (copy2d / "system.toml").unlink()
    ax = figures(copy2d)["sensitivity-epsilon.png"].axes[0]
    assert ax.get_xlabel() == f"x ({UNKNOWN_LENGTH})"


def recorded(run_dir, parameters):
    """The run as the reader returns it, with ``parameters``, the entries of sensitivity.json."""
    return RunGeometry(replace(read_run(run_dir), parameters=parameters))


@pytest.mark.parametrize(
    ("entry", "note"),
    [
        ({"exactly_zero": True, "resolved": True, "max_particle_dx": 0.0}, "dx*/dθ = 0 exactly"),
        (
            {"exactly_zero": False, "resolved": False, "max_particle_dx": 1.2e-9},
            "dx*/dθ below the solve's resolution (max|dx*/dθ| = 1.2e-09, noise): not drawn",
        ),
    ],
)
def test_zero_and_unresolved_sensitivities_are_never_drawn_as_arrows(copy2d, entry, note):
    sens = np.zeros((N, 2))
    if not entry["exactly_zero"]:
        # Noise of a solve that cannot resolve it: drawn, it would look like signal.
        sens = np.random.default_rng(3).normal(size=(N, 2)) * 1e-9
    np.savez(copy2d / "sensitivity.npz", epsilon=sens, alpha=np.ones((N, 2)))
    run = recorded(copy2d, {"epsilon": entry})
    assert not run.facts["epsilon"].drawable and run.facts["alpha"].drawable
    drawn = dict(run_figures(run, ["epsilon", "alpha"], select_view(run, None), find_center(run, 0)))
    configuration = drawn["sensitivity-epsilon.png"]
    assert not quivers(configuration.axes[0])
    assert f"{note}: no arrows" in said(configuration)
    for name in ("sensitivity-histogram.png", "sensitivity-distance.png"):
        epsilon, alpha = visible_axes(drawn[name])
        assert " ".join(t.get_text() for t in epsilon.texts).replace("\n", " ") == note
        assert not epsilon.patches and not [c for c in epsilon.collections if isinstance(c, PathCollection)]
        assert alpha.patches or [c for c in alpha.collections if isinstance(c, PathCollection)]
    # Without the record: an all-zero array is exactly zero too.
    np.savez(copy2d / "sensitivity.npz", epsilon=np.zeros((N, 2)))
    fig = figures(copy2d)["sensitivity-epsilon.png"]
    assert not quivers(fig.axes[0]) and "dx*/dθ = 0 exactly: no arrows" in title(fig)


def test_recorded_max_particle_dx_is_the_one_shown(copy2d):
    run = recorded(copy2d, {"epsilon": {"exactly_zero": False, "resolved": True, "max_particle_dx": 7.25}})
    fig = configuration_figure(run, select_view(run, None), None, "epsilon", run.sensitivities["epsilon"])
    assert "max|dx*/dθ| = 7.25 d_A/ε (largest per-particle norm)" in said(fig)


def rattler_run(run_dir):
    """A packing in which atom 4 is a rattler: its dx*/dθ is zero in every parameter."""
    with np.load(run_dir / "sensitivity.npz") as data:
        arrays = {name: data[name].copy() for name in data.files}
    for array in arrays.values():
        array[4] = 0.0
    np.savez(run_dir / "sensitivity.npz", **arrays)
    return geometry(run_dir)


def test_rattlers_are_hatched_and_in_the_legend(copy2d):
    run = rattler_run(copy2d)
    np.testing.assert_array_equal(np.flatnonzero(run.rattlers), [4])
    fig = configuration_figure(run, select_view(run, None), None, "epsilon", run.sensitivities["epsilon"])
    (ax,) = fig.axes
    assert legend_entries(ax) == ["A", "B", "rattlers (1)"]
    assert ax.get_legend().legend_handles[-1].get_hatch()
    discs = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    hatched = [c for c in discs if c.get_hatch()]
    assert len(discs) == 2 and len(hatched) == 1
    centers, owners = periodic_images(run, run.wrapped_xy(run.positions3), run.diameters)
    np.testing.assert_allclose(hatched[0].get_offsets(), centers[owners == 4])
    # The histogram leaves them out, and says so.
    histogram = histogram_figure(run, ["epsilon"])
    assert figure_legend_entries(histogram)[-1] == "rattlers (1): dx*/dθ = 0, not shown"
    assert sum(bar.get_height() for bar in visible_axes(histogram)[0].patches) == N - 1
    # A recorded list of rattlers is used as it is.
    assert np.flatnonzero(recorded(copy2d, {}).rattlers).tolist() == [4]
    listed = RunGeometry(replace(read_run(copy2d), rattlers=np.isin(np.arange(N), [1, 2])))
    assert np.flatnonzero(listed.rattlers).tolist() == [1, 2]


def test_arrows_start_in_the_cell_and_end_at_its_edge(copy2d):
    # Arrows as long as the box: drawn whole, most would leave it.
    positions = np.load(copy2d / "relaxed.npz")["positions"]
    np.savez(copy2d / "relaxed.npz", positions=positions + [[10.0, -8.0]])
    run = geometry(copy2d)
    fig = configuration_figure(run, select_view(run, None), None, "epsilon", run.sensitivities["epsilon"])
    (ax,) = fig.axes
    arrows = only(ax, Quiver)
    assert np.all((arrows.XY >= 0) & (arrows.XY < run.box))
    clip = arrows.get_clip_path().get_fully_transformed_path().get_extents()
    np.testing.assert_allclose(clip.get_points(), ax.transData.transform([[0, 0], run.box]))
    # The axes show the cell (and a margin), not the arrows' full length.
    low, high = np.array([ax.get_xlim(), ax.get_ylim()]).T
    assert np.all(high - low < 1.1 * run.box)


def rendered(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("kind", ["configuration", "histogram", "distance"])
def test_titles_fit_the_figure_and_legends_cover_no_panel(copy2d, kind):
    long_name = "sigma.Argon_with_a_rather_long_species_name-Krypton_with_another_long_name"
    np.savez(copy2d / "sensitivity.npz", **{long_name: np.ones((N, 2)), "epsilon": np.ones((N, 2))})
    run = rattler_run(copy2d)
    if kind == "configuration":
        fig = configuration_figure(
            run, select_view(run, None), find_center(run, 2), long_name, np.ones((N, 2))
        )
        legend = fig.axes[0].get_legend()
    elif kind == "histogram":
        fig = histogram_figure(run, [long_name, "epsilon"])
        (legend,) = fig.legends
    else:
        fig = distance_figure(run, [long_name, "epsilon"], find_center(run, 2))
        (legend,) = fig.legends
    renderer = rendered(fig)
    whole = fig.bbox
    texts = [fig._suptitle] if fig._suptitle is not None else []
    texts += [ax.title for ax in visible_axes(fig)]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and box.y1 <= whole.y1, text.get_text()
    box = legend.get_window_extent(renderer)
    assert box.x1 <= whole.x1
    for ax in visible_axes(fig):
        assert not box.overlaps(ax.get_window_extent(renderer))


# --- reading the run ------------------------------------------------------------------------------


def test_npz_positions_and_json_values_are_used(run2d):
    positions = np.load(run2d / "relaxed.npz")["positions"]
    run = geometry(run2d)
    # Bit-for-bit the npz positions, not the rounded extxyz text.
    np.testing.assert_array_equal(run.positions, positions)
    assert run.values == {"diameter.A": 1.0, "epsilon": 1.5}
    assert run.species == ("A", "B")
    assert run.sized and set(run.diameters) == {1.0, 0.6}


def test_missing_species_names_still_plots(copy2d):
    atoms = ase.io.read(copy2d / "relaxed.extxyz")
    del atoms.info["species_names"]
    ase.io.write(copy2d / "relaxed.extxyz", atoms, format="extxyz")
    # Two types, all atoms of the placeholder symbol X: named by their type.
    assert geometry(copy2d).species == ("T0", "T1")
    fig = figures(copy2d, [])["configuration.png"]
    assert legend_entries(fig.axes[0]) == ["T0", "T1"]


def test_unknown_parameter_lists_available_names(run2d):
    with pytest.raises(UserError, match=r"alpha.*available: diameter\.A, epsilon") as info:
        plot_run(run2d, params=["alpha"])
    assert "\n" not in str(info.value)


def test_parameter_requested_without_sensitivity_file(copy2d):
    (copy2d / "sensitivity.npz").unlink()
    with pytest.raises(UserError, match="no sensitivity.npz"):
        plot_run(copy2d, params=["epsilon"])


@pytest.mark.parametrize("missing", ["relaxed.npz", "relaxed.extxyz"])
def test_missing_run_file(copy2d, missing):
    (copy2d / missing).unlink()
    with pytest.raises(UserError, match=f"{missing} is missing"):
        plot_run(copy2d)


def test_missing_run_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"epsilon": np.zeros((N - 1, 2))}, "'epsilon' has shape"),
        ({"epsilon": np.full((N, 2), np.nan)}, "'epsilon' has non-finite values"),
    ],
)
def test_bad_sensitivity_arrays(copy2d, arrays, match):
    np.savez(copy2d / "sensitivity.npz", **arrays)
    with pytest.raises(UserError, match=match):
        plot_run(copy2d)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("relaxed.extxyz", b"garbage\nnot an extxyz file\n", "XYZError"),
        ("relaxed.extxyz", b"", "it holds no structure"),
        ("relaxed.npz", b"PK not a zip", "cannot read"),
        ("sensitivity.npz", b"PK not a zip", "cannot read"),
        ("sensitivity.json", b"\xff{", "cannot read"),
    ],
)
def test_damaged_file_is_a_user_error_naming_it(copy2d, name, content, match):
    (copy2d / name).write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        plot_run(copy2d)
    assert str(copy2d / name) in str(info.value)
    assert not list(copy2d.glob("*.png"))


def test_positions_and_structure_must_agree(copy2d):
    np.savez(copy2d / "relaxed.npz", positions=np.zeros((N + 1, 2)))
    with pytest.raises(UserError, match="relaxed.extxyz holds 10 atoms, but relaxed.npz holds 11"):
        plot_run(copy2d)


def test_periodic_images_of_a_disc_in_a_corner(run2d):
    run = geometry(run2d)
    diameters = np.full(N, 0.1)
    diameters[0] = 1.0
    xy = np.mod(run.positions, run.box)
    centers, owners = periodic_images(run, xy, diameters)
    # The disc at (0.1, 3.95) of radius 0.5 reaches across both edges: four copies.
    corner = centers[owners == 0]
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
    # Some atoms start outside the cell: the figure wraps them in.
    atoms.positions[:4] += 2.5 * atoms.cell[0]
    write_atoms_run(tmp_path, atoms)
    run = geometry(tmp_path)
    assert run.species == ("Ar", "Kr")
    # No images in a non-orthogonal cell; atoms sized by their nearest-neighbour distance.
    assert not run.wrap.any() and not run.sized
    distances = atoms.get_all_distances(mic=True) + np.diag(np.full(len(atoms), np.inf))
    np.testing.assert_allclose(run.diameters, 0.5 * np.median(distances.min(axis=1)), rtol=1e-6)
    if species_names is not None:
        return  # the figures are the same
    # A perfect crystal has no vacancy and a global parameter no center: no distance figure.
    drawn = figures(tmp_path)
    assert list(drawn) == [
        "sensitivity-sigma.Ar-Kr.png",
        "sensitivity-epsilon.Ar.png",
        "sensitivity-histogram.png",
    ]
    ax = drawn["sensitivity-sigma.Ar-Kr.png"].axes[0]
    lines = title(drawn["sensitivity-sigma.Ar-Kr.png"]).splitlines()
    assert "atoms drawn 0.5 × the nearest-neighbour distance wide" in lines
    assert "non-orthogonal cell: outline projected, no periodic images drawn" in lines
    # No images: one disc per atom, inside the projected outline of the cell's 12 edges.
    assert len(only(ax, EllipseCollection).get_offsets()) == len(atoms)
    assert len(only(ax, LineCollection).get_segments()) == 12
    assert legend_entries(ax) == ["Ar", "Kr"]
    # Every arrow starts in the cell (fractional coordinates in [0, 1)) and is clipped to it.
    arrows = only(ax, Quiver)
    fractional = np.linalg.solve(atoms.cell.array.T, run.wrapped(run.positions3).T).T
    assert np.all((fractional >= -1e-12) & (fractional < 1 + 1e-12))
    np.testing.assert_allclose(arrows.XY, run.wrapped(run.positions3)[:, :2])
    clip = arrows.get_clip_path().get_fully_transformed_path()
    outline = ax.transData.transform(run.outline())
    np.testing.assert_allclose(clip.get_extents().get_points(), [outline.min(axis=0), outline.max(axis=0)])
    # The first sensitivity spans six decades: log axes.
    assert visible_axes(drawn["sensitivity-histogram.png"])[0].get_xscale() == "log"


def test_free_cluster_with_zero_cell(tmp_path):
    atoms = ase.cluster.Icosahedron("Ar", noshells=2, latticeconstant=5.26)
    assert len(atoms) == 13
    atoms.set_cell(np.zeros(3))
    atoms.pbc = False
    atoms.new_array("type", np.zeros(13, dtype=int))
    write_atoms_run(tmp_path, atoms, sensitivities=("epsilon",))
    run = geometry(tmp_path)
    assert run.species == ("Ar",) and not run.periodic and not run.wrap.any()
    # A global parameter has no natural center in a cluster either.
    assert find_center(run, None) is None
    drawn = figures(tmp_path, slice_width=2.0, center=0)
    # No cell: no outline, arrows not clipped; a plain distance axis.
    ax = drawn["sensitivity-epsilon.png"].axes[0]
    assert not [c for c in ax.collections if isinstance(c, LineCollection)]
    assert only(ax, Quiver).get_clip_path() is None
    xlabel = visible_axes(drawn["sensitivity-distance.png"])[0].get_xlabel()
    assert xlabel == f"distance ({UNKNOWN_LENGTH})"
    assert_png(plot_run(tmp_path, params=[], slice_width=2.0)[0])


def vacancy_crystal(kind, a, remove=True, defect=False):
    atoms = ase.build.bulk("Ar", kind, a=a, cubic=True).repeat(3)
    site = atoms.positions[5].copy()
    if remove:
        del atoms[5]
    atoms.new_array("type", np.zeros(len(atoms), dtype=int))
    atoms.info["species_names"] = "Ar"
    if defect:
        atoms.info["defect_position"] = site
    return atoms, site


def test_defect_position_is_the_default_center_and_distances_use_minimum_images(tmp_path):
    atoms = ase.build.bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)
    defect = atoms.positions[0].copy()  # the origin, a corner of the cell
    del atoms[0]
    atoms.new_array("type", np.zeros(len(atoms), dtype=int))
    atoms.info["species_names"] = "Ar"
    atoms.info["defect_position"] = defect
    write_atoms_run(tmp_path, atoms, sensitivities=("epsilon",))
    run = geometry(tmp_path)
    # ASE reads the space-separated info value back as an array.
    assert isinstance(run.defect, np.ndarray)
    center = find_center(run, None)
    assert center.text == "defect at (0, 0, 0)" and center.label == "defect"
    distances = distances_from(run, center.point)
    # The vacancy's 12 nearest neighbours lie a / √2 away, most of them across the cell's faces.
    assert np.sum(np.isclose(distances, 5.26 / np.sqrt(2))) == 12
    assert distances.max() <= np.sqrt(3) * 1.5 * 5.26 + 1e-9
    drawn = figures(tmp_path)
    assert legend_entries(drawn["sensitivity-epsilon.png"].axes[0]) == ["Ar", "defect"]
    assert title(drawn["sensitivity-distance.png"]) == "|dx*/dθ| against distance from defect at (0, 0, 0)"


@pytest.mark.parametrize(("kind", "a"), [("fcc", 5.26), ("bcc", 4.2), ("sc", 3.4)])
def test_a_vacancy_in_a_crystal_is_found_and_a_perfect_crystal_has_none(tmp_path, kind, a):
    atoms, site = vacancy_crystal(kind, a)
    write_atoms_run(tmp_path / "vacancy", atoms, sensitivities=("epsilon",))
    center = find_center(geometry(tmp_path / "vacancy"), None)
    assert center.label == "vacancy" and center.text.startswith("vacancy found at (")
    offset = get_distances(center.point, site, cell=atoms.cell, pbc=True)[1]
    assert offset.item() < 1e-9
    # Its interstitial holes are no vacancy.
    perfect, _ = vacancy_crystal(kind, a, remove=False)
    write_atoms_run(tmp_path / "perfect", perfect, sensitivities=("epsilon",))
    assert find_center(geometry(tmp_path / "perfect"), None) is None


def test_center_by_atom_index_and_by_coordinates(run3d):
    run = geometry(run3d)
    by_index = find_center(run, 3)
    assert by_index.text == "atom 3 (B)" and by_index.label == "atom 3"
    np.testing.assert_array_equal(by_index.point, run.positions[3])
    assert distances_from(run, by_index.point)[3] == 0
    assert find_center(run, np.int64(3)).text == "atom 3 (B)"
    by_point = find_center(run, (1, 2.5, 0.25))
    assert by_point.text == "point (1, 2.5, 0.25)" and by_point.label == "center"
    np.testing.assert_array_equal(by_point.point, [1, 2.5, 0.25])


def test_center_in_two_dimensions_takes_two_or_three_coordinates(run2d):
    run = geometry(run2d)
    np.testing.assert_array_equal(find_center(run, (1, 2)).point, [1, 2, 0])
    np.testing.assert_array_equal(find_center(run, (1, 2, 0)).point, [1, 2, 0])


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
def test_bad_center(copy3d, center, match):
    with pytest.raises(UserError, match=match):
        plot_run(copy3d, center=center)
    # Nothing is drawn before the arguments are checked.
    assert not list(copy3d.glob("*.png"))


def test_malformed_defect_position(copy3d):
    atoms = ase.io.read(copy3d / "relaxed.extxyz")
    atoms.info["defect_position"] = "vacancy"
    ase.io.write(copy3d / "relaxed.extxyz", atoms, format="extxyz")
    with pytest.raises(UserError, match="defect_position.*pass a center"):
        plot_run(copy3d)
    # An explicit center does not need it.
    assert plot_run(copy3d, params=[], center=0) == [copy3d / "configuration.png"]


def test_slice_of_a_three_dimensional_run(run3d):
    run = geometry(run3d)
    positions = run.positions
    # Periodic in z: about the middle of the cell, z = 1.5.
    view = select_view(run, 1.0)
    in_slab = np.abs(positions[:, 2] - 1.5) < 0.5
    np.testing.assert_array_equal(view.shown, in_slab & (np.abs(positions[:, 2] - 1.5) < run.diameters / 2))
    assert 0 < view.shown.sum() < N
    assert view.text.startswith("slice |z − 1.5| < 0.5 (middle of the cell)")
    assert view.text.endswith(f"{view.shown.sum()} of {N} atoms, drawn as their cross-sections with z = 1.5")
    # Minimum image in z: 4.6 and -1.4 are 0.1 from the middle, 1.5, as is 1.6.
    np.testing.assert_array_equal(view.inside(np.array([1.6, 2.1, 4.6, -1.4])), [True, False, True, True])
    assert select_view(run, None).text == f"x-y projection of all {N} atoms"
    assert select_view(run, None).shown.all()


def test_slice_of_a_free_cluster_is_about_the_middle_of_its_atoms(tmp_path):
    atoms = ase.Atoms("Ar4", positions=[[0, 0, 10], [1, 0, 11], [0, 1, 12], [1, 1, 14]])
    atoms.new_array("type", np.zeros(4, dtype=int))
    write_atoms_run(tmp_path, atoms, sensitivities=())
    run = geometry(tmp_path)
    view = select_view(run, 2.5)
    # z = 11 and 12 are in the slab about z = 12, but the first is too far from the plane to cut it.
    assert run.diameters[1] / 2 < 1
    np.testing.assert_array_equal(view.shown, [False, False, True, False])
    assert "(middle of the atoms' z-range): 1 of 4 atoms" in view.text


@pytest.mark.parametrize(
    ("dim", "width", "match"),
    [
        (2, 1.0, "a slice needs a 3-D run; this one is 2-D"),
        (3, 0.0, "must be positive"),
        (3, float("inf"), "must be positive"),
        (3, 1e-9, "no atom within the slice"),
    ],
)
def test_bad_slice(run2d, run3d, dim, width, match):
    with pytest.raises(UserError, match=match):
        plot_run(run2d if dim == 2 else run3d, slice_width=width)


# --- the command line ------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_plot_with_center_and_slice(copy3d):
    result = runner.invoke(app, ["plot", "--center", "3", "--slice", "1.5", "--run", str(copy3d)])
    assert result.exit_code == 0, result.output
    names = ["sensitivity-alpha.png", "sensitivity-histogram.png", "sensitivity-distance.png"]
    assert result.stdout.splitlines() == [str(copy3d / name) for name in names]
    # Coordinates, on a run without sensitivities: the configuration figure alone.
    (copy3d / "sensitivity.npz").unlink()
    result = runner.invoke(app, ["plot", "--center", "1.0, 2,0.5", "--run", str(copy3d)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(copy3d / "configuration.png")]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--center", "a,b"], "--center 'a,b' is neither an atom index"),
        (["--center", "1,2"], "3 finite coordinates"),
        (["--center", "99"], "atom index 99 is out of range"),
        (["--slice", "-1"], "must be positive"),
    ],
)
def test_cli_plot_bad_center_or_slice_is_a_one_line_error(run3d, args, match):
    result = runner.invoke(app, ["plot", *args, "--run", str(run3d)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Error" in lines[0] and match in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not list(run3d.glob("*.png"))


# --- per-particle gradients of observables (observables.json + observables.npz) -------------------


def add_observables(run_dir, gradients: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write observables.json and observables.npz as `mdsens sensitivity --per-particle` does:
    ``gradients`` maps an observable to (its units, dq/d(diameter[i]) for every particle)."""
    table = {
        name: {"units": units, "per_particle": {"diameter": {"npz_key": f"{name}/diameter"}}}
        for name, (units, _) in gradients.items()
    }
    (run_dir / "observables.json").write_text(json.dumps({"observables": table}))
    np.savez(run_dir / "observables.npz", **{f"{n}/diameter": v for n, (_, v) in gradients.items()})


def colour_bar(fig):
    """The configuration's axes and its colour bar's."""
    ax, bar = fig.axes
    return ax, bar


def test_per_particle_gradients_get_a_figure_coloured_by_them(copy2d):
    values = np.linspace(-1.0, 2.0, N)
    add_observables(copy2d, {"pressure": ("energy / length^2", values), "f.py:g": ("user", -values)})
    drawn = figures(copy2d)
    assert list(drawn)[-2:] == ["observable-pressure-diameter.png", "observable-f.py_g-diameter.png"]
    fig = drawn["observable-pressure-diameter.png"]
    assert said(fig).startswith("d(pressure)/d(diameter[i]): the derivative of pressure")
    sums = {t: values[np.arange(N) % 2 == t].sum() for t in (0, 1)}
    assert f"A {sums[0]:+.4g}, B {sums[1]:+.4g}" in said(fig)  # each species' sum
    ax, bar = colour_bar(fig)
    assert bar.get_xlim() == pytest.approx((-2.0, 2.0))  # centred at 0, to the largest |value|
    assert bar.get_xlabel() == "d(pressure)/d(diameter[i]) (ε / d_A³)"
    assert ax.get_legend() is None  # colour is the gradient, not the species; no rattler, no center
    discs = only(ax, EllipseCollection).get_facecolors()
    run = geometry(copy2d)
    _, owners = periodic_images(run, run.wrapped_xy(run.positions3), run.diameters)
    # Red where the gradient is positive, blue where negative (each disc is some particle's image).
    signs, redder = np.sign(values[owners]), np.sign(discs[:, 0] - discs[:, 2])
    assert np.array_equal(redder[signs != 0], signs[signs != 0])
    _, user = colour_bar(drawn["observable-f.py_g-diameter.png"])
    assert user.get_xlabel() == "d(f.py:g)/d(diameter[i]) (units of f.py:g per unit of diameter)"
    paths = plot_run(copy2d)
    for path in paths[-2:]:
        assert_png(path)


def test_a_zero_gradient_is_drawn_white_on_a_unit_scale(copy2d):
    add_observables(copy2d, {"pressure": ("energy / length^2", np.zeros(N))})
    ax, bar = colour_bar(figures(copy2d, [])["observable-pressure-diameter.png"])
    assert bar.get_xlim() == pytest.approx((-1.0, 1.0))
    assert np.allclose(only(ax, EllipseCollection).get_facecolors()[:, :3], 0.97, atol=0.03)


def test_per_particle_gradients_of_a_three_dimensional_run(copy3d):
    add_observables(copy3d, {"distance:1,2": ("length", np.arange(N) - 4.5)})
    fig = figures(copy3d, slice_width=1.5)["observable-distance_1_2-diameter.png"]
    assert "slice" in said(fig)
    _, bar = colour_bar(fig)
    assert bar.get_xlabel().endswith("(dimensionless)")  # length per length, units unknown


@pytest.mark.parametrize(
    ("units", "parameter", "recipe", "expected"),
    [
        ("energy / length^2", "diameter", SOFT_SPHERES, "ε / d_A³"),
        ("energy / length^3", "diameter", SOFT_SPHERES, "ε / d_A⁴"),
        ("energy", "epsilon", SOFT_SPHERES, "dimensionless"),
        ("length", "epsilon", SOFT_SPHERES, "d_A / ε"),
        ("energy / length^2", "diameter", None, "energy / length³"),
        ("energy", "alpha", SOFT_SPHERES, "units of q per unit of alpha"),
        ("user", "diameter", SOFT_SPHERES, "units of q per unit of diameter"),
    ],
)
def test_units_of_a_per_particle_gradient(units, parameter, recipe, expected):
    gradient = PerAtomGradient("q", parameter, units, np.zeros(N))
    assert gradient_units(units_of(recipe), gradient) == expected


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("no npz", "observables.npz"),
        ("wrong shape", "is not 10 finite numbers"),
        ("no key", "has no array"),
        ("no table", "has no table of observables"),
    ],
)
def test_damaged_observable_files_are_user_errors(copy2d, damage, match):
    add_observables(copy2d, {"pressure": ("energy / length^2", np.ones(N))})
    if damage == "no npz":
        (copy2d / "observables.npz").unlink()
    elif damage == "wrong shape":
        np.savez(copy2d / "observables.npz", **{"pressure/diameter": np.ones(N + 1)})
    elif damage == "no key":
        np.savez(copy2d / "observables.npz", other=np.ones(N))
    else:
        (copy2d / "observables.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=match):
        plot_run(copy2d)
    assert not list(copy2d.glob("*.png"))
