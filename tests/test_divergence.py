"""A relaxation that diverges stops early and says so; a non-finite state is never converged; a
bad force tolerance cannot loop forever; x*(θ) of an unconverged relaxation fails loudly; Ctrl-C
stops a long relaxation promptly."""

from __future__ import annotations

import copy
import dataclasses
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens.relaxation
from mdsens.errors import NotConvergedError, UserError
from mdsens.relaxation import CHUNK_STEPS, Relaxer
from mdsens.sensitivity import relaxed_positions_fn
from mdsens.system import System, load_system

SMALL_PACKING = ["n_particles=32"]


def with_minimizer(system: System, **settings) -> System:
    """``system`` with minimiser settings that recipe validation would refuse (it is bypassed:
    the engine must cope on its own)."""
    recipe = copy.deepcopy(system.recipe)
    recipe["minimizer"].update(settings)
    return dataclasses.replace(system, recipe=recipe)


@pytest.fixture(scope="module")
def packing() -> System:
    return load_system("binary-packing", overrides=SMALL_PACKING)


@pytest.fixture(scope="module")
def crystal() -> System:
    return load_system("lj-fcc-vacancy", overrides=["rattle=0.01"])


@pytest.mark.parametrize(
    "case, settings, within, why",
    [
        # The LJ wall makes a large step blow up within a few steps: the energy explodes.
        ("crystal", {"dt_start": 0.1, "dt_max": 0.5}, 2 * CHUNK_STEPS, "energy rose"),
        # Harmonic soft spheres stay bounded but never settle: the energy stays above the start.
        ("packing", {"dt_start": 5.0, "dt_max": 50.0}, 20 * CHUNK_STEPS, "energy rose"),
        # A NaN step makes every position NaN after one step.
        ("packing", {"dt_start": float("nan")}, CHUNK_STEPS, "non-finite"),
    ],
    ids=["lj-large-dt", "soft-huge-dt", "nan-dt"],
)
def test_a_diverging_relaxation_stops_early_and_says_so(request, case, settings, within, why):
    system = with_minimizer(request.getfixturevalue(case), **settings)
    result = Relaxer(system).relax()
    assert result.diverged and not result.converged
    assert result.steps <= within < system.recipe["minimizer"]["max_steps"]
    assert result.reason.startswith(f"diverged after {result.steps} steps") and why in result.reason
    with pytest.raises(NotConvergedError, match="diverged"):
        result.require_converged()


def test_a_stable_relaxation_is_not_diverged(packing):
    result = Relaxer(packing).relax()
    assert result.converged and not result.diverged
    assert result.reason.startswith("converged")
    capped = Relaxer(packing).relax(max_steps=3)
    assert not capped.converged and not capped.diverged
    assert capped.reason.startswith("not converged") and "after 3 steps" in capped.reason


@pytest.mark.parametrize("fmax", [float("nan"), float("inf"), 0.0, -1e-12])
def test_a_force_tolerance_that_no_state_can_honestly_meet_is_refused(packing, fmax):
    with pytest.raises(UserError, match="fmax"):
        Relaxer(packing, fmax=fmax)
    with pytest.raises(UserError, match="fmax"):
        Relaxer(packing).relax(fmax=fmax)
    with pytest.raises(UserError, match="fmax"):
        Relaxer(with_minimizer(packing, fmax=fmax))


def _alarm(signum, frame):
    raise TimeoutError("the relaxation did not return")


def test_a_nan_fmax_past_validation_ends_unconverged_instead_of_looping(packing, monkeypatch):
    """Were the tolerance check bypassed, the loop still ends: NaN > fmax is False, so the
    compiled loop stops at once, and the chunk loop stops with it."""
    monkeypatch.setattr(mdsens.relaxation, "check_tolerances", lambda fmax, max_steps: None)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(120)
    try:
        result = Relaxer(packing).relax(fmax=float("nan"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not result.converged and result.steps == 0
    assert result.reason.startswith("not converged")


@pytest.mark.parametrize("mode", ["value", "jvp", "grad"])
def test_relaxed_positions_of_an_unconverged_relaxation_fail_loudly(packing, mode):
    """With a step cap too small, x*(θ) and its derivatives raise instead of differentiating a
    state that is not relaxed (before: a gradient of exactly 0 at 20 steps)."""
    relaxer = Relaxer(packing, max_steps=20)
    x_star = relaxed_positions_fn(packing, relaxer)
    c = jnp.asarray(np.random.default_rng(0).normal(size=packing.positions.shape))
    calls = {
        "value": lambda: x_star(packing.params),
        "jvp": lambda: jax.jvp(x_star, (packing.params,), (packing.params,)),
        "grad": lambda: jax.grad(lambda p: jnp.sum(c * x_star(p)))(packing.params),
    }
    with pytest.raises(Exception, match="did not converge") as caught:  # noqa: B017  (JAX's runtime error type)
        jax.block_until_ready(calls[mode]())
    assert "20 of 20 steps" in str(caught.value)


def test_relaxed_positions_of_a_converged_relaxation_are_finite(packing):
    x_star = relaxed_positions_fn(packing)
    x = np.asarray(x_star(packing.params))
    assert np.all(np.isfinite(x))


INTERRUPTED = """
import sys
from pathlib import Path
import mdsens
from mdsens.relaxation import Relaxer
from mdsens.system import load_system

system = load_system("binary-packing", overrides=["n_particles={n}", "minimizer.fmax=1e-14"])
def progress(steps, force):
    print("step", steps, flush=True)
result = Relaxer(system).relax(progress=progress)
Path(sys.argv[1]).write_text("relaxed")  # what writing the run stands for
"""


@pytest.mark.slow
def test_ctrl_c_stops_a_long_relaxation_promptly(tmp_path):
    """SIGINT while a 10 000-particle packing relaxes: the process ends within seconds (before:
    only after a 1000-step chunk, tens of seconds here) and writes nothing. Python sees a signal
    only between compiled calls, so the chunks must be short and nothing in them call back."""
    marker = tmp_path / "written"
    script = textwrap.dedent(INTERRUPTED.format(n=10_000))
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stdout.readline()  # the first chunk ran: compiled and stepping
        assert first.startswith("step"), process.stderr.read()
        process.send_signal(signal.SIGINT)
        sent = time.perf_counter()
        _, stderr = process.communicate(timeout=120)
        elapsed = time.perf_counter() - sent
    finally:
        process.kill()
        process.wait()
    assert "KeyboardInterrupt" in stderr
    assert process.returncode != 0
    assert elapsed < 10.0
    assert not marker.exists()
