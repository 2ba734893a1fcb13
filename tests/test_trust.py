"""Trust: rattlers, the Hessian spectrum and `mdsens check`, against independent references.

The N = 1024 fixture was computed by code that shares nothing with mdsens (JAX-MD FIRE, dense
pseudo-inverse cross-checked by a sparse direct solve); it has one rattler.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import mdsens
from mdsens import implicit
from mdsens.cli import app
from mdsens.sensitivity import Sensitivity, optimality_fn
from mdsens.spectrum import lowest_eigenvalues

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def n1024():
    ref = np.load(DATA / "paper-packing-N1024.npz")
    system = mdsens.load_system("binary-packing", overrides=["n_particles=1024"])
    np.testing.assert_array_equal(system.positions, ref["initial_positions"])
    return system, ref


def test_rattlers_match_the_fixture_and_forward_mode_matches_it(n1024):
    system, ref = n1024
    x = jnp.asarray(ref["positions"])
    rattlers = np.asarray(system.rattlers(x, system.params))
    np.testing.assert_array_equal(rattlers, ref["rattler"].astype(bool))
    result = Sensitivity(system).compute(x, ["diameter.B"], spectrum=False)
    dx = result.parameters["diameter.B"].dx
    assert not dx[rattlers].any()  # masked, not noise
    # The fixture removed the mean over all particles, mdsens the translation of the
    # non-rattlers: equal on the non-rattlers up to a uniform translation.
    keep = ~rattlers
    expected = ref["dx_ddiameter_B"][keep]
    ours = dx[keep]
    diff = (ours - ours.mean(0)) - (expected - expected.mean(0))
    assert np.linalg.norm(diff) / np.linalg.norm(expected) < 1e-8
    assert any("rattler" in warning for warning in result.warnings)


def test_reverse_mode_with_rattlers_is_finite_and_matches_the_forward_answer(n1024):
    system, ref = n1024
    x = jnp.asarray(ref["positions"])
    c = jax.random.normal(jax.random.PRNGKey(5), x.shape)  # weights every particle, rattler too
    x_star = mdsens.relaxed_positions_fn(system)
    grad = jax.grad(lambda p: jnp.sum(c * x_star(p, x)))(system.params)["diameter"][1]
    dx = Sensitivity(system).compute(x, ["diameter.B"], spectrum=False).parameters["diameter.B"].dx
    assert np.isfinite(float(grad))
    assert float(grad) == pytest.approx(float(np.sum(np.asarray(c) * dx)), rel=1e-9)


def test_without_rattlers_in_the_null_space_the_adjoint_solve_fails_loudly(n1024):
    system, ref = n1024
    x = jnp.asarray(ref["positions"])
    n, d = x.shape
    translations = jnp.kron(jnp.ones((n, 1)), jnp.eye(d)) / np.sqrt(n)
    c = jax.random.normal(jax.random.PRNGKey(5), x.shape)
    # Same tolerances as the default solve, capped at 1000 iterations (twice what the consistent
    # system needs) so the test stays fast: an inconsistent system never converges.
    solve = implicit.cg(tol=1e-12, maxiter=1000, atol=system.recipe["minimizer"]["fmax"] * np.sqrt(x.size))
    _, info = implicit.root_vjp(optimality_fn(system), x, system.params, c, solve, lambda *_: translations)
    assert not bool(info.converged)
    assert float(info.residual) > 1e-3


def test_dense_spectrum_equals_numpy_and_lanczos_agrees(monkeypatch):
    system = mdsens.load_system("binary-packing")
    relaxed = mdsens.Relaxer(system).relax()
    x = jnp.asarray(relaxed.positions)
    hessian = jax.hessian(system.energy_fn)(x, system.params).reshape(x.size, x.size)
    exact = np.sort(np.linalg.eigvalsh(np.asarray(hessian)))[2:]  # two translation zero modes
    matvec = implicit.hessian_matvec(optimality_fn(system), x, system.params)
    nullspace = system.nullspace(x, system.params)
    dense = lowest_eigenvalues(matvec, x.size, nullspace)
    np.testing.assert_allclose(dense.lowest, exact[:4], rtol=1e-8)
    assert dense.largest == pytest.approx(exact[-1], rel=1e-10)
    assert not dense.negative and dense.extra_zero_modes == 0
    monkeypatch.setattr("mdsens.spectrum.DENSE_LIMIT", 0)
    lanczos = lowest_eigenvalues(matvec, x.size, nullspace)
    assert lanczos.method == "lanczos"
    np.testing.assert_allclose(lanczos.lowest[:3], exact[:3], rtol=1e-6)


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def test_check_passes_on_the_packing_and_fails_on_an_under_relaxed_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli("relax").exit_code == 0
    good = _cli("check", "-p", "diameter.B", "--no-unroll")
    assert good.exit_code == 0, good.output
    assert "PASS" in good.output
    report = json.loads(Path("results/binary-packing/check.json").read_text())
    rows = report["parameters"]["diameter.B"]["rows"]
    assert report["passed"] is True
    assert min(r["error"] for r in rows if r["method"].startswith("finite differences")) <= 1e-5
    assert next(r for r in rows if r["method"].startswith("direct"))["error"] <= 1e-8
    # h = 1e-4 crosses a contact change in this packing (a pair sits 7e-5 from contact).
    assert next(r for r in rows if r["h"] == 1e-4)["contact_changes"] > 0

    assert _cli("relax", "--set", "minimizer.fmax=1e-4", "--out", "results/loose").exit_code == 0
    bad = _cli("check", "--run", "results/loose", "-p", "diameter.B", "--no-unroll")
    assert bad.exit_code == 1
    assert "FAIL" in bad.output
    assert json.loads(Path("results/loose/check.json").read_text())["passed"] is False


def test_unrolled_autodiff_converges_to_the_implicit_answer():
    from mdsens.check import check_run

    system = mdsens.load_system("binary-packing")
    relaxed = mdsens.Relaxer(system).relax()
    quarter, double = max(relaxed.steps // 4, 1), 2 * relaxed.steps
    (result,) = check_run(system, relaxed, ["diameter.B"], steps=(1e-5,), unroll=(quarter, double))
    unrolled = {r.steps: r.error for r in result.rows if r.steps is not None}
    # Before convergence the unrolled derivative is that of an unrelaxed state; after, it matches.
    assert unrolled[quarter] > 1e-2
    assert unrolled[double] < 1e-6
    assert result.passed
