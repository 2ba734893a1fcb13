"""``mdsens sensitivity --observable`` and ``--per-particle``, and ``mdsens plot``'s per-particle
figures, end to end on a 32-particle packing, against references computed from the run's own files:

* ``distance:I,J`` by the adjoint solve against r̂_IJ · (dx_I − dx_J) from sensitivity.npz;
* a user observable (a file written here: the energy through ``system.energy_fn``) against the
  envelope theorem's dE*/dθ in sensitivity.json;
* per-particle gradients: observables.npz, the sensitivity.extxyz column and the summary in
  observables.json agree, and their sums per species are the species' gradients;
* reverse mode (one adjoint solve per observable, chosen with --per-particle) and forward mode
  (free from the sensitivities the command solves anyway, chosen without) give the same numbers.

Bad input is one line on stderr, exit 2, and leaves the run as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, cli, describe
from matplotlib.collections import EllipseCollection

from mdsens.manifest import read_manifest
from mdsens.plot import configuration_figure
from mdsens.plot_geometry import RunGeometry, periodic_images, select_view
from mdsens.run_files import read_run

SMALL = ("--set", "n_particles=32")
RUN = Path("results") / "binary-packing"
PAIR = (3, 17)
USER_FILE = """\
import jax.numpy as jnp


def energy(positions, system, params):
    return system.energy_fn(positions, params)


def vector(positions, system, params):
    return positions[0]


def broken(positions, system, params):
    raise RuntimeError("broken on purpose")
"""
OBSERVABLES = ("pressure", f"distance:{PAIR[0]},{PAIR[1]}", "mine.py:energy")


def ok(result) -> list[str]:
    assert result.exit_code == 0, describe(result)
    return result.stdout.splitlines()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(USER_FILE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A relaxed 32-particle run differentiated with observables: ``reverse`` (with
    --per-particle, so one adjoint solve per observable, then plotted), and ``forward``, a copy of
    it differentiated again without --per-particle (the sensitivities serve); the stdout of
    each; read-only."""
    base = tmp_path_factory.mktemp("observables")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        (base / "mine.py").write_text(USER_FILE)
        ok(cli("relax", *SMALL, "--out", "reverse"))
        asked = [a for name in OBSERVABLES for a in ("--observable", name)]
        params = ("--param", "diameter", "--param", "alpha")
        reverse = ok(cli("sensitivity", "--run", "reverse", *params, *asked, "--per-particle"))
        plotted = ok(cli("plot", "--run", "reverse"))
        shutil.copytree("reverse", "forward")
        forward = ok(cli("sensitivity", "--run", "forward", *params, *asked))
    return {
        "reverse": base / "reverse",
        "forward": base / "forward",
        "stdout": {"reverse": "\n".join(reverse), "forward": "\n".join(forward)},
        "plotted": [Path(line) for line in plotted],
    }


def test_observables_json_records_values_gradients_and_how(runs):
    run = runs["reverse"]
    summary = read_json(run / "observables.json")
    manifest = read_manifest(run)
    assert summary["state"] == manifest.state
    assert {manifest.files[n].stage for n in ("observables.json", "observables.npz")} == {"sensitivity"}
    assert summary["mode"] == "reverse" and summary["solves"] == len(OBSERVABLES)
    assert summary["reason"].startswith("reverse mode, the fewer solves: 3 adjoint solve(s)")
    assert "32 forward solve(s)" in summary["reason"]  # one per particle's own diameter
    assert "Observables by reverse mode, the fewer solves" in runs["stdout"]["reverse"]
    assert summary["parameters"] == ["diameter.A", "diameter.B", "alpha"]
    assert summary["per_particle"] == ["diameter"]
    assert {"jax", "mdsens", "numpy"} <= set(summary["versions"])
    assert list(summary["observables"]) == list(OBSERVABLES)
    units = {"pressure": "energy / length^2", OBSERVABLES[1]: "length", "mine.py:energy": "user"}
    for name, entry in summary["observables"].items():
        assert entry["units"] == units[name]
        assert list(entry["gradient"]) == list(entry["explicit"]) == summary["parameters"]
        solver = entry["solver"]
        assert solver["mode"] == "reverse" and solver["solves"] == 1 and solver["converged"] is True
        assert solver["iterations"] > 0 and solver["residual"] < 1e-10
        assert entry["rattler_dependence"] >= 0 and isinstance(entry["warnings"], list)
    # Distances do not depend on θ at fixed positions: the whole derivative is the relaxation's.
    assert set(summary["observables"][OBSERVABLES[1]]["explicit"].values()) == {0.0}
    assert summary["observables"]["pressure"]["value"] > 0


