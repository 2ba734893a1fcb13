"""Ensembles: batched members agree with separate runs, an interrupted ensemble resumes to the same
table, 4 devices and 2 jax.distributed processes give the table of one, failed members are
recorded, statistics exclude them, bad input writes nothing.

One small ensemble (N = 32, four seeds, batches of two) is computed once, interrupted after its
first batch and resumed; the other tests compare against it.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, cli

import mdsens  # noqa: F401  (float64)
from mdsens.ensemble import ensemble, member_positions, parse_seeds, parse_sweep, statistics
from mdsens.ensemble_batch import BatchEngine, local_mesh
from mdsens.ensemble_files import ARRAYS, MEMBERS, SUMMARY, TABLE
from mdsens.errors import UserError
from mdsens.observable_gradients import observable_gradients
from mdsens.observables import parse_observable
from mdsens.relaxation import Relaxer
from mdsens.sensitivity import Sensitivity
from mdsens.system import load_system

OVERRIDES = ["n_particles=32"]
ARGS = dict(seeds=[0, 1, 2, 3], params=["diameter.B"], observables=["pressure"], batch=2)
CLI_ARGS = ["--set", "n_particles=32", "--seeds", "0:4", "--param", "diameter.B", "--observable", "pressure"]


class Interrupt(Exception):
    """Stands for a kill after the first batch."""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The ensemble interrupted after its first batch of two, then resumed: (first, result, run)."""
    run = tmp_path_factory.mktemp("ensemble") / "run"

    def stop(done, total):
        raise Interrupt

    with pytest.raises(Interrupt):
        ensemble("binary-packing", OVERRIDES, run_dir=run, progress=stop, **ARGS)
    first = sorted(p.name for p in (run / MEMBERS).glob("*.npz"))
    assert not (run / TABLE).exists()
    return first, ensemble("binary-packing", OVERRIDES, run_dir=run, resume=True, **ARGS), run


