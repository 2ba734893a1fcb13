"""Predicted relaxed structures and energies at nearby parameters (mdsens.prediction), the files
they are written to, and ``mdsens predict``.

References: re-relaxations at the new parameters (the error must fall as Δθ² for positions and
Δθ³ for the second-order energy), closed forms (a Lennard-Jones dimer, whose relaxed energy is −ε
whatever σ, and a toy energy whose relaxed energy is an exact quadratic), and the forward
sensitivities of mdsens.sensitivity.
"""

from __future__ import annotations

import dataclasses
import json

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, cli, describe

from mdsens.errors import UserError
from mdsens.manifest import read_manifest
from mdsens.parameters import unit_tangent
from mdsens.prediction import parameter_step, predict, verify
from mdsens.prediction_files import save_prediction
from mdsens.relaxation import Relaxer
from mdsens.run import relaxed_state, save_relaxation
from mdsens.system import load_system
from mdsens.validity import validity_along

# Halving Δθ divides an error of order p by 2^p; the next order changes the ratio by a relative
# O(Δθ / the scale on which the expansion changes), the same ±12.5 % band for both orders.
POSITION_RATIO = (3.5, 4.5)  # 4 × (1 ± 0.125)
ENERGY_RATIO = (7.0, 9.0)  # 8 × (1 ± 0.125)


def _scaled(tree, factor):
    return jax.tree_util.tree_map(lambda leaf: factor * leaf, tree)


@pytest.fixture(scope="module")
def packing_steps(packing_system, packing_relaxed, packing_relaxer):
    """Predictions and verifications on the default packing for Δθ = h · (−1 along diameter.B),
    h = 4e-4, 2e-4, 1e-4, and the validity radius along that direction."""
    system, x, params = packing_system, packing_relaxed.positions, packing_system.params
    step = parameter_step(system, ["species.B.diameter=0.5996"])
    results = []
    for factor in (1.0, 0.5, 0.25):
        delta = _scaled(step.delta, factor)
        params1 = jax.tree_util.tree_map(lambda p, d: p + d, params, delta)
        prediction = predict(
            system, x, params, delta, names={"diameter.B": unit_tangent(system, "diameter.B")}
        )
        results.append((prediction, verify(system, x, params, params1, prediction, relaxer=packing_relaxer)))
    validity = validity_along(system, x, params, step.delta, results[0][0].dx)
    return step, results, validity


def test_parameter_step_is_the_difference_of_the_parameters(packing_steps, packing_system):
    step, _, _ = packing_steps
    assert step.changes == {"diameter.B": (0.6, 0.5996)}
    expected = _scaled(unit_tangent(packing_system, "diameter.B"), 0.5996 - 0.6)
    for got, want in zip(
        jax.tree_util.tree_leaves(step.delta), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-15)


def test_prediction_errors_fall_as_powers_of_the_step(packing_steps):
    """Position error ∝ Δθ², first-order energy error ∝ Δθ², second-order ∝ Δθ³, for steps well
    inside the validity radius (the largest is at most half of it), with no contact changing."""
    _, results, validity = packing_steps
    # The step is along θ down (Δθ < 0 along diameter.B): t > 0 along Δθ.
    assert validity.radius_up >= 2.0, validity
    for _, check in results:
        assert check.converged and check.contact_changes == 0 and not check.crossed
        # The prediction is far closer than the state it started from.
        assert check.position_error_max < 0.05 * check.baseline_error_max
    positions = [check.position_error_max for _, check in results]
    rms = [check.position_error_rms for _, check in results]
    first = [abs(check.energy_error_first) for _, check in results]
    second = [abs(check.energy_error_second) for _, check in results]
    for errors, (low, high) in ((positions, POSITION_RATIO), (rms, POSITION_RATIO), (first, POSITION_RATIO)):
        for big, small in zip(errors, errors[1:], strict=False):
            assert low <= big / small <= high, errors
    for big, small in zip(second, second[1:], strict=False):
        assert ENERGY_RATIO[0] <= big / small <= ENERGY_RATIO[1], second
    # Second order beats first order by orders of magnitude at these steps.
    assert all(s < 0.05 * f for s, f in zip(second, first, strict=True))


def test_predicted_displacement_is_the_sensitivity(packing_steps, packing_sensitivity):
    """dx along Δθ = Δθ_B · dx*/dθ_B of mdsens.sensitivity (one solve each, same answer)."""
    step, results, _ = packing_steps
    prediction = results[0][0]
    expected = step.changes["diameter.B"][1] - step.changes["diameter.B"][0]
    reference = expected * packing_sensitivity.parameters["diameter.B"].dx
    assert np.linalg.norm(prediction.dx - reference) <= 1e-8 * np.linalg.norm(reference)
    assert prediction.energy_by_name["diameter.B"] == pytest.approx(prediction.slope, rel=1e-12)
    denergy = packing_sensitivity.parameters["diameter.B"].denergy
    assert prediction.slope == pytest.approx(denergy * expected, rel=1e-10)