def minimum_image(run: Path, i: int, j: int) -> np.ndarray:
    with np.load(run / "relaxed.npz") as data:
        x, box = data["positions"], np.diag(data["cell"])
    delta = x[i] - x[j]
    return delta - box * np.round(delta / box)


def test_distance_gradient_is_the_projection_of_the_sensitivities(runs):
    run = runs["reverse"]
    i, j = PAIR
    delta = minimum_image(run, i, j)
    entry = read_json(run / "observables.json")["observables"][OBSERVABLES[1]]
    assert entry["value"] == pytest.approx(np.linalg.norm(delta), rel=1e-14)
    direction = delta / np.linalg.norm(delta)
    with np.load(run / "sensitivity.npz") as dx:
        reference = {name: float(direction @ (dx[name][i] - dx[name][j])) for name in dx.files}
    scale = max(abs(v) for v in reference.values())
    for name, value in reference.items():
        assert abs(entry["gradient"][name] - value) <= 1e-10 * scale, name


def test_a_user_observable_from_a_file_works_end_to_end(runs):
    run = runs["reverse"]
    entry = read_json(run / "observables.json")["observables"]["mine.py:energy"]
    relaxed = read_json(run / "sensitivity.json")
    with np.load(run / "relaxed.npz") as data:
        assert entry["value"] == pytest.approx(float(data["energy"]), rel=1e-12)
    for name, parameter in relaxed["parameters"].items():
        # The envelope theorem, dE*/dθ = ∂E/∂θ, against the total derivative through x*.
        assert entry["gradient"][name] == pytest.approx(parameter["denergy"], rel=1e-9)
    assert "d_mine_py_energy_d_diameter" in ase.io.read(run / "sensitivity.extxyz").arrays


def test_per_particle_gradients_in_npz_extxyz_and_summary_agree(runs):
    run = runs["reverse"]
    summary = read_json(run / "observables.json")
    atoms = ase.io.read(run / "sensitivity.extxyz")
    types = atoms.arrays["type"]
    with np.load(run / "observables.npz") as data:
        arrays = {key: data[key] for key in data.files}
    assert sorted(arrays) == sorted(f"{name}/diameter" for name in OBSERVABLES)
    for entry in summary["observables"].values():
        table = entry["per_particle"]["diameter"]
        values = arrays[table["npz_key"]]
        assert values.shape == (32,) and np.all(np.isfinite(values))
        # extxyz keeps 8 decimals.
        np.testing.assert_allclose(atoms.arrays[table["extxyz_column"]], values, rtol=0, atol=1e-8)
        largest = np.argsort(-np.abs(values), kind="stable")[:5]
        assert [row["atom"] for row in table["largest"]] == largest.tolist()
        assert [row["gradient"] for row in table["largest"]] == values[largest].tolist()
        scale = np.abs(values).sum()
        for t, species in enumerate(("A", "B")):
            total = values[types == t].sum()
            assert table["species_sums"][f"diameter.{species}"] == pytest.approx(total, rel=1e-12)
            assert abs(total - entry["gradient"][f"diameter.{species}"]) <= 1e-10 * scale
    assert summary["observables"]["pressure"]["per_particle"]["diameter"]["extxyz_column"] == (
        "d_pressure_d_diameter"
    )


