"""The seed paper's experiment (``mdsens paper``), smoke version end to end, and its figures as a
reader sees them (drawn from a summary: no physics runs for them)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer.main

from mdsens.cli import app
from mdsens.cli.paper import DEFAULT_OUT
from mdsens.experiments.paper import default_steps, run_paper
from mdsens.experiments.paper_figures import costs_figure, finite_differences_figure, unrolled_figure
from mdsens.experiments.paper_files import COST_COLUMNS, FD_COLUMNS, UNROLLED_COLUMNS

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
# The committed full run: the figures are drawn from its numbers alone.
COMMITTED = ROOT / "results" / "paper" / "paper.json"


def _rows(path: Path, columns) -> list[dict]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tuple(columns)
        return list(reader)


def test_default_steps_reach_twice_the_converged_count():
    assert default_steps(641) == [10, 20, 50, 100, 200, 500, 641, 1000, 1282]


def legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_figures_show_the_summarys_numbers_on_log_axes():
    """What a reader sees, from the committed summary: log-log axes with their quantities, one
    marker per measured K or h, the reference lines in the legend, one bar per method."""
    summary = json.loads(COMMITTED.read_text())
    rows, best = summary["unrolled"]["rows"], summary["finite_differences"]["best"]

    top, bottom = unrolled_figure(summary).axes
    for ax in (top, bottom):
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert top.get_ylabel().startswith("relative error of dx*/dθ")
    assert bottom.get_xlabel() == "K: FIRE steps unrolled from the random start"
    # The per-step trace, the timed runs, implicit, finite differences, the reference floor.
    labels = legend(top)
    assert len(labels) == 5 and labels[0] == "unrolled forward mode, every K"
    assert labels[3] == f"central finite differences, best h = {best['h']:g}: {best['error']:.1e}"
    timed = next(line for line in top.lines if line.get_label().startswith("unrolled forward mode, timed"))
    assert list(timed.get_xdata()) == [r["steps"] for r in rows]
    assert legend(bottom) == [f"fmax = {summary['relaxation']['fmax']:g}"]

    (ax,) = finite_differences_figure(summary).axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_xlabel() == "h: step in the diameter of species B (length)"
    fd_rows = summary["finite_differences"]["rows"]
    changed = [r for r in fd_rows if r["contact_changes"]]
    assert changed  # the committed run crosses the near-contact pair at large h
    assert legend(ax) == [
        "contacts unchanged between θ ± h",
        "contact network changes between θ ± h",
        f"implicit (CG): {summary['implicit']['error']:.1e}",
    ]
    assert len(ax.texts) == len(changed)  # each such step says how many particles changed

    time_ax, memory_ax, scaling_ax = costs_figure(summary).axes
    methods = [c["method"] for c in summary["costs"]]
    for bars in (time_ax, memory_ax):
        assert bars.get_yscale() == "log" and len(bars.patches) == len(methods)
        assert [t.get_text().replace("\n", " ") for t in bars.get_xticklabels()] == methods
    assert time_ax.get_ylabel() == "wall time (s), after compilation"
    assert memory_ax.get_ylabel() == "peak memory (MiB)"
    assert (scaling_ax.get_xscale(), scaling_ax.get_yscale()) == ("log", "log")
    assert legend(scaling_ax)[0] == "unrolled reverse mode (jax.vjp through K steps)"
    (reverse,) = [line for line in scaling_ax.lines if line.get_label() == legend(scaling_ax)[0]]
    assert len(reverse.get_xdata()) == len(rows)


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


def test_mdsens_paper_writes_a_scratch_folder_unless_told_to_replace_the_committed_one():
    """`mdsens paper` with no --out must not overwrite results/paper; the committed results come
    from asking for them by name."""
    (out,) = [p for p in typer.main.get_command(app).commands["paper"].params if p.name == "out_dir"]
    assert Path(out.default) == DEFAULT_OUT
    assert ROOT / DEFAULT_OUT != COMMITTED.parent
    assert (ROOT / DEFAULT_OUT).parent == COMMITTED.parent.parent  # beside it, under results/


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("results/paper/paper.json", False),
        ("results/benchmarks/scaling.json", False),
        (f"{DEFAULT_OUT}/paper.json", True),
        ("results/binary-packing/relaxed.npz", True),  # `mdsens relax`'s default run directory
        ("results/.latest-run", True),
    ],
)
def test_git_keeps_only_the_committed_results(path, ignored):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
    assert done.returncode == (0 if ignored else 1), done.stderr
