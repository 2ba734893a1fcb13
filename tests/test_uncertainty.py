"""``mdsens uncertainty``: parameter covariances from --std and files, first-order propagation to
positions and observables against finite differences, the Monte Carlo check against the first
order (the sampling error of a standard deviation from K samples is 1/√(2(K − 1))), the files and
figures, and bad input through the command line.

The 128-particle packing of conftest is relaxed and differentiated once; the Monte Carlo samples
reuse its compiled relaxer.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, cli, describe

from mdsens.errors import UserError
from mdsens.manifest import read_manifest
from mdsens.observables import parse_observable
from mdsens.parameters import unit_tangent
from mdsens.references import central_difference, relative_error, shifted
from mdsens.run import save_relaxation
from mdsens.uncertainty import (
    block_diagonal,
    compare,
    covariance_from_matrix,
    covariance_from_std,
    draw,
    monte_carlo,
    propagate,
)
from mdsens.uncertainty_files import read_covariance, save_uncertainty

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The criterion: the Monte Carlo and first-order σ agree within their sampling error,
# ratio in 0.85-1.15; for K = 200 samples that is ±3 standard errors 1/√(2·199) = 0.050.
SMALL_SAMPLES = 200
BAND = (0.85, 1.15)


def _dx(packing_sensitivity) -> dict[str, np.ndarray]:
    return {name: entry.dx for name, entry in packing_sensitivity.parameters.items()}


def _snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the parameter covariance -------------------------------------------------------------------


def test_std_specs_absolute_relative_and_per_species(packing_system):
    covariance = covariance_from_std(packing_system, ["diameter=1%", "epsilon=0.05", "alpha=0"])
    assert covariance.names == ("diameter.A", "diameter.B", "epsilon", "alpha")
    # Each species 1 % of its own diameter (1.0 and 0.6), independently; epsilon absolute.
    np.testing.assert_allclose(covariance.std, [0.01, 0.006, 0.05, 0.0], rtol=1e-15)
    np.testing.assert_array_equal(covariance.matrix, np.diag(np.diag(covariance.matrix)))
    np.testing.assert_allclose(covariance.values, [1.0, 0.6, 1.0, 2.0])


@pytest.mark.parametrize(
    "specs, needle",
    [
        (["diameter.B"], "NAME=VALUE"),
        (["diameter.B="], "NAME=VALUE"),
        (["=0.1"], "NAME=VALUE"),
        (["diameter.B=abc"], "not a number"),
        (["diameter.B=-0.01"], ">= 0"),
        (["diameter.B=nan"], "finite"),
        (["diameter.B=inf%"], "finite"),
        (["diameter.Q=0.1"], "unknown species"),
        (["sigma=0.1"], "unknown parameter"),
        (["diameter=1%", "diameter.B=0.01"], "twice"),
    ],
)
def test_bad_std_is_a_user_error(packing_system, specs, needle):
    with pytest.raises(UserError, match=needle):
        covariance_from_std(packing_system, specs)


def test_covariance_matrix_accepts_a_semidefinite_and_rounded_matrix(packing_system):
    # Perfectly correlated diameters (rank 1), with an asymmetry and a negative eigenvalue at
    # the level of rounding: accepted, and symmetrised.
    matrix = 1e-4 * np.array([[1.0, 0.6], [0.6 + 1e-14, 0.36]])
    covariance = covariance_from_matrix(packing_system, ["diameter.A", "diameter.B"], matrix)
    np.testing.assert_array_equal(covariance.matrix, covariance.matrix.T)
    np.testing.assert_allclose(covariance.std, [0.01, 0.006])


@pytest.mark.parametrize(
    "names, matrix, needle",
    [
        (["diameter.A", "diameter.B"], [[1.0, 0.5], [0.4, 1.0]], "not symmetric"),
        (["diameter.A", "diameter.B"], [[1.0, 2.0], [2.0, 1.0]], "positive semi-definite"),
        (["diameter.A", "diameter.B"], [[-1.0, 0.0], [0.0, -2.0]], "positive semi-definite"),
        (["diameter.A", "diameter.B"], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "shape"),
        (["diameter.A"], [[1.0, 0.0], [0.0, 1.0]], "shape"),
        (["diameter.A", "diameter.B"], [[1.0, np.nan], [np.nan, 1.0]], "non-finite"),
        (["diameter.A", "size"], [[1.0, 0.0], [0.0, 1.0]], "unknown parameter"),
        (["diameter.A", "diameter.A"], [[1.0, 0.0], [0.0, 1.0]], "more than once"),
        (["diameter"], [[1.0]], "one scalar parameter"),
        ([3], [[1.0]], "strings"),
    ],
)
def test_bad_covariance_matrix_is_a_user_error(packing_system, names, matrix, needle):
    with pytest.raises(UserError, match=needle):
        covariance_from_matrix(packing_system, names, matrix)


def test_block_diagonal_joins_independent_parts_and_refuses_overlap_or_nothing(packing_system):
    a = covariance_from_std(packing_system, ["epsilon=0.1"])
    b = covariance_from_matrix(packing_system, ["diameter.A", "diameter.B"], [[4.0, 1.0], [1.0, 1.0]])
    joined = block_diagonal([a, b])
    assert joined.names == ("epsilon", "diameter.A", "diameter.B")
    np.testing.assert_allclose(joined.matrix, [[0.01, 0, 0], [0, 4, 1], [0, 1, 1]])
    with pytest.raises(UserError, match="twice"):
        block_diagonal([b, covariance_from_std(packing_system, ["diameter.B=0.1"])])
    with pytest.raises(UserError, match="--std"):
        block_diagonal([covariance_from_std(packing_system, [])])
    with pytest.raises(UserError, match="zero"):
        block_diagonal([covariance_from_std(packing_system, ["epsilon=0"])])


def test_covariance_files_json_and_csv_read_the_same(tmp_path):
    matrix = [[1e-4, 2e-5], [2e-5, 4e-5]]
    (tmp_path / "c.json").write_text(json.dumps({"names": ["diameter.A", "diameter.B"], "matrix": matrix}))
    (tmp_path / "c.csv").write_text("diameter.A, diameter.B\n1e-4,2e-5\n2e-5, 4e-5\n")
    for name in ("c.json", "c.csv"):
        names, read = read_covariance(tmp_path / name)
        assert names == ["diameter.A", "diameter.B"]
        np.testing.assert_array_equal(read, matrix)


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("c.json", "{not json", "not JSON"),
        ("c.json", '{"names": ["epsilon"]}', "expected"),
        ("c.json", '{"names": ["epsilon"], "matrix": [["x"]]}', "numbers"),
        ("c.json", '{"names": ["a", "b"], "matrix": [[1, 0], [0]]}', "same length"),
        ("c.csv", "", "empty"),
        ("c.csv", "epsilon\nabc\n", "numbers"),
        ("c.txt", "epsilon\n1\n", ".json or .csv"),
    ],
)
def test_bad_covariance_file_is_a_user_error(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=needle):
        read_covariance(tmp_path / name)


def test_draws_have_the_covariance_and_respect_a_degenerate_one(packing_system):
    # diameter.B perfectly correlated with diameter.A (0.6 times it): every draw keeps the ratio.
    matrix = np.array([[4.0, 2.4, 0.5], [2.4, 1.44, 0.3], [0.5, 0.3, 1.0]])
    covariance = covariance_from_matrix(packing_system, ["diameter.A", "diameter.B", "epsilon"], matrix)
    k = 40_000
    deltas = draw(covariance, k, seed=1)
    np.testing.assert_allclose(deltas[:, 1], 0.6 * deltas[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(deltas, draw(covariance, k, seed=1))  # seeded
    # Sample covariances have standard errors √((Σ_pp Σ_qq + Σ_pq²) / K): within 5 of them.
    sample = np.cov(deltas.T)
    error = np.sqrt((np.outer(np.diag(matrix), np.diag(matrix)) + matrix**2) / k)
    assert np.all(np.abs(sample - matrix) < 5 * error)


# --- first-order propagation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def correlated(packing_system):
    """Σθ over both diameters, correlated (ρ = 0.5)."""
    return covariance_from_matrix(
        packing_system, ["diameter.A", "diameter.B"], [[1.0e-8, 0.3e-8], [0.3e-8, 0.36e-8]]
    )


@pytest.fixture(scope="module")
def linear_pressure(packing_system, packing_relaxed, packing_sensitivity, correlated):
    return propagate(packing_system, packing_relaxed, correlated, ["pressure"], dx=_dx(packing_sensitivity))


def test_position_covariance_matches_finite_differences(linear_pressure, correlated, packing_fd):
    # Independent: J from central differences of re-relaxed states, blocks J_i Σ J_iᵀ atom by atom.
    fd = np.stack([packing_fd(name)[0] for name in correlated.names])  # (P, N, d)
    reference = np.array([fd[:, i, :].T @ correlated.matrix @ fd[:, i, :] for i in range(fd.shape[1])])
    # The blocks are quadratic in J, which finite differences give to 1e-5 (test_physics).
    assert relative_error(linear_pressure.blocks, reference) < 2e-5
    np.testing.assert_allclose(linear_pressure.sigma**2, np.trace(reference, axis1=1, axis2=2), rtol=1e-4)
    # Symmetric positive semi-definite blocks.
    np.testing.assert_allclose(linear_pressure.blocks, np.swapaxes(linear_pressure.blocks, 1, 2), atol=0)
    assert np.all(np.linalg.eigvalsh(linear_pressure.blocks) > -1e-12 * linear_pressure.blocks.max())


def test_pressure_sigma_matches_finite_differences(
    packing_system, packing_relaxer, packing_relaxed, linear_pressure, correlated, packing_fd_step
):
    # dP*/dθ from pressures of states re-relaxed at θ ± h, then σ² = g Σ gᵀ.
    pressure = jax.jit(parse_observable(packing_system, "pressure").fn)
    params = packing_system.params
    gradient = []
    for name in correlated.names:
        tangent = unit_tangent(packing_system, name)
        result = central_difference(
            packing_relaxer, packing_relaxed.positions, params, tangent, packing_fd_step
        )
        assert result.converged and not result.changed.any()
        ends = [shifted(params, tangent, sign * packing_fd_step) for sign in (1.0, -1.0)]
        values = [
            float(pressure(jnp.asarray(r.positions), p))
            for r, p in zip((result.plus, result.minus), ends, strict=True)
        ]
        gradient.append((values[0] - values[1]) / (2 * packing_fd_step))
    gradient = np.asarray(gradient)
    entry = linear_pressure.observables["pressure"]
    np.testing.assert_allclose([entry.gradient[n] for n in correlated.names], gradient, rtol=1e-6)
    assert entry.sigma == pytest.approx(math.sqrt(gradient @ correlated.matrix @ gradient), rel=1e-6)
    assert linear_pressure.observable_covariance[0, 0] == pytest.approx(entry.sigma**2, rel=1e-12)


def test_one_parameter_sigma_is_the_sensitivity_times_the_std(
    packing_system, packing_relaxed, packing_sensitivity
):
    covariance = covariance_from_std(packing_system, ["diameter.B=3e-5"])
    linear = propagate(packing_system, packing_relaxed, covariance, dx=_dx(packing_sensitivity))
    dx = packing_sensitivity.parameters["diameter.B"].dx
    np.testing.assert_allclose(linear.sigma, np.linalg.norm(dx, axis=1) * 3e-5, rtol=1e-12)
    np.testing.assert_allclose(linear.sigma_axes, np.abs(dx) * 3e-5, rtol=1e-12)
    np.testing.assert_array_equal(linear.jacobian[0], dx)
    np.testing.assert_array_equal(linear.rattlers, packing_sensitivity.rattlers)


def test_unknown_observable_is_a_user_error_before_any_solve(packing_system, packing_relaxed, correlated):
    with pytest.raises(UserError, match="unknown observable"):
        propagate(packing_system, packing_relaxed, correlated, ["volume"])


# --- the Monte Carlo check ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_std(packing_system, packing_relaxer, packing_relaxed, packing_sensitivity):
    """The issue's check: 200 samples at 1e-4 relative std of diameter.B, with the pressure."""
    covariance = covariance_from_std(packing_system, ["diameter.B=0.01%"])
    linear = propagate(packing_system, packing_relaxed, covariance, ["pressure"], dx=_dx(packing_sensitivity))
    mc = monte_carlo(packing_system, packing_relaxed, linear, SMALL_SAMPLES, seed=0, relaxer=packing_relaxer)
    return linear, mc