def test_forward_mode_is_free_and_agrees_with_reverse_mode(runs):
    forward = read_json(runs["forward"] / "observables.json")
    reverse = read_json(runs["reverse"] / "observables.json")
    assert forward["mode"] == "forward" and forward["solves"] == 0
    assert forward["reason"].startswith("forward mode, the fewer solves: 3 adjoint solve(s)")
    assert "Observables by forward mode" in runs["stdout"]["forward"]
    # The new commit replaced the per-particle files of the earlier one, and the figures.
    assert forward["per_particle"] == []
    assert "observables.npz" not in read_manifest(runs["forward"]).files
    left = [p.name for p in runs["forward"].iterdir() if p.name.startswith("observable")]
    assert left == ["observables.json"]
    assert (runs["forward"] / "observables.json").is_file()
    sensitivity = read_json(runs["forward"] / "sensitivity.json")["parameters"]
    for name, entry in forward["observables"].items():
        solver = entry["solver"]
        assert solver["mode"] == "forward" and solver["solves"] == 0
        assert solver["iterations"] == sum(p["iterations"] for p in sensitivity.values())
        assert entry["per_particle"] == {}
        other = reverse["observables"][name]
        assert entry["value"] == pytest.approx(other["value"], rel=1e-14)
        scale = max(abs(v) for v in other["gradient"].values())
        for parameter, value in other["gradient"].items():
            assert abs(entry["gradient"][parameter] - value) <= 1e-9 * scale, (name, parameter)


def test_plot_colours_particles_by_their_gradient(runs):
    run = runs["reverse"]
    names = {p.name for p in runs["plotted"]}
    expected = {"observable-pressure-diameter.png", "observable-distance_3_17-diameter.png"}
    assert expected | {"observable-mine.py_energy-diameter.png"} <= names
    manifest = read_manifest(run)
    assert all(manifest.files[name].stage == "figures" for name in names)

    geometry = RunGeometry(read_run(run))
    pressure = geometry.per_atom[0]
    assert (pressure.observable, pressure.parameter) == ("pressure", "diameter")
    fig = configuration_figure(geometry, select_view(geometry, None), None, gradient=pressure)
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "d(pressure)/d(diameter[i])" in title and "each particle's own diameter" in title
    ax, bar = fig.axes  # the configuration and its colour bar, below it
    assert bar.get_xlabel() == "d(pressure)/d(diameter[i]) (ε / d_A³)"  # energy per area per length
    largest = float(np.abs(pressure.values).max())
    assert bar.get_xlim() == pytest.approx((-largest, largest))  # centred at 0
    # Each disc's colour has the sign of its particle's gradient: red above 0, blue below.
    discs = next(c for c in ax.collections if isinstance(c, EllipseCollection))
    xy = geometry.wrapped_xy(geometry.positions3)
    _, owners = periodic_images(geometry, xy, geometry.diameters)
    colours = discs.get_facecolors()
    signs = np.sign(pressure.values[owners])
    redder = np.sign(colours[:, 0] - colours[:, 2])
    assert np.all(redder[signs != 0] == signs[signs != 0])


@pytest.fixture
def copied(runs, tmp_path) -> Path:
    """A copy of the differentiated run (with observables files), for commands that must not
    change it."""
    return Path(shutil.copytree(runs["reverse"], tmp_path / "run"))


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--observable", "volume"), ("unknown observable 'volume'", "distance:I,J")),
        (("--observable", "distance:0,32"), ("atom index 32 is out of range 0..31",)),
        (("--observable", "gap:4"), ("give two atom indices",)),
        (("--observable", "stress:xz"), ("give two of x, y",)),
        (("--observable", "missing.py:energy"), ("no file missing.py",)),
        (("--observable", "mine.py:broken"), ("raised RuntimeError: broken on purpose",)),
        (("--observable", "mine.py:vector"), ("returns (2,)", "one real number")),
        (("--observable", "mine.py:absent"), ("has no function 'absent'",)),
        (("--per-particle",), ("--per-particle needs an --observable", "32 forward solves")),
        (
            ("--observable", "pressure", "--per-particle", "--param", "epsilon"),
            ("per-species parameters only",),
        ),
        (("--observable", "pressure", "--mode", "sideways"), ("unknown --mode 'sideways'",)),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(copied, args, needles):
    before = snapshot(copied)
    assert_one_line_error(cli("sensitivity", "--run", copied, *args), *needles)
    assert snapshot(copied) == before


def test_pressure_of_a_free_cluster_is_a_one_line_error(tmp_path):
    ok(cli("relax", "--system", "lj-cluster", "--out", "cluster"))
    before = snapshot(tmp_path / "cluster")
    for spec in ("pressure", "stress:xy"):
        assert_one_line_error(cli("sensitivity", "--run", "cluster", "--observable", spec), "periodic cell")
    assert snapshot(tmp_path / "cluster") == before
