"""``mdsens check``: the verdict rests on trusted references, and says so in RUN/check.json.

The verdict (:func:`mdsens.verdict.judge`) is a pure table from comparisons to pass/fail and a
reason: it is tested case by case without physics. The measurements are tested on real systems.
What makes those falsifiable:

* the relaxed 128-particle binary packing must pass against finite differences (h = 1e-5 agrees to
  ~5e-7) and against the dense direct solve (~1e-12), while a state relaxed only to max|F| ≤ 1e-4
  must fail: its derivative is that of an unrelaxed state (3e-3 off the tight references);
* the packing has a pair 7e-5 from contact, so h = 1e-4 and 1e-3 change
  the contact network: such a step measures a jump (error 0.13 and 0.24, and still 0.22 on the
  particles whose own contacts did not change), so it is reported, never trusted. With h = 1e-3
  alone the direct solve decides (pass); without a direct solve nothing can (fail);
* autodiff through the unrolled FIRE loop is the derivative of the state FIRE has reached: at a
  quarter of the relaxation's steps (max|F| ~ 3e-2) it is nothing like dx*/dθ (error 0.999), at
  twice the steps it is dx*/dθ (8e-11); it is reported, and does not decide the verdict;
* a Lennard-Jones crystal with a vacancy (no contact rule) passes ``mdsens check`` for σ, and for
  ε, where x* does not depend on ε at all and every method must give exactly 0 (the dense solve
  once returned noise there, and failed the check).

The packing is the session's relaxed one (tests/conftest.py); one Checker, compiled once, serves
every check of it. The command line runs on the under-relaxed packing (FAIL, exit 1) and on the
crystal (PASS, exit 0).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from cli_helpers import cli, describe

from mdsens import check
from mdsens.check import Checker
from mdsens.cli import console
from mdsens.errors import UserError
from mdsens.verdict import DIRECT, FINITE_DIFFERENCES, IMPLICIT, UNROLLED, Comparison, judge


def fd_rows(rows: list) -> list:
    """The finite-difference rows of a check (Comparisons, or their dicts from check.json)."""
    kind = (lambda r: r["kind"]) if rows and isinstance(rows[0], dict) else (lambda r: r.kind)
    return [r for r in rows if kind(r) == FINITE_DIFFERENCES]


# --------------------------------------------------------------------------------------------
# The verdict table (mdsens.verdict.judge): rows in, pass/fail and reason out; no physics runs.

TOL = 1e-5


def implicit_row(converged: bool = True, residual: float = 1e-13, error: float = 0.0) -> Comparison:
    return Comparison(IMPLICIT, "implicit cg", error, 0.1, converged=converged, residual=residual)


def direct_row(error: float) -> Comparison:
    return Comparison(DIRECT, "direct", error, 0.1)


def fd_row(
    h: float, error: float, changes: int = 0, converged: bool = True, crossed: tuple = ("contact",)
) -> Comparison:
    """A finite-difference row; over the particles in no crossing pair its error is ``error`` too
    unless pairs crossed ``crossed`` radii (then a jump: 0.2) or a re-relaxation did not converge
    (then none)."""
    unchanged = None if not converged else (error if changes == 0 else 0.2)
    return Comparison(
        FINITE_DIFFERENCES,
        "FD",
        error if changes == 0 else 0.3,
        0.1,
        h=h,
        error_unchanged=unchanged,
        crossings=changes,
        crossed=crossed if changes else (),
        converged=converged,
    )


def unrolled_row(error: float) -> Comparison:
    return Comparison(
        UNROLLED, "unrolled", error, 0.1, steps=10, note="forward mode; max|F| 1e-01 at the end"
    )


NAN = math.nan
VERDICTS = {
    "FD agrees": (
        [implicit_row(), fd_row(1e-4, 0.2, changes=2), fd_row(1e-5, 3e-7), fd_row(1e-6, 2e-6)],
        1e-13,
        True,
        "finite differences agree to 3e-07 (h = 1e-05, no pair crosses a non-smooth radius)",
    ),
    "FD agrees, the direct solve too, the unrolled rows do not decide": (
        [implicit_row(), direct_row(1e-12), fd_row(1e-5, 3e-7), unrolled_row(0.99)],
        1e-13,
        True,
        "finite differences agree to 3e-07 (h = 1e-05, no pair crosses a non-smooth radius)",
    ),
    "FD disagrees on an under-relaxed state": (
        [implicit_row(), fd_row(1e-5, 3e-3), fd_row(1e-6, 4e-3)],
        1e-4,
        False,
        "finite differences disagree (best 0.003 at h = 1e-05, a step without crossings);"
        " max|F| at the state is 0.0001: relax to a smaller fmax",
    ),
    "FD disagrees on a relaxed state: no hint to relax further": (
        [implicit_row(), fd_row(1e-5, 3e-3)],
        1e-13,
        False,
        "finite differences disagree (best 0.003 at h = 1e-05, a step without crossings)",
    ),
    "all h change contacts, with a direct solve": (
        [implicit_row(), direct_row(2e-12), fd_row(1e-3, 0.3, changes=4), fd_row(1e-4, 0.1, changes=2)],
        1e-13,
        True,
        "a pair crosses the contact distance at every h: finite differences cannot judge; the direct"
        " solve agrees (2e-12)",
    ),
    "all h change contacts, without a direct solve": (
        [implicit_row(), fd_row(1e-3, 0.3, changes=4)],
        1e-13,
        False,
        "no trusted reference: a pair crosses the contact distance at every h and the system is too"
        " large for a direct solve",
    ),
    "no finite differences, with a direct solve": (
        [implicit_row(), direct_row(1e-12)],
        1e-13,
        True,
        "no finite-difference step: finite differences cannot judge; the direct solve agrees (1e-12)",
    ),
    "re-relaxations not converged, without a direct solve": (
        [implicit_row(), fd_row(1e-5, 1e-7, converged=False), fd_row(1e-4, 0.1, changes=2)],
        1e-13,
        False,
        "no trusted reference: at every h a pair crosses a non-smooth radius, a re-relaxation did not"
        " converge or the error is not a number and the system is too large for a direct solve",
    ),
    "the linear solve did not converge": (
        [implicit_row(converged=False, residual=3e-4), fd_row(1e-5, 3e-7)],
        1e-13,
        False,
        "the linear solve did not converge (residual 0.0003)",
    ),
    "the direct solve disagrees, FD agree": (
        [implicit_row(), direct_row(1e-3), fd_row(1e-5, 3e-7)],
        1e-13,
        False,
        "the direct solve disagrees (0.001)",
    ),
    "NaN from the direct solve never agrees": (
        [implicit_row(), direct_row(NAN), fd_row(1e-3, 0.3, changes=4)],
        1e-13,
        False,
        "the direct solve disagrees (nan)",
    ),
    "NaN finite differences are no reference": (
        [implicit_row(), fd_row(1e-5, NAN), fd_row(1e-6, NAN)],
        1e-13,
        False,
        "no trusted reference: at every h a pair crosses a non-smooth radius, a re-relaxation did not"
        " converge or the error is not a number and the system is too large for a direct solve",
    ),
    "a NaN implicit result never passes": (
        [implicit_row(error=NAN), direct_row(NAN), fd_row(1e-5, NAN)],
        1e-13,
        False,
        "the implicit result is not finite; the direct solve disagrees (nan)",
    ),
    "the switch onset crossed at every h, with a direct solve": (
        [implicit_row(), direct_row(1e-12), fd_row(1e-4, 0.1, changes=15, crossed=("r_onset",))],
        1e-13,
        True,
        "a pair crosses the switch onset r_onset·σ at every h: finite differences cannot judge; the direct"
        " solve agrees (1e-12)",
    ),
    "both ends of the switch crossed, without a direct solve": (
        [
            implicit_row(),
            fd_row(1e-3, 0.1, changes=4, crossed=("r_cutoff",)),
            fd_row(1e-4, 0.1, changes=2, crossed=("r_onset", "r_cutoff")),
        ],
        1e-13,
        False,
        "no trusted reference: a pair crosses the cutoff r_cutoff·σ or the switch onset r_onset·σ at every h"
        " and the system is too large for a direct solve",
    ),
    "every problem at once": (
        [implicit_row(converged=False, residual=0.5), direct_row(NAN), fd_row(1e-5, NAN), fd_row(1e-6, 1.0)],
        NAN,
        False,
        "the linear solve did not converge (residual 0.5); the direct solve disagrees (nan);"
        " finite differences disagree (best 1 at h = 1e-06, a step without crossings)",
    ),
}


@pytest.mark.parametrize(("rows", "max_force", "passed", "reason"), VERDICTS.values(), ids=VERDICTS.keys())
def test_verdict_table(rows, max_force, passed, reason):
    verdict = judge(rows, TOL, max_force)
    assert (verdict.passed, verdict.reason) == (passed, reason)


def test_verdict_tolerance_is_inclusive_and_an_infinite_error_fails():
    """An error equal to the tolerance passes; an infinite one (the reference is exactly 0 while
    the implicit answer is not: :func:`mdsens.references.relative_error`) fails."""
    assert judge([implicit_row(), fd_row(1e-5, TOL)], TOL, 1e-13).passed
    assert not judge([implicit_row(), fd_row(1e-5, math.inf)], TOL, 1e-13).passed
    assert not judge([implicit_row(), direct_row(math.inf), fd_row(1e-5, 1e-7)], TOL, 1e-13).passed


@pytest.mark.parametrize("tolerance", [NAN, math.inf, -math.inf, 0.0, -1e-5, "1e-5x"])
def test_verdict_refuses_a_tolerance_that_is_not_a_positive_finite_number(tolerance):
    """`mdsens check --tol nan` once printed PASS where finite differences disagree by 50 %: a NaN
    tolerance compares false everywhere. No verdict is given on such a tolerance."""
    with pytest.raises(UserError, match="the tolerance must be a positive"):
        judge([implicit_row(), fd_row(1e-5, 0.5)], tolerance, 1e-13)


@pytest.mark.parametrize(
    ("tolerance", "steps"),
    [(NAN, check.STEPS), (0.0, check.STEPS), (-1e-5, check.STEPS), (math.inf, check.STEPS)]
    + [(TOL, (1e-5, h)) for h in (NAN, 0.0, -1e-4, math.inf)],
)
def test_check_run_refuses_bad_tolerances_and_steps_before_running(
    packing_system, packing_relaxed, tolerance, steps
):
    with pytest.raises(UserError, match="must be a positive finite number"):
        check.check_run(packing_system, packing_relaxed, ["diameter.B"], tolerance, steps, unroll=())


# --------------------------------------------------------------------------------------------
# The measurements, on the session's relaxed packing and through the command line.


@pytest.fixture(scope="module")
def packing_checker(packing_system, packing_relaxed):
    """A Checker of the relaxed packing with steps across (1e-3, 1e-4) and below (1e-5, 1e-6) the
    near-contact pair's gap."""
    return Checker(packing_system, packing_relaxed, steps=(1e-3, 1e-4, 1e-5, 1e-6))