def test_monte_carlo_agrees_with_first_order_at_small_std(small_std):
    linear, mc = small_std
    assert mc.used == SMALL_SAMPLES and all(reason == "" for reason in mc.reasons)
    comparison = compare(linear, mc)
    assert comparison.sampling_error == pytest.approx(1 / math.sqrt(2 * (SMALL_SAMPLES - 1)))
    assert comparison.atoms.sum() == (~linear.rattlers).sum()
    nominal = comparison.nominal
    for ratio in (nominal.rms_ratio, nominal.percentiles[50.0], nominal.observables["pressure"]):
        assert BAND[0] <= ratio <= BAND[1], comparison
    # Where a sample keeps its contacts, x*(θ + δ) is smooth and the first-order prediction's
    # remainder is second order: ‖Δx − J δ‖ / ‖J δ‖ = |δ| ‖x''‖ / 2‖x'‖ + O(δ²), one constant
    # times |δ| for every sample (one parameter). Below σ/10 the relaxations' own accuracy
    # (fmax) shows.
    sigma = linear.covariance.std[0]
    size = np.abs(mc.deltas[:, 0])
    kept = mc.converged & (mc.contact_changes == 0) & (size > sigma / 10)
    assert kept.sum() > SMALL_SAMPLES / 2
    slope = mc.prediction_error[kept] / size[kept]
    assert slope.max() < 1.1 * slope.min(), np.sort(slope)