def _table(run):
    with (run / TABLE).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_interrupted_ensemble_resumes_only_unfinished_members(resumed):
    first, result, run = resumed
    assert first == ["000000.npz", "000001.npz"]
    assert result.computed == 2
    rows = _table(run)
    assert [int(r["member"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["converged"] == "true" and r["path"] == "batch" for r in rows)
    with np.load(run / ARRAYS) as arrays:
        assert arrays["dx/diameter.B"].shape == (4, 32, 2)


def test_members_agree_with_separate_runs(resumed):
    """Member = `mdsens relax --seed S` + `mdsens sensitivity` (the library calls they make)."""
    _, result, _ = resumed
    member = 3  # computed after the resume
    seed = ARGS["seeds"][member]
    system = load_system("binary-packing", OVERRIDES, seed=seed)
    relaxed = Relaxer(system).relax()
    sensitivity = Sensitivity(system).compute(relaxed, ["diameter.B"], spectrum=False)
    dx = sensitivity.parameters["diameter.B"].dx
    observed = observable_gradients(
        system,
        relaxed.positions,
        system.params,
        [parse_observable(system, "pressure")],
        ["diameter.B"],
        dx={"diameter.B": dx},
    )
    row = result.rows[member]

    def close(a, b):
        return abs(a - b) <= 1e-10 * abs(b)

    assert close(row["energy"], relaxed.energy)
    assert close(row["dE_d_diameter.B"], sensitivity.parameters["diameter.B"].denergy)
    assert close(row["pressure"], observed.observables["pressure"].value)
    assert close(row["d_pressure_d_diameter.B"], observed.observables["pressure"].gradient["diameter.B"])
    assert np.linalg.norm(result.arrays["dx/diameter.B"][member] - dx) <= 1e-10 * np.linalg.norm(dx)
    assert np.array_equal(member_positions(system, seed), system.positions)


def test_statistics_in_the_json_are_those_of_the_table(resumed):
    _, _, run = resumed
    values = np.array([float(r["d_pressure_d_diameter.B"]) for r in _table(run)])
    stats = json.loads((run / SUMMARY).read_text())["statistics"][0]
    entry = stats["numbers"]["d_pressure_d_diameter.B"]
    assert stats["unconverged"] == 0 and entry["n"] == 4
    assert entry["mean"] == pytest.approx(values.mean(), rel=1e-14)
    assert entry["std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
    assert entry["stderr"] == pytest.approx(values.std(ddof=1) / 2, rel=1e-12)


def test_statistics_exclude_and_count_unconverged_members():
    point = (("box.side", 5.0),)
    rows = [
        {"box.side": 5.0, "converged": True, "x": 1.0},
        {"box.side": 5.0, "converged": True, "x": 3.0},
        {"box.side": 5.0, "converged": False, "x": 100.0},
    ]
    entry = statistics(rows, ["x"], [point])[0]
    assert (entry["members"], entry["converged"], entry["unconverged"]) == (3, 2, 1)
    assert entry["numbers"]["x"]["mean"] == 2.0
    assert entry["numbers"]["x"]["std"] == pytest.approx(np.sqrt(2.0))


def test_a_member_that_fails_is_recorded_and_the_others_go_on():
    """Three steps cannot relax a packing: the batch flags both members, each is relaxed alone
    and reports why it failed."""
    system = load_system("binary-packing", ["n_particles=8", "minimizer.max_steps=3"], seed=0)
    engine = BatchEngine(system, ("diameter.B",), (), local_mesh())
    starts = [member_positions(system, s) for s in (0, 1)]
    outcomes = engine.run([system.params] * 2, starts, 2 * engine.devices)
    assert [o.ok for o in outcomes] == [False, False]
    assert all(o.path == "alone" and "not converged" in o.reason for o in outcomes)
    assert all(o.scalars["steps"] == 3 for o in outcomes)


def test_parse_seeds_and_sweeps():
    assert parse_seeds("2:5") == [2, 3, 4]
    assert parse_seeds("0:10:4") == [0, 4, 8]
    assert parse_seeds("7,3") == [7, 3]
    assert parse_sweep("box.packing_fraction=0.9:0.98:5")[1] == pytest.approx([0.9, 0.92, 0.94, 0.96, 0.98])
    assert parse_sweep("species.B.diameter=0.55,0.6") == ("species.B.diameter", [0.55, 0.6])
    for bad in ("5:5", "a:b", "1,1", "0:4:0"):
        with pytest.raises(UserError):
            parse_seeds(bad)
    for bad in ("x", "x=", "x=a,b", "x=1:2:1", "x=1,1"):
        with pytest.raises(UserError):
            parse_sweep(bad)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seeds", "5:5"], "empty"),
        (["--sweep", "species.B.diameter"], "bad --sweep"),
        (["--sweep", "species.B.colour=1,2"], "colour"),
        (["--set", "n_particles=8", "--sweep", "n_particles=8,10"], "shape"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    run = tmp_path / "out"
    assert_one_line_error(cli("ensemble", *args, "--out", run), needle)
    assert not run.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(args, env_extra):
    env = {**os.environ, "MDSENS_COMPILATION_CACHE": "", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "mdsens.cli", "ensemble", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _same_table(run, reference_run):
    """Same members, outcomes and numbers. Numbers agree to round-off, not bit for bit: a
    different number of members per device changes how XLA vectorises the members' sums
    (measured: 1e-15 relative in the energy with 1 member per device against 2)."""
    rows, reference = _table(run), _table(reference_run)
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference, strict=True):
        for key in ref:
            # Timings, and the solve diagnostics of states relaxed to round-off: max|F| and the
            # CG residuals are round-off themselves (1e-3 apart relative at max|F| ~ 1e-12).
            if key == "wall_time" or key.startswith(("iterations_", "residual_")):
                continue
            if key == "max_force":
                assert abs(float(row[key]) - float(ref[key])) <= 1e-14
                continue
            try:
                expected = float(ref[key])
            except ValueError:
                assert row[key] == ref[key], key
                continue
            assert float(row[key]) == pytest.approx(expected, rel=1e-12, abs=1e-300), key
    with np.load(run / ARRAYS) as arrays, np.load(reference_run / ARRAYS) as expected:
        difference = np.linalg.norm(arrays["dx/diameter.B"] - expected["dx/diameter.B"])
        assert difference <= 1e-12 * np.linalg.norm(expected["dx/diameter.B"])


def test_four_devices_give_the_table_of_one(resumed, tmp_path):
    _, _, reference = resumed
    run = tmp_path / "run"
    process = _run_cli(
        [*CLI_ARGS, "--batch", "4", "--no-plot", "--out", str(run)],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert json.loads((run / SUMMARY).read_text())["devices"] == 4
    _same_table(run, reference)


def test_two_distributed_processes_give_the_table_of_one(resumed, tmp_path):
    _, _, reference = resumed
    run = tmp_path / "run"
    address = f"127.0.0.1:{_free_port()}"
    common = [*CLI_ARGS, "--batch", "2", "--out", str(run), "--coordinator", address, "--num-processes", "2"]
    processes = [_run_cli([*common, "--process-id", str(i)], {}) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stderr
    assert outputs[0][0].strip().splitlines()[-1] == str(run)
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["processes"] == 2
    _same_table(run, reference)
    assert (run / "ensemble-hist-d_pressure_d_diameter.B.png").is_file()
