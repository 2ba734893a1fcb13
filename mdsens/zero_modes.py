"""The null space of implicit differentiation: the Hessian's zero modes at a relaxed state.

The energy does not change under rigid translations (and, in free space, rotations) of the
particles, nor under moves of rattlers, which touch nothing; x*(θ) is defined only up to these
motions, so every derivative is taken orthogonal to them (:class:`mdsens.implicit.NullSpace`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from mdsens.contacts import rattlers
from mdsens.implicit import NullSpace

if TYPE_CHECKING:
    from mdsens.system import System


def rigid_motion_names(system: System) -> list[str]:
    """Names of the rigid motions the energy is invariant under (removed from derivatives)."""
    axes = "xyz"[: system.dimension]
    modes = [f"translation.{a}" for a in axes]
    if system.space_kind == "free":
        modes += ["rotation.z"] if system.dimension == 2 else [f"rotation.{a}" for a in axes]
    return modes


def nullspace(system: System, x, params) -> NullSpace:
    """The Hessian's zero modes at ``x``, removed from every derivative.

    Rigid translations (and rotations about the centroid in free space) of the particles that
    are not rattlers, and every degree of freedom of the rattlers. Fixed shapes under ``jit``.
    """
    n, d = x.shape
    rattler = rattlers(system, x, params)
    keep = (~rattler).astype(x.dtype)[:, None]
    vectors = [jnp.zeros((n, d)).at[:, a].set(1.0) * keep for a in range(d)]
    if system.space_kind == "free":
        centre = jnp.sum(x * keep, axis=0) / jnp.maximum(jnp.sum(keep), 1.0)
        r = (x - centre) * keep
        if d == 2:
            vectors.append(jnp.stack([-r[:, 1], r[:, 0]], axis=1))
        else:
            for axis in jnp.eye(3):
                vectors.append(jnp.cross(axis, r))
    basis = jnp.stack([v.ravel() for v in vectors], axis=1)
    q, r_factor = jnp.linalg.qr(basis)
    # A rigid motion with no particle left to move (all rattlers) contributes a zero column.
    q = q * (jnp.abs(jnp.diag(r_factor)) > 1e-10)
    mask = jnp.repeat(rattler, d).astype(x.dtype)
    return NullSpace(q, mask)