def test_drawn_ratio_is_one_where_the_response_is_linear(
    packing_system, packing_relaxer, packing_relaxed, packing_sensitivity
):
    # At 1e-6 relative no contact changes, and Δx = J δ up to the second-order remainder,
    # ≈ 30 |δ| relative (test above): σ_MC = σ_linear(Σ̂δ) to ~1e-4 with only 8 samples, while
    # the ratio to Σθ carries the sampling error of 8 draws (±0.27).
    covariance = covariance_from_std(packing_system, ["diameter.B=1e-4%"])
    linear = propagate(packing_system, packing_relaxed, covariance, ["pressure"], dx=_dx(packing_sensitivity))
    mc = monte_carlo(packing_system, packing_relaxed, linear, 8, seed=3, relaxer=packing_relaxer)
    assert mc.used == 8 and mc.changed == 0
    comparison = compare(linear, mc)
    drawn = comparison.drawn
    np.testing.assert_allclose(drawn.ratio[comparison.atoms], 1.0, atol=1e-3)
    assert drawn.rms_ratio == pytest.approx(1.0, abs=1e-4)
    assert drawn.observables["pressure"] == pytest.approx(1.0, abs=1e-4)
    # The nominal ratio is the draws' own: std(δ) / σθ, for every atom alike.
    spread = np.std(mc.deltas[:, 0], ddof=1) / covariance.std[0]
    assert comparison.nominal.rms_ratio == pytest.approx(spread, rel=1e-4)


