"""Run directories never mix states, never swallow other files, and survive kills (issue 14).

Default run directories stay in results/ whatever the recipe's name; a directory that is not a
run is refused; files from two states are refused by every reader; only files mdsens wrote are
removed; the run lock turns a second writer away; an interrupt or a SIGKILL during the write
leaves the earlier run intact (or, once committed, the new one complete). The kill and
concurrency tests stop `mdsens relax` in a subprocess at the commit's test hook
(``MDSENS_TEST_PAUSE``). A 16-particle packing keeps everything quick.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import cli
from typer.testing import CliRunner

import mdsens
import mdsens.relaxation
from mdsens import manifest
from mdsens.manifest import PAUSE_ENV, file_digest, read_manifest
from mdsens.run import RESULTS, check_target, default_run_dir, save_check
from mdsens.run_files import read_run
from mdsens.run_lock import LOCK, run_lock

N = 16
SMALL = ("--set", f"n_particles={N}")
runner = CliRunner()


def one_line_error(result, match: str) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def visible(root: Path) -> dict[str, bytes]:
    """The files a user sees under ``root`` (no hidden ones): relative path -> bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def assert_consistent(run: Path) -> None:
    """Every file a user sees is listed in the manifest with its bytes, and nothing else is left."""
    listed = read_manifest(run)
    assert listed is not None
    names = {p.name for p in run.iterdir()}
    assert names == {*listed.files, "manifest.json"}, names
    for name, entry in listed.files.items():
        assert file_digest(run / name) == entry.sha256, name
    read_run(run)
    mdsens.load_run(run)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def states():
    """Two relaxed states of one 16-particle system (seeds 0 and 1) and their sensitivities."""
    out = {}
    for seed in (0, 1):
        system = mdsens.load_system("binary-packing", overrides=[f"n_particles={N}"], seed=seed)
        relaxed = mdsens.Relaxer(system).relax()
        result = mdsens.compute_sensitivity(system, relaxed, ["diameter.B", "epsilon"])
        out[seed] = SimpleNamespace(system=system, relaxed=relaxed, result=result)
    return out


@pytest.fixture(scope="module")
def templates(states, tmp_path_factory) -> dict[int, Path]:
    """Per state, a finished run: relaxation, sensitivities, figures, check.json, an export."""
    base = tmp_path_factory.mktemp("integrity")
    runs = {}
    for seed, state in states.items():
        run = mdsens.save_relaxation(base / f"state{seed}", state.system, state.relaxed)
        mdsens.save_sensitivity(run, state.system, state.result, relaxed=state.relaxed)
        mdsens.plot_run(run, ["diameter.B"])
        save_check(run, state.system, state.relaxed, {"passed": True})
        mdsens.run.export_structure(run, "xyz")
        runs[seed] = run
    return runs


@pytest.fixture
def run0(templates, tmp_path) -> Path:
    return Path(shutil.copytree(templates[0], tmp_path / "results" / "binary-packing"))


# --- 1: default run directories cannot leave results/ ---------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../ESCAPED", "/some/absolute/dir", "a/b", "..", ".", "", ".hidden", "x\x00y", "line\nbreak", "..\\w"],
)
def test_default_run_dir_is_one_directory_of_results(name):
    path = default_run_dir(SimpleNamespace(name=name))
    assert path.parent == RESULTS
    assert path.name not in ("", ".", "..") and not path.name.startswith(".")
    assert not set(path.name) & {"/", "\\", "\x00", "\n"}
    assert path.resolve().parent == (Path.cwd() / RESULTS).resolve()


def test_default_run_dir_keeps_a_plain_name():
    assert default_run_dir(SimpleNamespace(name="binary-packing")) == RESULTS / "binary-packing"


@pytest.mark.parametrize("name", ["../ESCAPED", "/tmp/mdsens-escaped-run"])
def test_relax_with_a_path_as_its_name_writes_nothing_outside_results(name, tmp_path):
    result = cli("relax", *SMALL, "--set", f"name={name}")
    # Recipe validation may refuse the name; if it does not, the run stays in results/.
    assert result.exit_code in (0, 2), result.stderr
    assert not Path("/tmp/mdsens-escaped-run").exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["results"])
    if result.exit_code == 0:
        run = Path(result.stdout.splitlines()[-1])
        assert run.parent == RESULTS and (run / "relaxed.npz").is_file()


# --- 4, 9: directories that are not runs, and files mdsens did not write --------------------------


def test_relax_refuses_a_directory_that_is_not_a_run(tmp_path):
    Path("mine").mkdir()
    Path("mine/notes.txt").write_text("my notes")
    result = cli("relax", *SMALL, "--out", "mine")
    one_line_error(result, "not an mdsens run")
    assert "--force" in result.stderr
    assert result.stdout == ""  # refused before relaxing
    assert visible(tmp_path) == {"mine/notes.txt": b"my notes"}


