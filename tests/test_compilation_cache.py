"""The persistent compilation cache, on by default (CPU included): a second command loads what the
first compiled, reaches bitwise the same relaxed state as a command without the cache, and does
not print jaxlib's spurious CPU-loader errors (jax issue 38445; see cli/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def _relax(out, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MDSENS_COMPILATION_CACHE": cache}
    env.pop("JAX_LOGGING_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", "mdsens.cli", "relax", "--set", "n_particles=16", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_cached_second_run_is_bitwise_the_uncached_one_and_quiet(tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for name, folder in (("first", str(cache)), ("second", str(cache)), ("uncached", "")):
        process = _relax(tmp_path / name, folder)
        assert process.returncode == 0, process.stderr
        for marker in ("cpu_aot_loader", "SIGILL", "Traceback"):
            assert marker not in process.stderr, process.stderr
        with np.load(tmp_path / name / "relaxed.npz") as data:
            runs[name] = data["positions"]
        if name == "first":
            entries = list(cache.rglob("*"))
            assert entries, "the first run wrote nothing into the cache"
    assert np.array_equal(runs["second"], runs["first"])
    assert np.array_equal(runs["second"], runs["uncached"])