@pytest.fixture(scope="module")
def packing_check(packing_checker, packing_relaxed):
    """``mdsens check -p diameter.B`` with unrolled autodiff at a quarter of and at twice the
    relaxation's steps; returns the check and those two step counts."""
    n = packing_relaxed.steps
    quarter, double = max(n // 4, 1), 2 * n
    return packing_checker.check("diameter.B", unroll=(quarter, double)), quarter, double


def test_check_passes_on_the_relaxed_packing(packing_check):
    result, _, _ = packing_check
    assert result.passed, result.reason
    assert min(r.error for r in fd_rows(result.rows)) <= 1e-5
    (direct,) = [r for r in result.rows if r.kind == DIRECT]
    assert direct.error <= 1e-8
    (implicit_row,) = [r for r in result.rows if r.kind == IMPLICIT]
    assert implicit_row.error == 0.0  # the reference the others are measured against


def test_large_steps_cross_contact_changes_that_are_reported_not_trusted(packing_check):
    """h = 1e-3 and 1e-4 move the pair 7e-5 from contact across it; 1e-5 and 1e-6 do not. The
    verdict comes from a step without contact changes, and the large steps' errors are real."""
    result, _, _ = packing_check
    rows = {r.h: r for r in fd_rows(result.rows)}
    for h in (1e-3, 1e-4):
        assert rows[h].crossings > 0 and rows[h].crossed == ("contact",)
        assert rows[h].error > 1e-2  # a jump across a contact change, not a derivative
    for h in (1e-5, 1e-6):
        assert rows[h].crossings == 0 and rows[h].crossed == ()
        assert rows[h].error == rows[h].error_unchanged <= 1e-5
    assert result.reason.startswith("finite differences agree to") and "h = 1e-05" in result.reason


def test_unrolled_autodiff_is_the_derivative_of_the_state_reached(packing_check):
    """Before FIRE has converged the unrolled derivative is that of an unrelaxed state; after, it
    is dx*/dθ. The rows are reported, not trusted: they do not decide the verdict."""
    result, quarter, double = packing_check
    rows = {r.steps: r for r in result.rows if r.steps is not None}
    assert sorted(rows) == [quarter, double]
    assert all(r.kind == UNROLLED for r in rows.values())
    assert rows[quarter].error > 1e-2
    assert rows[double].error < 1e-6


def test_times_are_of_compiled_calls_and_implicit_is_faster_than_finite_differences(packing_check):
    """`mdsens check` once timed compilation: implicit CG 143 s against finite differences 0.21 s.
    Each method is compiled (warmed up) before it is timed and its compilation reported apart; one
    implicit solve then costs less than one finite difference (two re-relaxations)."""
    result, _, _ = packing_check
    (implicit,) = [r for r in result.rows if r.kind == IMPLICIT]
    fd = fd_rows(result.rows)
    assert implicit.wall_time < sum(r.wall_time for r in fd) / len(fd)
    assert implicit.compile_time > implicit.wall_time  # compiling CG costs more than running it
    assert all(r.compile_time is not None and r.compile_time > 0 for r in result.rows)
    assert len({r.compile_time for r in fd}) == 1  # FD compile once, for every h


def test_contact_changes_at_every_step_leave_the_verdict_to_the_direct_solve(packing_checker):
    """`mdsens check --help`: "Finite differences across a change of contacts are reported, not
    blamed on the implicit answer". At h = 1e-3 alone even the particles whose own contacts did
    not change are 0.22 off (the whole network follows the jump): were that row trusted, the
    check would fail. The direct solve agrees to 1e-12, so it passes, and says why."""
    result = packing_checker.check("diameter.B", unroll=(), steps=(1e-3,))
    (row,) = fd_rows(result.rows)
    assert row.h == 1e-3 and row.crossings > 0
    assert row.error_unchanged > 1e-2
    (direct,) = [r for r in result.rows if r.kind == DIRECT]
    assert direct.error <= 1e-8
    assert result.passed, result.reason
    assert result.reason.startswith(
        "a pair crosses the contact distance at every h: finite differences cannot judge; the direct"
        " solve agrees"
    )


def test_without_a_direct_solve_contact_changes_at_every_step_fail(packing_checker, monkeypatch):
    """A system too large for the direct solve, whose every step changes contacts: nothing
    trusted is left, and the check fails rather than pass or fail on an untrusted row."""
    monkeypatch.setattr(check, "DIRECT_SOLVE_LIMIT", 0)
    result = packing_checker.check("diameter.B", unroll=(), steps=(1e-3,))
    assert not [r for r in result.rows if r.kind == DIRECT]
    (row,) = fd_rows(result.rows)
    assert row.crossings > 0
    assert not result.passed
    assert result.reason == (
        "no trusted reference: a pair crosses the contact distance at every h and the system is too"
        " large for a direct solve"
    )


def test_check_fails_on_an_under_relaxed_run(tmp_path, monkeypatch):
    """``mdsens check`` with the default steps h (1e-4, 1e-5, 1e-6): FAIL, exit 1."""
    monkeypatch.chdir(tmp_path)
    relaxed = cli("relax", "--set", "minimizer.fmax=1e-4", "--out", "results/loose")
    assert relaxed.exit_code == 0, describe(relaxed)
    result = cli("check", "--run", "results/loose", "-p", "diameter.B", "--no-unroll")
    assert result.exit_code == 1, describe(result)
    assert "FAIL" in result.output and "PASS" not in result.output
    report = json.loads(Path("results/loose/check.json").read_text())
    assert report["passed"] is False and report["tolerance"] == 1e-5
    entry = report["parameters"]["diameter.B"]
    assert entry["passed"] is False and "relax to a smaller fmax" in entry["reason"]
    assert sorted(r["h"] for r in fd_rows(entry["rows"])) == sorted(check.STEPS)
    # The tight references agree with each other, not with the loose state's derivative.
    best = min(r["error_unchanged"] for r in fd_rows(entry["rows"]) if r["crossings"] == 0)
    assert best > 1e-4
    assert "finite differences disagree" in entry["reason"]
    assert not [r for r in entry["rows"] if r["steps"] is not None]  # --no-unroll


@pytest.fixture(scope="module")
def lj_run(tmp_path_factory, lj_crystal_overrides) -> Path:
    """A run of the relaxed Lennard-Jones crystal with a vacancy (31 atoms), written by the CLI."""
    path = tmp_path_factory.mktemp("lj") / "lj"
    sets = [arg for override in lj_crystal_overrides for arg in ("--set", override)]
    relaxed = cli("relax", "--system", "lj-fcc-vacancy", *sets, "--out", path)
    assert relaxed.exit_code == 0, describe(relaxed)
    return path


def run_copy(run: Path, where: Path) -> Path:
    """A copy of ``run`` without check.json."""
    return Path(shutil.copytree(run, where / "run", ignore=shutil.ignore_patterns("check.json")))


@pytest.mark.parametrize(
    "option",
    [("--tol", "nan"), ("--tol", "inf"), ("--tol", "0"), ("--tol", "-1e-5"), ("--h", "nan")]
    + [("--h", "1e-5", "--h", bad) for bad in ("0", "-1e-4", "inf")],
)
def test_check_refuses_a_tolerance_or_step_that_is_not_positive_and_finite(lj_run, tmp_path, option):
    """Exit 2, one line naming the option, nothing written."""
    run = run_copy(lj_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = cli("check", "--run", run, "-p", "sigma", "--no-unroll", *option)
    assert result.exit_code == 2, describe(result)
    assert result.exception is None or isinstance(result.exception, SystemExit), describe(result)
    assert result.stdout == ""
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"Error: {option[0]} must be a positive finite number")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_check_help_shows_no_flag_name_as_a_default():
    """`check --help` once said `[default: unroll]` for --unroll/--no-unroll."""
    result = cli("check", "--help")
    assert result.exit_code == 0, describe(result)
    assert "[default: unroll]" not in result.output and "Default: on." in result.output


def test_check_passes_on_a_lennard_jones_crystal_with_a_vacancy(lj_run, tmp_path, monkeypatch):
    """``mdsens check -p sigma -p epsilon``: PASS, exit 0, for both parameters; on a 40-column
    console each row of its tables is still one line, led by its short method label."""
    run = run_copy(lj_run, tmp_path)
    monkeypatch.setattr(console.out, "width", 40)
    result = cli(
        "check", "--run", run, "-p", "sigma", "-p", "epsilon", "--h", 1e-4, "--h", 1e-5, "--no-unroll"
    )
    assert result.exit_code == 0, describe(result)
    assert "PASS" in result.output and "FAIL" not in result.output
    lines = result.output.splitlines()
    for name in ("sigma.Ar", "epsilon.Ar"):
        title = lines.index(f"dx*/dθ for {name}")
        header, rule, *rows = lines[title + 1 : title + 8]
        assert header.split()[:3] == ["method", "h", "steps"] and set(rule) == {"-", " "}
        assert [row.split()[0] for row in rows[:4]] == ["implicit", "direct", "FD", "FD"]
        assert rows[4].startswith("PASS ")
        assert all(len(line) > 40 for line in (header, *rows[:4]))  # not wrapped to the console
    report = json.loads((run / "check.json").read_text())
    assert report["passed"] is True
    entries = report["parameters"]
    assert list(entries) == ["sigma.Ar", "epsilon.Ar"]
    for entry in entries.values():
        assert entry["passed"] is True, entry["reason"]
        fd = fd_rows(entry["rows"])
        # No contact rule for LJ, and no pair near the switch's ends (1.2 σ, 1.5 σ).
        assert len(fd) == 2 and all(r["crossings"] == 0 and r["crossed"] == [] for r in fd)
        (direct,) = [r for r in entry["rows"] if r["kind"] == DIRECT]
        assert direct["error"] <= 1e-10
    # σ: x* moves around the vacancy, and the comparison is not vacuous: central differences
    # converge as h², 6.7e-7 at h = 1e-4 and 6.3e-9 at 1e-5. ε: E = ε f(x; σ), so x* does not
    # depend on ε, and every method must agree exactly (error 0: all give 0).
    sigma = {r["h"]: r["error"] for r in fd_rows(entries["sigma.Ar"]["rows"])}
    assert sigma[1e-4] > 10 * sigma[1e-5] > 0 and sigma[1e-5] <= 1e-6
    assert all(r["error"] == 0.0 for r in entries["epsilon.Ar"]["rows"])