def test_an_empty_directory_or_a_run_is_a_target_without_force(run0, tmp_path):
    Path("empty").mkdir()
    assert check_target("empty") == Path("empty")
    assert check_target(run0) == run0
    assert check_target("new/dir") == Path("new/dir")


def test_force_adds_a_run_beside_foreign_files_and_never_removes_them(tmp_path):
    # Like results/paper: figures and sensitivities that another tool wrote, no manifest.
    paper = Path("paper")
    paper.mkdir()
    np.savez(paper / "sensitivity.npz", **{"diameter.B": np.ones((N, 2))})
    foreign = {
        "sensitivity-diameter.B.png": b"\x89PNG committed figure",
        "costs.csv": b"method,time\n",
        "check.json": b'{"passed": true}',
    }
    for name, data in foreign.items():
        (paper / name).write_bytes(data)
    foreign["sensitivity.npz"] = (paper / "sensitivity.npz").read_bytes()
    for _ in range(2):  # the second time the directory is a run, and --force is not needed
        result = cli("relax", *SMALL, "--out", paper, *(["--force"] if _ == 0 else []))
        assert result.exit_code == 0, result.stderr
        assert {name: (paper / name).read_bytes() for name in foreign} == foreign
        assert set(read_manifest(paper).files) == {"system.toml", "relaxed.npz", "relaxed.extxyz"}
        # Files the manifest does not list are not part of the run: readers ignore them.
        files = read_run(paper)
        assert files.sensitivities == {} and files.parameters == {}


# --- 8: one state per run -------------------------------------------------------------------------


def test_sensitivities_of_a_replaced_state_are_refused(run0, states):
    mdsens.save_relaxation(run0, states[1].system, states[1].relaxed)
    before = visible(run0)
    with pytest.raises(mdsens.UserError, match="relaxed again"):
        mdsens.save_sensitivity(run0, states[0].system, states[0].result, relaxed=states[0].relaxed)
    assert visible(run0) == before
    assert not any(p.name.startswith(".") for p in run0.iterdir())


READERS = {
    "load_run": lambda run: mdsens.load_run(run),
    "read_run": lambda run: read_run(run),
    "plot": lambda run: cli("plot", "--run", run),
    "sensitivity": lambda run: cli("sensitivity", "--run", run, "--param", "epsilon"),
    "check": lambda run: cli("check", "--run", run, "--param", "epsilon"),
    "export": lambda run: cli("export", "--run", run, "--format", "xyz"),
}


@pytest.mark.parametrize(
    "swapped", ["relaxed.npz", "system.toml", "sensitivity.npz", "sensitivity.json", "sensitivity.extxyz"]
)
@pytest.mark.parametrize("reader", list(READERS))
def test_files_from_another_state_are_refused_by_every_reader(reader, swapped, run0, templates, tmp_path):
    shutil.copy(templates[1] / swapped, run0 / swapped)
    before = visible(tmp_path)
    fix = "mdsens sensitivity" if swapped.startswith("sensitivity") else "mdsens relax"
    if reader in ("load_run", "read_run"):
        with pytest.raises(mdsens.UserError, match=fix):
            READERS[reader](run0)
    else:
        assert fix in one_line_error(READERS[reader](run0), str(run0))
    assert visible(tmp_path) == before


def test_a_run_without_manifest_is_still_checked_against_the_state_sensitivity_json_records(run0, templates):
    (run0 / "manifest.json").unlink()
    mdsens.load_run(run0)  # consistent files: read as they are
    shutil.copy(templates[1] / "sensitivity.json", run0 / "sensitivity.json")
    with pytest.raises(mdsens.UserError, match="another relaxed state"):
        mdsens.load_run(run0)


def test_a_commit_stopped_after_its_commit_point_is_completed_by_the_next_reader(run0, states, monkeypatch):
    apply = manifest._apply

    def stopped(run, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest, "_apply", stopped)
    with pytest.raises(KeyboardInterrupt):
        mdsens.save_relaxation(run0, states[1].system, states[1].relaxed)
    assert [p.name for p in run0.glob(".stage-*")]  # committed, not yet applied
    monkeypatch.setattr(manifest, "_apply", apply)
    np.testing.assert_array_equal(mdsens.load_run(run0)[1].positions, states[1].relaxed.positions)
    assert_consistent(run0)
    assert sorted(read_manifest(run0).files) == ["relaxed.extxyz", "relaxed.npz", "system.toml"]


# --- the run lock ---------------------------------------------------------------------------------

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d, mdsens relax" % os.getpid())
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_second_writer_is_turned_away_with_the_holder_named(run0, states):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run0 / LOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = visible(run0)
        with pytest.raises(
            mdsens.UserError, match=rf"being written by another mdsens command \(pid {holder.pid}"
        ):
            mdsens.save_relaxation(run0, states[1].system, states[1].relaxed)
        one_line_error(cli("sensitivity", "--run", run0), "being written by another mdsens command")
        one_line_error(cli("relax", *SMALL, "--seed", 1, "--out", run0), "being written")
        assert visible(run0) == before
    finally:
        holder.communicate("\n", timeout=30)
    mdsens.save_relaxation(run0, states[1].system, states[1].relaxed)
    assert not (run0 / LOCK).exists()