def test_files_written_elsewhere(packing_steps, packing_system, packing_relaxed, tmp_path):
    """--out DIR: predict.json and predicted.extxyz side by side, the JSON saying what the
    verification measured and the extxyz holding the predicted positions and θ₁."""
    step, results, validity = packing_steps
    prediction, check = results[0]
    paths = save_prediction(
        None,
        packing_system,
        packing_relaxed.positions,
        ["species.B.diameter=0.5996"],
        step,
        prediction,
        validity,
        [],
        check,
        out=tmp_path / "out",
    )
    assert sorted(p.name for p in paths) == ["predict.json", "predicted.extxyz"]
    summary = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert summary["state"] == relaxed_state(packing_system, packing_relaxed.positions)
    assert summary["verify"]["position_error_max"] == check.position_error_max
    assert summary["energy"]["second_order"] == prediction.energy_second
    assert summary["validity"]["radius_up"] == validity.radius_up and summary["validity"]["within"]
    atoms = ase.io.read(tmp_path / "out" / "predicted.extxyz")
    np.testing.assert_allclose(atoms.positions[:, :2], prediction.positions, atol=1e-8)
    np.testing.assert_allclose(atoms.arrays["predicted_displacement"][:, :2], prediction.dx, atol=1e-8)
    assert atoms.info["diameter.B"] == pytest.approx(0.5996)


@pytest.fixture(scope="module")
def dimer(tmp_path_factory):
    """A free Lennard-Jones dimer (σ = ε = 1, cutoff switch from 2σ) and its relaxed positions."""
    path = tmp_path_factory.mktemp("dimer") / "dimer.extxyz"
    ase.io.write(path, ase.Atoms("Ar2", positions=[[0, 0, 0], [1.3, 0.1, 0.05]], pbc=False))
    system = load_system(
        structure=path,
        potential="lennard_jones",
        overrides=[
            "potential.sigma=1.0",
            "potential.epsilon=1.0",
            "minimizer.dt_start=0.005",
            "minimizer.dt_max=0.02",
            "minimizer.fmax=1e-12",
        ],
    )
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    return system, relaxed.positions


def test_dimer_closed_form(dimer):
    """E*(σ, ε) = −ε and r* = 2^(1/6) σ exactly: the second-order energy is exact (its curvature
    0, though ∂²E/∂σ² at fixed positions is not: the relaxation term cancels it) and so is the
    first-order structure, even for a large step."""
    system, x = dimer
    step = parameter_step(system, ["potential.sigma=1.3", "potential.epsilon=0.7"])
    assert step.changes == {"sigma.Ar": (1.0, 1.3), "epsilon.Ar": (1.0, 0.7)}
    prediction = predict(system, x, system.params, step.delta)
    assert prediction.energy_first == pytest.approx(-0.7, abs=1e-11)
    assert prediction.energy_second == pytest.approx(-0.7, abs=1e-11)
    assert abs(prediction.curvature) < 1e-10
    fixed = jax.jvp(
        lambda s: jax.jvp(
            lambda u: system.energy_fn(jnp.asarray(x), _along(system.params, step.delta, u)), (s,), (1.0,)
        )[1],
        (0.0,),
        (1.0,),
    )[1]
    assert abs(float(fixed)) > 1.0  # without the relaxation term the curvature would be this
    bond = np.linalg.norm(prediction.positions[1] - prediction.positions[0])
    assert bond == pytest.approx(2 ** (1 / 6) * 1.3, rel=1e-10)


def _along(params, delta, s):
    return jax.tree_util.tree_map(lambda p, d: p + s * d, params, delta)


