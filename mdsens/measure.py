"""Wall time and XLA's memory accounting of compiled calls: what `mdsens check`, the paper
experiment and the benchmarks report, measured one way."""

from __future__ import annotations

import math
import time

import jax


def compiled_memory(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled computation (XLA's own plan: nothing runs),
    or ``None`` on a backend without memory accounting."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory accounting reports none
        return None
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def peak_memory(fn, *args) -> int | None:
    """:func:`compiled_memory` of ``jax.jit(fn)`` for these arguments (compiled, not run); ``None``
    where it cannot be measured."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception:  # noqa: BLE001 - memory is reported where it can be measured, not required
        return None
    return compiled_memory(compiled)


def best_time(fn, repeats: int = 3):
    """(result, seconds) of the fastest of ``repeats`` calls of ``fn()``, waiting for the device."""
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best
