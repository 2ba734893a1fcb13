"""Checks of single recipe values: type, finiteness and range, each failure a one-line UserError.

Every recipe field passes one of these checks in :func:`mdsens.recipe.resolve`, before any array
is built, so a bad value (``nan``, ``inf``, a negative length, a count too large for memory, a
path as a run name) is refused in milliseconds with a message that names the key and the limit,
instead of surfacing later as an overflow, a NaN relaxation "converged" after 0 steps, or a file
written outside ``results/``. The limits are module constants, named in the messages.
"""

from __future__ import annotations

import math
from typing import Any

from mdsens.errors import UserError

MAX_PARTICLES = 10_000_000
"""Most particles a system may have: positions, forces and pair lists of 10⁷ particles already
take gigabytes."""
MAX_STEPS = 1_000_000_000
"""Most steps (or solver iterations) a recipe may ask for."""
SEED_LIMIT = 2**32
"""Seeds are integers in [0, SEED_LIMIT): what ``jax.random.PRNGKey`` and NumPy take as one word."""
SMALLEST, LARGEST = 1e-8, 1e8
"""Range of every positive physical value (lengths, energies, exponents, time steps, rattle):
beyond it, volumes and box sides computed from them overflow or underflow in float64."""
PACKING_FRACTIONS = (1e-6, 10.0)
"""Range of ``box.packing_fraction`` (soft spheres may be compressed beyond 1)."""
MAX_INDEX = 2**31 - 1
"""Largest magnitude of a frame or site index."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: Any, key: str, low: int, high: int, why: str = "") -> int:
    """An ``int`` (not a bool, not 2.0) in [low, high]; ``why`` explains the upper limit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"recipe key {key!r} must be an integer, got {_show(value)}")
    if value < low:
        raise UserError(f"recipe key {key!r} must be at least {low}, got {_show(value)}")
    if value > high:
        raise UserError(f"recipe key {key!r} must be at most {high}{why}, got {_show(value)}")
    return value


def real(
    value: Any, key: str, low: float, high: float, *, low_open: bool = False, infinite: bool = False
) -> float:
    """A finite number (an int or a float, not a bool) in [low, high] (or (low, high] when
    ``low_open``); ``infinite`` also admits +inf."""
    if not _is_number(value):
        raise UserError(f"recipe key {key!r} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float64
        raise UserError(f"recipe key {key!r} must be at most {high:g}, got {_show(value)}") from None
    if math.isnan(number) or (math.isinf(number) and not (infinite and number > 0)):
        raise UserError(f"recipe key {key!r} must be a finite number, got {_show(value)}")
    if math.isinf(number):
        return number
    if number < low or (low_open and number == low):
        bound = f"above {low:g}" if low_open else f"at least {low:g}"
        raise UserError(f"recipe key {key!r} must be {bound}, got {_show(value)}")
    if number > high:
        raise UserError(f"recipe key {key!r} must be at most {high:g}, got {_show(value)}")
    return number


def scale(value: Any, key: str, *, infinite: bool = False) -> float:
    """A positive physical value in [SMALLEST, LARGEST] (a length, energy, exponent, time step)."""
    if _is_number(value) and not math.isnan(value) and value <= 0:
        raise UserError(f"recipe key {key!r} must be positive, got {_show(value)}")
    return real(value, key, SMALLEST, LARGEST, infinite=infinite)


def tolerance(value: Any, key: str) -> float:
    """A positive finite tolerance (0 or inf would never stop, or always stop)."""
    return real(value, key, 0.0, math.inf, low_open=True)


def fraction(value: Any, key: str) -> float:
    """A fraction in (0, 1]."""
    return real(value, key, 0.0, 1.0, low_open=True)


def text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"recipe key {key!r} must be a string, got {_show(value)}")
    return value


def choice(value: Any, key: str, options) -> str:
    """One of ``options`` (strings)."""
    if not isinstance(value, str) or value not in options:
        raise UserError(f"unknown {key} {_show(value)}; known: {', '.join(options)}")
    return value


def run_name(value: Any) -> str:
    """A name, never a path: ``results/<name>`` must stay a folder directly inside ``results/``."""
    name = text(value, "name")
    if not name.strip():
        raise UserError("recipe key 'name' must not be empty (it names the run directory results/<name>)")
    if name in (".", "..") or "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(
            f"recipe key 'name' must be a plain name (no '/', '\\', '..' or control characters), got"
            f" {_show(name)}; give the run directory with --out instead"
        )
    return name