def test_quadratic_toy_closed_form(dimer):
    """E(x, θ) = ½k(r − aσ)² + ½qσ² + cσε relaxes to r* = aσ, E*(σ, ε) = ½qσ² + cσε: an exact
    quadratic, so the second-order energy is exact and E₁'s error is ½ d²E*/dt²."""
    system, _ = dimer
    k, a, q, c = 3.0, 1.7, 0.8, 0.3

    def energy(x, params):
        sigma, epsilon = params["sigma"][0], params["epsilon"][0]
        r = jnp.linalg.norm(x[1] - x[0])
        return 0.5 * k * (r - a * sigma) ** 2 + 0.5 * q * sigma**2 + c * sigma * epsilon

    toy = dataclasses.replace(system, energy_fn=energy)
    x = np.array([[0.2, -0.1, 0.3], [0.2 + a, -0.1, 0.3]])
    delta = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    delta = {**delta, "sigma": jnp.array([0.3]), "epsilon": jnp.array([-0.4])}
    prediction = predict(toy, x, system.params, delta)
    exact = 0.5 * q * 1.3**2 + c * 1.3 * 0.6
    curvature = q * 0.3**2 + 2 * c * 0.3 * (-0.4)
    assert prediction.curvature == pytest.approx(curvature, rel=1e-12)
    assert prediction.energy_second == pytest.approx(exact, rel=1e-12)
    assert prediction.energy_first - exact == pytest.approx(-0.5 * curvature, rel=1e-10)
    assert np.linalg.norm(prediction.positions[1] - prediction.positions[0]) == pytest.approx(
        a * 1.3, rel=1e-12
    )


def test_pair_value_set_anew_is_an_offset_from_mixing(packing_system):
    """pairs.A-B.diameter=0.81 on a system that mixes it (0.8): Δθ moves that pair value only."""
    step = parameter_step(packing_system, ["pairs.A-B.diameter=0.81"])
    assert step.changes == {"diameter.A-B": (pytest.approx(0.8), 0.81)}
    before = np.asarray(packing_system.pair_values()["diameter"])
    after = np.asarray(packing_system.pair_values(step.params)["diameter"])
    np.testing.assert_allclose(after, [[before[0, 0], 0.81], [0.81, before[1, 1]]], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("n_particles=64", "n_particles"),
        ("minimizer.fmax=1e-10", "minimizer.fmax"),
        ("box.packing_fraction=0.9", "box.packing_fraction"),
        ("species.B.fraction=0.4", "species.B.fraction"),
        ("species.B.diamter=0.6", "species.B.diamter"),
        ("species.B.diameter", "expected KEY=VALUE"),
        ("species.B.diameter=0.6", "changes no parameter"),
        ("species.B.diameter=-0.5", "diameter"),
    ],
)
def test_parameter_step_refuses_what_is_not_a_parameter_change(packing_system, override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        parameter_step(packing_system, [override])


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A relaxed 32-particle packing written as a run (all pairs: compiles fast)."""
    system = load_system("binary-packing", overrides=["n_particles=32"])
    relaxed = Relaxer(system).relax()
    relaxed.require_converged()
    return save_relaxation(tmp_path_factory.mktemp("runs") / "small", system, relaxed)


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_cli_predict_verify_writes_and_warns(small_run):
    """A step beyond the validity radius: the warning names it and the contacts, --verify
    reports the errors, and RUN/predict/ holds the files, listed in the manifest."""
    result = cli("predict", "--run", small_run, "--set", "species.B.diameter=0.62", "--verify")
    assert result.exit_code == 0, describe(result)
    assert "the validity radius; contacts" in result.stderr
    assert "position error" in result.stdout
    summary = json.loads((small_run / "predict" / "predict.json").read_text())
    assert summary["changes"]["diameter.B"]["delta"] == pytest.approx(0.02)
    assert summary["validity"]["within"] is False
    assert summary["validity"]["predicted_crossings"] >= 1
    check = summary["verify"]
    assert check["converged"] and check["contact_changes"] > 0  # the warning was right
    assert check["steps_saved"] == check["steps_from_relaxed"] - check["steps_from_prediction"]
    manifest = read_manifest(small_run)
    assert {"predict/predict.json", "predict/predicted.extxyz"} <= set(manifest.files)
    assert summary["state"] == manifest.state
    atoms = ase.io.read(small_run / "predict" / "predicted.extxyz")
    assert len(atoms) == 32
    assert atoms.info["diameter.B"] == pytest.approx(0.62)
    np.testing.assert_allclose(atoms.arrays["diameter"][atoms.arrays["type"] == 1], 0.62)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "species.B.diamter=0.62"], "species.B.diamter"),
        (["--set", "n_particles=64"], "potential parameters only"),
        (["--set", "species.B.diameter=abc"], "diameter"),
        (["--set", "species.B.diameter"], "expected KEY=VALUE"),
        ([], "--set"),
    ],
)
def test_cli_predict_bad_input(small_run, args, needle):
    before = _listing(small_run)
    manifest = (small_run / "manifest.json").read_text()
    assert_one_line_error(cli("predict", "--run", small_run, *args), needle)
    assert _listing(small_run) == before
    assert (small_run / "manifest.json").read_text() == manifest


def test_cli_predict_out_is_a_file(small_run, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(
        cli("predict", "--run", small_run, "--set", "species.B.diameter=0.61", "--out", target),
        "not a directory",
    )
    assert target.read_text() == "x"