def test_the_lock_is_reentrant_and_removes_what_it_created(tmp_path, run0, states):
    with run_lock(run0, "test"):
        mdsens.save_relaxation(run0, states[1].system, states[1].relaxed)  # takes it again
        assert (run0 / LOCK).is_file()
    assert not (run0 / LOCK).exists()
    with pytest.raises(RuntimeError), run_lock(tmp_path / "a" / "b", "test", create=True):
        raise RuntimeError("the command failed")
    assert not (tmp_path / "a").exists()


# --- 12: unwritable --out and interrupts ------------------------------------------------------------


def test_an_unwritable_out_is_refused_before_relaxing(tmp_path):
    Path("notes.txt").write_text("a file")
    result = cli("relax", *SMALL, "--out", "notes.txt/run")
    one_line_error(result, "notes.txt")
    assert result.stdout == ""  # no "Relaxing ..." line: refused before the relaxation


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_is_refused_before_relaxing(tmp_path):
    Path("locked").mkdir()
    Path("locked").chmod(0o555)
    try:
        result = cli("relax", *SMALL, "--out", "locked")
        one_line_error(result, "cannot write")
        assert result.stdout == ""
    finally:
        Path("locked").chmod(0o755)


def test_ctrl_c_during_relax_leaves_the_earlier_run_and_creates_nothing(run0, tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mdsens.relaxation.Relaxer, "relax", interrupted)
    before = visible(tmp_path)
    for out in (run0, Path("results/new")):
        result = cli("relax", *SMALL, "--seed", 1, "--out", out)
        assert result.exit_code != 0
        assert visible(tmp_path) == before
        assert not (run0 / LOCK).exists() and not Path("results/new").exists()


# --- kill and concurrency: `mdsens relax` in a subprocess, stopped at the commit ------------------


def start_relax(out: Path, phase: str, release: Path, seed: int) -> tuple[subprocess.Popen, threading.Event]:
    """``mdsens relax`` into ``out`` that stops at ``phase`` of its commit until ``release``
    exists; and an event set once it has stopped there."""
    script = Path(sys.executable).with_name("mdsens")
    process = subprocess.Popen(
        [str(script), "relax", *SMALL, "--seed", str(seed), "--out", str(out)],
        env={**os.environ, PAUSE_ENV: f"{phase}:{release}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    paused = threading.Event()

    def watch():
        for line in process.stderr:
            if line.strip() == f"mdsens test pause: {phase}":
                paused.set()

    threading.Thread(target=watch, daemon=True).start()
    return process, paused


def wait_paused(process: subprocess.Popen, paused: threading.Event) -> None:
    if not paused.wait(timeout=600):
        process.kill()
        pytest.fail("mdsens relax never reached its commit")


def test_sigkill_while_staging_leaves_the_earlier_run_intact(run0, tmp_path, states):
    before = visible(run0)
    process, paused = start_relax(run0, "staging", tmp_path / "never", seed=1)
    wait_paused(process, paused)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    # The earlier run, every file of it, as it was; nothing of the new state is visible.
    assert visible(run0) == before
    np.testing.assert_array_equal(mdsens.load_run(run0)[1].positions, states[0].relaxed.positions)
    # The next writer discards what the killed one had staged, and its stale lock file.
    mdsens.plot_run(run0, ["diameter.B"])
    assert not [p.name for p in run0.iterdir() if p.name.startswith(".")]
    assert_consistent(run0)


def test_sigkill_while_applying_a_commit_leaves_the_new_run_to_complete(run0, tmp_path, states):
    process, paused = start_relax(run0, "applying", tmp_path / "never", seed=1)
    wait_paused(process, paused)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    # Committed: the next reader completes the new run; the earlier state's files are gone.
    positions = mdsens.load_run(run0)[1].positions
    assert not np.array_equal(positions, states[0].relaxed.positions)
    assert_consistent(run0)
    assert sorted(read_manifest(run0).files) == ["relaxed.extxyz", "relaxed.npz", "system.toml"]
    assert not (run0 / "sensitivity.npz").exists()


def test_concurrent_writers_end_with_one_consistent_run(run0, tmp_path):
    release = tmp_path / "release"
    process, paused = start_relax(run0, "staging", release, seed=1)
    try:
        wait_paused(process, paused)
        # Meanwhile a second relax and a sensitivity of the same run are turned away.
        one_line_error(cli("relax", *SMALL, "--seed", 2, "--out", run0), "being written")
        one_line_error(cli("sensitivity", "--run", run0), "being written")
    finally:
        release.touch()
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    assert stdout.splitlines()[-1] == str(run0)
    assert_consistent(run0)
    assert mdsens.load_run(run0)[0].recipe["seed"] == 1
