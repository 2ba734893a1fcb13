"""The objectives of :func:`mdsens.design.design`: scalar losses L(x, θ) of a relaxed structure x
and the parameters θ, traceable by JAX so that the design's implicit gradient can differentiate
them.

* :func:`target_loss`: the distance to a target structure (``--target``);
* :func:`observable_loss` and :func:`parse_target_observable`: observables' relative misfits
  (``--target-observable NAME=VALUE``);
* :func:`user_loss`: a function of the user's file (``--loss FILE.py:FUNCTION``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import UserError
from mdsens.observables import Observable, parse_observable, user_observable
from mdsens.system import System

Loss = Callable[[jax.Array, dict], jax.Array]


def target_loss(system: System, target: np.ndarray) -> Loss:
    """Mean squared minimum-image displacement of x*(θ) from ``target`` over the non-rattlers,
    after removing the rigid translation (and, for a free cluster, the best rotation: Kabsch).

    Rattlers are those of x*(θ) at each evaluation; their positions are not determined. The
    translation and rotation are minimisers of the same squared distance, so their own
    derivatives do not enter the gradient (envelope theorem): they are held fixed in it.
    """
    target = jnp.asarray(target, dtype=jnp.float64)
    free = system.space_kind == "free"

    def loss(x, params):
        keep = ~jax.lax.stop_gradient(system.rattlers(x, params))
        weight = keep.astype(x.dtype)[:, None]
        count = jnp.maximum(jnp.sum(weight), 1.0)
        d = jax.vmap(system.displacement)(x, target)  # x - target, minimum image
        shift = jax.lax.stop_gradient(jnp.sum(weight * d, axis=0) / count)
        d = d - shift
        if free:
            # Kabsch: the rotation R minimising Σ|a_i − R b_i|² over centred x (a) and target (b).
            a = x - jnp.sum(weight * x, axis=0) / count
            b = target - jnp.sum(weight * target, axis=0) / count
            u, _, vt = jnp.linalg.svd(jax.lax.stop_gradient((weight * b).T @ a))
            v = vt.T
            flip = jnp.sign(jnp.linalg.det(v @ u.T))
            rotation = jax.lax.stop_gradient(v.at[:, -1].multiply(flip) @ u.T)
            d = a - b @ rotation.T
        return jnp.sum(weight * d**2) / count

    return loss


def observable_loss(targets: Sequence[tuple[Observable, float]]) -> Loss:
    """Σ (q(x, θ)/q_target − 1)² over the targets: each observable's squared relative misfit."""

    def loss(x, params):
        return sum((o(x, params) / value - 1.0) ** 2 for o, value in targets)

    return loss


def parse_target_observable(system: System, spec: str) -> tuple[Observable, float]:
    """``NAME=VALUE`` (``pressure=0.05``) → (observable, value).

    Raises:
        UserError: no ``=``, an unknown observable, or a value that is not a nonzero number.
    """
    name, equals, text = spec.rpartition("=")
    if not equals or not name.strip():
        raise UserError(f"--target-observable {spec!r}: give NAME=VALUE (pressure=0.05)")
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--target-observable {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value == 0:
        raise UserError(
            f"--target-observable {spec!r}: the target must be finite and nonzero (relative misfit)"
        )
    return parse_observable(system, name), value


def user_loss(system: System, spec: str) -> Loss:
    """``FILE.py:FUNCTION``, a JAX scalar ``FUNCTION(positions, system, params)``, checked when
    loaded (see :func:`mdsens.observables.user_observable`).

    Raises:
        UserError: no such file or function, or it raises, does not return one real number, or
            cannot be differentiated.
    """
    if ":" not in spec:
        raise UserError(f"--loss {spec!r}: give FILE.py:FUNCTION")
    try:
        return user_observable(system, spec).fn
    except UserError as error:
        raise UserError(f"--loss: {error}") from None