def test_monte_carlo_departs_when_contacts_change(
    packing_system, packing_relaxer, packing_relaxed, packing_sensitivity
):
    covariance = covariance_from_std(packing_system, ["diameter.B=5%"])
    linear = propagate(packing_system, packing_relaxed, covariance, dx=_dx(packing_sensitivity))
    mc = monte_carlo(packing_system, packing_relaxed, linear, 20, seed=0, relaxer=packing_relaxer)
    comparison = compare(linear, mc)
    assert mc.changed > 0
    # Far outside what sampling explains.
    assert abs(comparison.nominal.rms_ratio - 1) > 3 * comparison.sampling_error, comparison
    assert abs(comparison.drawn.rms_ratio - 1) > 3 * comparison.sampling_error, comparison


def test_monte_carlo_displacements_have_no_translation(
    packing_system, packing_relaxer, packing_relaxed, small_std
):
    linear, mc = small_std
    # Like dx*/dθ (the minimum-norm solution), the mean displacement has no rigid translation.
    moving = ~linear.rattlers
    np.testing.assert_allclose(mc.mean[moving].mean(axis=0), 0.0, atol=1e-15)
    np.testing.assert_allclose(linear.jacobian[0][moving].mean(axis=0), 0.0, atol=1e-12)


# --- files and figures --------------------------------------------------------------------------


def test_save_uncertainty_writes_files_in_the_manifest(tmp_path, packing_system, packing_relaxed, small_std):
    linear, mc = small_std
    run = save_relaxation(tmp_path / "run", packing_system, packing_relaxed)
    paths = save_uncertainty(run, packing_system, packing_relaxed, linear, mc, {"samples": SMALL_SAMPLES})
    names = ["uncertainty.json", "uncertainty.npz", "uncertainty.png", "uncertainty-samples.png"]
    assert [p.name for p in paths] == names
    manifest = read_manifest(run)
    assert all(manifest.files[name].stage == "uncertainty" for name in names)
    for name in names[2:]:
        assert (run / name).read_bytes().startswith(PNG_MAGIC)
    summary = json.loads((run / "uncertainty.json").read_text())
    assert summary["state"] == manifest.state
    comparison = compare(linear, mc)
    assert summary["positions"]["comparison"]["nominal"]["rms_ratio"] == comparison.nominal.rms_ratio
    assert summary["positions"]["comparison"]["drawn"]["ratio_p95"] == comparison.drawn.percentiles[95.0]
    assert summary["observables"]["pressure"]["ratio"] == comparison.nominal.observables["pressure"]
    assert summary["monte_carlo"]["converged"] == SMALL_SAMPLES
    assert summary["monte_carlo"]["contact_changed_samples"] == mc.changed
    with np.load(run / "uncertainty.npz") as data:
        np.testing.assert_array_equal(data["covariance"], linear.blocks)
        np.testing.assert_array_equal(data["mc_sigma"], mc.sigma)
        assert data["sample_deltas"].shape == (SMALL_SAMPLES, 1)
        assert list(data["observable_names"]) == ["pressure"]


