"""Where the benchmarks write: a smoke run never replaces the committed full-size results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402 - benchmarks/ is a folder of scripts, not a package


def test_a_full_run_writes_the_committed_results_by_default():
    assert common.arguments("x", []).out == common.RESULTS


def test_a_smoke_run_writes_a_new_scratch_folder_by_default():
    first, second = (common.arguments("x", ["--smoke"]).out for _ in range(2))
    for out in (first, second):
        assert out.is_dir() and not any(out.iterdir())
        assert common.RESULTS.resolve() not in (out.resolve(), *out.resolve().parents)
        out.rmdir()
    assert first != second


def test_a_smoke_run_writes_where_it_is_told(tmp_path):
    assert common.arguments("x", ["--smoke", "--out", str(tmp_path)]).out == tmp_path


@pytest.mark.parametrize("out", [str(common.RESULTS), "results/benchmarks", "results/benchmarks/"])
def test_a_smoke_run_refuses_the_committed_results(out, monkeypatch, capsys):
    monkeypatch.chdir(common.ROOT)
    with pytest.raises(SystemExit) as exit:
        common.arguments("x", ["--smoke", "--out", out])
    assert exit.value.code == 2
    assert "never writes results/benchmarks" in capsys.readouterr().err
