"""The ``mdsens`` command line, end to end, as a user types it.

Commands run in-process through Typer's CliRunner (so JAX compilations are shared), inside a
temporary working directory, so that ``results/`` lands there. One test runs the installed
console script in a subprocess. Small systems (``--set n_particles=32``) are used wherever the
default system is not the point; one test runs the real default binary packing through
relax -> sensitivity -> plot.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import ase.io
import numpy as np
import pytest
import typer.main
from cli_helpers import cli, describe
from typer.testing import CliRunner

from mdsens.cli import app
from mdsens.system import build_system

SMALL = ("--set", "n_particles=32")
RUN = Path("results") / "binary-packing"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GARBAGE = bytes(range(256)) * 8  # not a zip, not an .npy: deterministic garbage
RELAX_FILES = ["manifest.json", "relaxed.extxyz", "relaxed.npz", "system.toml"]

runner = CliRunner()


def assert_ok(result) -> list[str]:
    """The command succeeded; return its stdout lines."""
    assert result.exit_code == 0, describe(result)
    assert "Traceback" not in result.output
    return result.stdout.splitlines()


def assert_error(result, code: int, match: str | None = None) -> str:
    """Exit ``code``, no traceback, exactly one non-blank stderr line, which says "Error"."""
    assert result.exit_code == code, describe(result)
    # Anything but SystemExit here is an exception that escaped the CLI's error handling.
    assert result.exception is None or isinstance(result.exception, SystemExit), describe(result)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(result)
    assert "Error" in lines[0]
    assert [line for line in result.output.splitlines() if "Error" in line] == lines
    if match is not None:
        assert match in lines[0], describe(result)
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (hidden ones included): relative path -> (bytes, mtime in ns)."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(Path(root).rglob("*"))
        if path.is_file()
    }


def relaxed_positions(run: Path) -> np.ndarray:
    with np.load(run / "relaxed.npz") as data:
        return data["positions"]


def recipe(run: Path) -> dict:
    return tomllib.loads((run / "system.toml").read_text())


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A finished 32-particle run (relax, sensitivity to diameter.B and epsilon, plot); read-only."""
    base = tmp_path_factory.mktemp("cli-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        assert assert_ok(cli("relax", *SMALL))[-1] == str(RUN)
        assert_ok(cli("sensitivity", "--param", "diameter.B", "--param", "epsilon"))
        assert_ok(cli("plot"))
    return base / RUN


@pytest.fixture
def earlier_run(template, tmp_path) -> Path:
    """A copy of the template run at ./results/binary-packing (mtimes kept; no latest pointer)."""
    shutil.copytree(template, tmp_path / RUN)
    return RUN


# --- the entry point and --help ----------------------------------------------------------------


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("mdsens")
    if not script.exists():
        script = Path(shutil.which("mdsens") or "mdsens")
    done = subprocess.run(
        [str(script), "systems"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "binary-packing" in done.stdout
    assert "bidisperse" in done.stdout  # the recipe's description
    assert not any(tmp_path.iterdir())  # listing writes nothing


def test_top_level_help_lists_the_commands():
    text = assert_ok(cli("--help"))
    for command in ("relax", "sensitivity", "plot", "export", "systems"):
        assert any(line.lstrip("│ ").startswith(command) for line in text), command


EXPECTED_OPTIONS = {
    "relax": [
        "--system",
        "-s",
        "--structure",
        "--index",
        "--potential",
        "--set",
        "--seed",
        "--out",
        "-o",
        "--allow-unconverged",
        "--force",
    ],
    "sensitivity": [
        "--param",
        "-p",
        "--run",
        "--solver",
        "--allow-unconverged",
        "--observable",
        "--per-particle",
        "--mode",
        "--spectrum",
        "--no-spectrum",
    ],
    "uncertainty": ["--std", "--cov", "--observable", "--samples", "--seed", "--run"],
    "predict": ["--set", "--verify", "--run", "--out", "-o"],
    "design": [
        "--run",
        "--param",
        "-p",
        "--per-particle",
        "--target",
        "--target-observable",
        "--loss",
        "--optimizer",
        "--learning-rate",
        "--steps",
        "--tol",
        "--gtol",
        "--xtol",
        "--max-step",
        "--start",
        "--out",
        "-o",
    ],
    "ensemble": [
        "--system",
        "-s",
        "--set",
        "--seeds",
        "--sweep",
        "--param",
        "-p",
        "--observable",
        "--batch",
        "--out",
        "-o",
        "--resume",
        "--force",
        "--plot",
        "--no-plot",
        "--distributed",
        "--coordinator",
        "--num-processes",
        "--process-id",
    ],
    "plot": ["--run", "--param", "-p", "--center", "--slice"],
    "systems": [],
    "export": ["--format", "-f", "--run", "--out", "-o"],
    "paper": ["--out", "-o", "--quick"],
    "check": ["--param", "-p", "--run", "--tol", "--h", "--unroll", "--no-unroll"],
}


@pytest.mark.parametrize("command", sorted(EXPECTED_OPTIONS))
def test_help_documents_every_option(command):
    text = "\n".join(assert_ok(cli(command, "--help")))
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    click_command = typer.main.get_command(app).commands[command]
    assert click_command.help, f"{command} has no description"
    declared = [opt for param in click_command.params for opt in param.opts + param.secondary_opts]
    assert sorted(declared) == sorted(EXPECTED_OPTIONS[command])
    for param in click_command.params:
        for option in param.opts + param.secondary_opts:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{option} not in help"
        assert param.help and len(param.help.split()) >= 4, f"{param.opts} has no help text"
        assert " ".join(param.help.split()[:4]) in flat, f"help of {param.opts} not shown"


# --- the user's session --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_system_relax_sensitivity_plot(tmp_path):
    """The README's quick start: the real 128-particle binary packing."""
    lines = assert_ok(cli("relax", "--system", "binary-packing"))
    assert lines[-1] == str(RUN)
    assert "128 particles" in lines[0]
    assert sorted(p.name for p in RUN.iterdir()) == RELAX_FILES
    atoms = ase.io.read(RUN / "relaxed.extxyz")
    assert len(atoms) == 128 and atoms.info["converged"] is True
    assert recipe(RUN)["seed"] == 0 and recipe(RUN)["n_particles"] == 128

    lines = assert_ok(cli("sensitivity", "--param", "diameter"))
    assert Path(lines[-1]).resolve() == RUN.resolve()
    with np.load(RUN / "sensitivity.npz") as data:
        assert sorted(data.files) == ["diameter.A", "diameter.B"]
        assert all(data[name].shape == (128, 2) for name in data.files)
    summary = json.loads((RUN / "sensitivity.json").read_text())
    assert summary["state_relaxed"] is True
    assert set(summary["parameters"]) == {"diameter.A", "diameter.B"}

    lines = assert_ok(cli("plot"))
    figures = [Path(line) for line in lines]
    assert {p.name for p in figures} == {
        "sensitivity-diameter.A.png",
        "sensitivity-diameter.B.png",
        "sensitivity-histogram.png",
    }
    for figure in figures:
        assert figure.parent.resolve() == RUN.resolve()
        assert figure.read_bytes().startswith(PNG_MAGIC)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_sensitivity_and_plot_use_the_latest_run_unless_told(earlier_run, tmp_path):
    first = earlier_run
    first_before = snapshot(first)
    second = Path("results") / "second"
    lines = assert_ok(cli("relax", *SMALL, "--seed", "1", "--out", second))
    assert lines[-1] == str(second)

    # Without --run: the run relaxed most recently.
    lines = assert_ok(cli("sensitivity", "--param", "diameter"))
    assert Path(lines[-1]).resolve() == second.resolve()
    with np.load(second / "sensitivity.npz") as data:
        assert sorted(data.files) == ["diameter.A", "diameter.B"]
    assert snapshot(first) == first_before

    # With --run: that one.
    assert_ok(cli("sensitivity", "--run", first, "--param", "alpha"))
    with np.load(first / "sensitivity.npz") as data:
        assert data.files == ["alpha"]
    assert json.loads((first / "sensitivity.json").read_text())["parameters"].keys() == {"alpha"}

    lines = assert_ok(cli("plot"))
    assert {Path(line).parent.resolve() for line in lines} == {second.resolve()}
    assert (second / "sensitivity-diameter.B.png").read_bytes().startswith(PNG_MAGIC)

    lines = assert_ok(cli("plot", "--run", first, "--param", "alpha"))
    assert [Path(line).name for line in lines] == [
        "sensitivity-alpha.png",
        "sensitivity-histogram.png",
    ]
    assert {Path(line).parent.resolve() for line in lines} == {first.resolve()}


# --- reproducibility -----------------------------------------------------------------------------


def test_relax_from_the_stored_recipe_reproduces_the_run(earlier_run, template):
    run = earlier_run
    assert recipe(run)["seed"] == 0  # the resolved seed is stored even when not given
    assert (run / "sensitivity.npz").is_file() and list(run.glob("*.png"))
    # The README's way: reproduce into the same (default) directory.
    lines = assert_ok(cli("relax", "--system", run / "system.toml"))
    assert lines[-1] == str(run)
    np.testing.assert_array_equal(relaxed_positions(run), relaxed_positions(template))
    assert (run / "system.toml").read_bytes() == (template / "system.toml").read_bytes()
    # The old sensitivity files and figures belong to the replaced state: gone.
    assert sorted(p.name for p in run.iterdir()) == RELAX_FILES


def test_seed_and_overrides_are_stored_and_reproduced():
    custom, again, reseeded = (Path("results") / name for name in ("custom", "again", "seed8"))
    args = ("relax", *SMALL, "--set", "species.B.diameter=0.65", "--seed", "7")
    assert_ok(cli(*args, "--out", custom))
    stored = recipe(custom)
    assert stored["seed"] == 7
    assert stored["n_particles"] == 32
    assert stored["species"]["B"]["diameter"] == 0.65
    assert stored["minimizer"]["max_steps"] == 100_000  # resolved: defaults written out too

    assert_ok(cli("relax", "--system", custom / "system.toml", "--out", again))
    assert (again / "system.toml").read_bytes() == (custom / "system.toml").read_bytes()
    np.testing.assert_array_equal(relaxed_positions(again), relaxed_positions(custom))

    assert_ok(cli("relax", "--system", custom / "system.toml", "--seed", 8, "--out", reseeded))
    assert recipe(reseeded) == {**stored, "seed": 8}
    start7, start8 = build_system(stored).positions, build_system(recipe(reseeded)).positions
    assert np.abs(start7 - start8).max() > 0.1
    assert not np.allclose(relaxed_positions(reseeded), relaxed_positions(custom))


# --- bad input -----------------------------------------------------------------------------------

BAD_INPUT = {
    "unknown-system": (["relax", "--system", "nonsense"], "unknown system"),
    "unknown-param": (["sensitivity", "--param", "nonsense"], "unknown parameter"),
    "unknown-plot-param": (["plot", "--param", "nonsense"], "unknown parameter"),
    "unknown-solver": (["sensitivity", "--solver", "nonsense"], "unknown solver"),
    "set-unknown-key": (["relax", "--set", "nonsense.key=1"], "unknown key"),
    "set-bad-value": (["relax", "--set", "n_particles=abc"], "must be an integer"),
    "set-negative-fmax": (["relax", "--set", "minimizer.fmax=-1"], "minimizer.fmax"),
    "set-bad-syntax": (["relax", "--set", "foo"], "bad --set"),
    "sensitivity-missing-run": (["sensitivity", "--run", "does/not/exist"], "does/not/exist"),
    "plot-missing-run": (["plot", "--run", "does/not/exist"], "does/not/exist"),
    "recipe-not-toml": (["relax", "--system", "notes.toml"], "cannot read recipe"),
    "recipe-missing": (["relax", "--system", "missing.toml"], "not found"),
    "out-is-a-file": (["relax", *SMALL, "--out", RUN / "system.toml"], "not a directory"),
    "run-npz-garbage": (
        ["sensitivity", "--run", "results/damaged"],
        "cannot read results/damaged/relaxed.npz",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, earlier_run, tmp_path):
    args, message = BAD_INPUT[case]
    Path("notes.toml").write_text("These are my notes,\nnot [a recipe.\n")
    if case == "run-npz-garbage":
        shutil.copytree(earlier_run, "results/damaged")
        Path("results/damaged/relaxed.npz").write_bytes(GARBAGE)
    before = snapshot(tmp_path)
    result = cli(*args)
    assert_error(result, 2, message)
    assert result.stdout == ""
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args", [["sensitivity"], ["sensitivity", "--param", "diameter"], ["plot"]])
def test_no_run_yet_is_a_one_line_error(args, tmp_path):
    assert_error(cli(*args), 2, "no run found")
    assert not any(tmp_path.iterdir())  # not even results/


def _damage(run: Path, damage: str) -> None:
    npz = run / "relaxed.npz"
    if damage == "npz-garbage":
        npz.write_bytes(GARBAGE)
    elif damage == "npz-truncated":
        npz.write_bytes(npz.read_bytes()[:300])
    elif damage == "npz-empty":
        npz.write_bytes(b"")
    elif damage == "extxyz-garbage":
        (run / "relaxed.extxyz").write_bytes(b"garbage\nnot an extxyz file\n")


@pytest.mark.parametrize(
    "command, damage",
    [
        ("sensitivity", "npz-garbage"),
        ("sensitivity", "npz-truncated"),
        ("sensitivity", "npz-empty"),
        ("plot", "npz-garbage"),
        ("plot", "npz-truncated"),
        ("plot", "extxyz-garbage"),
    ],
)
def test_damaged_run_is_a_one_line_error(command, damage, earlier_run, tmp_path):
    _damage(earlier_run, damage)
    before = snapshot(tmp_path)
    assert_error(cli(command, "--run", earlier_run), 2)
    assert snapshot(tmp_path) == before


def test_error_message_with_brackets_is_printed_verbatim(earlier_run, tmp_path):
    before = snapshot(tmp_path)
    line = assert_error(cli("relax", "--set", "n_particles=[/abc]"), 2)
    assert "[/abc]" in line
    assert snapshot(tmp_path) == before


def test_run_directory_with_brackets_is_printed_verbatim():
    lines = assert_ok(cli("relax", *SMALL, "--out", "results/[bold]x"))
    assert Path("results/[bold]x/relaxed.npz").is_file()
    assert lines[-1] == "results/[bold]x"


# --- non-converged relaxations -------------------------------------------------------------------


def test_unconverged_relaxation(earlier_run, tmp_path):
    run = earlier_run
    unconverged = (*SMALL, "--set", "minimizer.max_steps=5")
    before = snapshot(tmp_path)
    result = cli("relax", *unconverged)
    assert_error(result, 1, "did not converge")
    assert "NOT converged" in result.stdout
    assert snapshot(tmp_path) == before  # the earlier result survives; no pointer, no temp file

    lines = assert_ok(cli("relax", *unconverged, "--allow-unconverged"))
    assert lines[-1] == str(run)
    with np.load(run / "relaxed.npz") as data:
        assert bool(data["converged"]) is False
        assert int(data["steps"]) == 5
    atoms = ase.io.read(run / "relaxed.extxyz")
    assert atoms.info["converged"] is False
    assert atoms.info["max_force"] > 1e-12
    assert sorted(p.name for p in run.iterdir()) == RELAX_FILES

    before = snapshot(tmp_path)
    assert_error(cli("sensitivity", "--param", "epsilon"), 2, "--allow-unconverged")
    assert snapshot(tmp_path) == before

    assert_ok(cli("sensitivity", "--param", "epsilon", "--allow-unconverged"))
    summary = json.loads((run / "sensitivity.json").read_text())
    assert summary["state_relaxed"] is False
    assert summary["max_force"] > 1e-12


# --- what the commands print ---------------------------------------------------------------------


def test_sensitivity_without_run_names_the_run_it_used_after_a_failed_relax(earlier_run, tmp_path):
    failed = cli("relax", *SMALL, "--seed", 5, "--set", "minimizer.max_steps=5", "--out", "results/new")
    assert_error(failed, 1, "did not converge")
    lines = assert_ok(cli("sensitivity", "--param", "epsilon"))
    assert lines[0].startswith(f"No --run given: using {earlier_run}, the latest run (relaxed ")
    assert lines[-1] == str(earlier_run)
    result = cli("plot")
    assert_ok(result)
    assert f"using {earlier_run}" in result.stderr


def test_generated_runs_print_their_seed_and_structure_runs_none():
    assert "(seed 3)" in assert_ok(cli("relax", *SMALL, "--seed", 3, "--out", "results/a"))[0]
    first = assert_ok(cli("relax", "--system", "lj-cluster", "--out", "results/b"))[0]
    assert first.startswith("Relaxing lj-cluster: 13 particles") and "seed" not in first


def test_an_unjammed_packing_gets_a_hint():
    lines = assert_ok(cli("relax", *SMALL, "--set", "box.packing_fraction=0.4"))
    assert ": E = 0, " in lines[1]
    assert "below jamming" in lines[2]
    jammed = assert_ok(cli("relax", *SMALL, "--out", "results/jammed"))
    assert not any("jamming" in line for line in jammed)


def test_sensitivity_says_exactly_zero_and_the_largest_particle_displacement(earlier_run):
    lines = assert_ok(cli("sensitivity", "--run", earlier_run, "--param", "epsilon", "--param", "diameter.B"))
    (epsilon,) = [line for line in lines if line.strip().startswith("epsilon")]
    assert "dx*/dθ = 0 exactly" in epsilon and "residual" not in epsilon and " it," not in epsilon
    (diameter,) = [line for line in lines if line.strip().startswith("diameter.B")]
    with np.load(earlier_run / "sensitivity.npz") as data:
        lengths = np.linalg.norm(data["diameter.B"], axis=1)
    # max|dx*/dθ| is the longest per-particle vector, not the largest Cartesian component.
    assert f"max|dx*/dθ| = {lengths.max():.4e}" in diameter
    summary = json.loads((earlier_run / "sensitivity.json").read_text())["parameters"]
    assert summary["epsilon"]["exactly_zero"] is True and summary["epsilon"]["residual"] is None
    assert summary["diameter.B"]["max_particle_dx"] == pytest.approx(lengths.max(), rel=1e-15)


def test_unresolved_sensitivities_are_called_noise():
    from mdsens.cli.sensitivity import _describe

    entry = SimpleNamespace(
        denergy=1e-12,
        dx=np.full((4, 2), 1e-10),
        solver="cg",
        iterations=3,
        residual=0.5,
        exactly_zero=False,
        resolved=False,
        max_displacement=1.4e-10,
    )
    line = _describe(entry)
    assert "max|dx*/dθ| = 1.4000e-10" in line and "unresolved" in line and "noise" in line
    resolved = _describe(SimpleNamespace(**{**vars(entry), "resolved": True}))
    assert "unresolved" not in resolved and "cg: 3 it, residual 5.0e-01" in resolved
