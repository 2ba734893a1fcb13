"""The seed paper's experiment (``python -m mdsens.experiments.paper``), smoke version end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mdsens.experiments.paper import (
    COST_COLUMNS,
    FD_COLUMNS,
    UNROLLED_COLUMNS,
    default_steps,
    run_paper,
)

DATA = Path(__file__).parent / "data"


def _rows(path: Path, columns) -> list[dict]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tuple(columns)
        return list(reader)


def test_default_steps_reach_twice_the_converged_count():
    assert default_steps(641) == [10, 20, 50, 100, 200, 500, 641, 1000, 1282]


@pytest.mark.slow
def test_paper_experiment_quick(tmp_path):
    messages = []
    summary = run_paper(tmp_path, steps_list=[10], progress=messages.append, quick=True, fd_steps=[1e-5])
    assert messages and messages[-1].startswith("done")

    for name in (
        "unrolled.csv",
        "unrolled_trace.csv",
        "finite_differences.csv",
        "costs.csv",
        "paper.json",
        "unrolled-error.png",
        "finite-differences.png",
        "costs.png",
        "sensitivity-diameter.B.png",
        "sensitivity.npz",
        "relaxed.npz",
        "system.toml",
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "paper.json").read_text())["implicit"] == summary["implicit"]

    # The implicit (CG) derivative agrees with the dense direct solve ...
    assert summary["implicit"]["error"] < 1e-8
    assert summary["implicit"]["reverse_error"] < 1e-8
    # ... and with the independent reference fixture (same start, same relaxed state).
    with np.load(DATA / "paper-packing-N128.npz") as ref, np.load(tmp_path / "sensitivity.npz") as got:
        dx = got["diameter.B"] - got["diameter.B"].mean(axis=0)
        expected = ref["dx_ddiameter_B"]
    assert np.linalg.norm(dx - expected) / np.linalg.norm(expected) < 1e-8

    converged = summary["relaxation"]["steps"]
    unrolled = {int(r["steps"]): r for r in _rows(tmp_path / "unrolled.csv", UNROLLED_COLUMNS)}
    assert sorted(unrolled) == [10, converged]  # the converged count is always added
    # Unrolling to convergence approaches the implicit answer; 10 steps are nowhere near it.
    assert float(unrolled[converged]["error"]) < 1e-4 < float(unrolled[10]["error"])
    assert float(unrolled[converged]["max_force"]) <= summary["relaxation"]["fmax"]
    # Reverse mode through the unrolled loop needs far more memory than the implicit solve.
    reverse = int(unrolled[converged]["reverse_peak_memory_bytes"])
    assert reverse > 100 * summary["implicit"]["reverse_peak_memory_bytes"]

    (fd,) = _rows(tmp_path / "finite_differences.csv", FD_COLUMNS)
    assert float(fd["h"]) == 1e-5 and float(fd["error"]) < 1e-5
    methods = [r["method"] for r in _rows(tmp_path / "costs.csv", COST_COLUMNS)]
    assert methods[:3] == ["relaxation", "implicit forward", "implicit reverse"]