def test_save_uncertainty_refuses_a_run_relaxed_again(tmp_path, packing_system, packing_relaxed, small_std):
    linear, _ = small_std
    run = save_relaxation(tmp_path / "run", packing_system, packing_relaxed)
    moved = type(packing_relaxed)(**{**vars(packing_relaxed), "positions": packing_relaxed.positions + 1e-3})
    save_relaxation(run, packing_system, moved)
    before = _snapshot(run)
    with pytest.raises(UserError, match="relaxed again"):
        save_uncertainty(run, packing_system, packing_relaxed, linear)
    assert _snapshot(run) == before


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packing_run(tmp_path_factory, packing_system, packing_relaxed):
    """A run of the relaxed packing (read-only for the tests)."""
    return save_relaxation(tmp_path_factory.mktemp("uncertainty") / "run", packing_system, packing_relaxed)


def test_cli_writes_first_order_files(tmp_path, packing_system, packing_relaxed, packing_sensitivity):
    run = save_relaxation(tmp_path / "run", packing_system, packing_relaxed)
    result = cli("uncertainty", "--run", run, "--std", "diameter.B=0.005%", "--observable", "pressure")
    assert result.exit_code == 0, describe(result)
    assert result.stdout.splitlines()[-1] == str(run)
    assert "pressure" in result.stdout
    summary = json.loads((run / "uncertainty.json").read_text())
    assert summary["monte_carlo"] is None and summary["inputs"]["std"] == ["diameter.B=0.005%"]
    assert summary["parameters"]["diameter.B"]["std"] == pytest.approx(0.6 * 5e-5, rel=1e-15)
    with np.load(run / "uncertainty.npz") as data:
        dx = packing_sensitivity.parameters["diameter.B"].dx
        np.testing.assert_allclose(data["sigma"], np.linalg.norm(dx, axis=1) * 3e-5, rtol=1e-8)
        assert "mc_sigma" not in data.files
    assert (run / "uncertainty.png").read_bytes().startswith(PNG_MAGIC)
    assert not (run / "uncertainty-samples.png").exists()
    assert read_manifest(run).files["uncertainty.npz"].stage == "uncertainty"


# Checks of the arguments alone come first; each case after them builds the run's system (seconds).
@pytest.mark.parametrize(
    "args, needles",
    [
        ((), ["--std"]),
        (("--std", "diameter.B"), ["NAME=VALUE"]),
        (("--std", "diameter.B=-1"), [">= 0"]),
        (("--std", "diameter.B=1e-3x"), ["not a number"]),
        (("--std", "diameter.B=0.01", "--samples", "-1"), ["--samples"]),
        (("--cov", "missing.json"), ["no such file"]),
        (("--cov", "{ragged}"), ["same length"]),
        (("--std", "size=0.1"), ["unknown parameter"]),
        (("--std", "diameter.B=0.01", "--observable", "volume"), ["unknown observable"]),
        (("--std", "diameter.B=0.01", "--observable", "distance:0,128"), ["out of range"]),
        (("--cov", "{indefinite}"), ["positive semi-definite"]),
        (("--cov", "{unknown}", "--std", "diameter.A=0.01"), ["unknown parameter"]),
        (("--cov", "{ok}", "--std", "diameter.A=0.01"), ["twice"]),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, packing_run, args, needles):
    monkeypatch.chdir(tmp_path)
    files = {
        "ragged": ("diameter.A,diameter.B", "1e-4,2e-5", "3e-5"),
        "indefinite": ("diameter.A,diameter.B", "1e-4,3e-4", "3e-4,1e-4"),
        "unknown": ("diameter.A,size", "1e-4,0", "0,1e-4"),
        "ok": ("diameter.A,diameter.B", "1e-4,0", "0,1e-4"),
    }
    for name, rows in files.items():
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    args = [a.format(**{name: tmp_path / f"{name}.csv" for name in files}) for a in args]
    before = _snapshot(packing_run), _snapshot(tmp_path)
    assert_one_line_error(cli("uncertainty", "--run", packing_run, *args), *needles)
    assert (_snapshot(packing_run), _snapshot(tmp_path)) == before
