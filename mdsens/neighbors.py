"""Which pairs of particles interact: all of them (small systems) or a neighbour list (large ones).

Below :data:`AUTO_MIN_PARTICLES` particles mdsens sums over all N(N−1)/2 pairs: nothing to keep
up to date. From it on, in an orthorhombic periodic cell, the pairs come
from a JAX-MD cell-list neighbour list (``jax_md.partition``, ordered-sparse format: each pair
once, as two index arrays padded with N), so that memory and time per force evaluation grow as N,
not N². A recipe's ``[neighbors]`` table chooses (``mode = "auto" | "always" | "never"``).

A :class:`PairList` covers pairs closer than its ``cutoff``: the potential's interaction range
(the largest pair contact distance, or ``r_cutoff × σ`` for potentials with a cutoff) at the
recipe's parameters times ``1 + margin``, so that small parameter changes (finite differences,
sensitivities) do not leave it. A relaxation keeps one list for many steps: it includes pairs up
to ``cutoff + skin`` and is rebuilt when a particle has moved more than ``skin / 2`` since the
last build (JAX-MD's rule). A list has a fixed capacity; when a rebuild finds more pairs it sets
an overflow flag, and the caller allocates a larger one and redoes the work (it cannot be
reallocated inside ``jit``).

Free clusters and triclinic cells always use all pairs (JAX-MD's cell list needs an orthorhombic
box), and so does any cell not wider than three times ``cutoff + skin`` along every axis, or so
large for its particles that the cell list would need more than :data:`MEMORY_LIMIT` (64 atoms in
a 10⁶-wide cell: 10¹⁷ empty cells). A system whose all-pairs arrays would not fit either is
refused (:func:`use_pair_list`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.errors import UserError
from mdsens.jaxmd import partition

AUTO_MIN_PARTICLES = 64
"""``mode = "auto"`` uses a neighbour list from this many particles on. Measured on two CPU
cores (``benchmarks/neighbors.py``): a force evaluation over all pairs costs 4× the list's at
N = 64 and 100× at N = 1024."""
MODES = ("auto", "always", "never")
DEFAULTS = {"mode": "auto", "skin": 0.3, "margin": 0.1, "capacity": 1.5}
"""``margin`` is a fraction of the interaction range, ``skin`` a fraction of the list's cutoff;
``capacity`` multiplies the number of pairs found when a list is allocated."""
MEMORY_LIMIT = 2**31
"""Bytes that a cell list's cells, or the (N, N) arrays of all pairs, may take (2 GiB): checked
before allocating, since JAX-MD sizes its cell list by the cell's volume, however empty."""


def overflowed(neighbors: partition.NeighborList) -> jax.Array:
    """Whether a list (or the cell list behind it) ran out of room since it was allocated."""
    return neighbors.did_buffer_overflow != 0


def host_overflowed(neighbors: partition.NeighborList) -> bool:
    """:func:`overflowed` of a computed list, in NumPy (no JAX dispatch outside ``jit``)."""
    codes = partition.PEC.NEIGHBOR_LIST_OVERFLOW | partition.PEC.CELL_LIST_OVERFLOW
    return bool(int(np.asarray(neighbors.error.code)) & int(codes))


@dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jax.jit
class PairList:
    """Neighbour-list functions for one system shape and cutoff.

    Attributes:
        cutoff: pairs closer than this are always in the list.
        skin: extra distance kept in a relaxation's list, so it survives moves below ``skin / 2``.
        capacity: allocation headroom (multiplies the number of pairs found).
        n_particles: N (the padding index of unused slots).
        box: the cell's side lengths; positions are wrapped into it, where a cell list needs them.
    """

    cutoff: float
    skin: float
    capacity: float
    n_particles: int
    box: np.ndarray
    _skinned: partition.NeighborListFns
    _exact: partition.NeighborListFns
    _template: partition.NeighborList
    _displacement: Callable

    def sized_at(self, x) -> bool:
        """Whether the list was sized at positions ``x`` (then :meth:`at` has room there)."""
        return bool(np.array_equal(_host_wrap(x, self.box), np.asarray(self._template.reference_position)))

    def at_positions_pairs(self) -> np.ndarray:
        """(2, P) the pairs i, j closer than :attr:`cutoff` at the positions the list was sized
        at (:meth:`sized_at`), without padding."""
        idx = np.asarray(self._template.idx)
        return idx[:, idx[0] < self.n_particles]

    def at_jit(self, x) -> partition.NeighborList:
        """:meth:`at`, compiled once per list (for checks outside ``jit``)."""
        return _list_at(self, x)

    def allocate(self, x) -> partition.NeighborList:
        """A list with skin for a relaxation starting at ``x`` (not jittable: sizes the buffers)."""
        return self._allocate(self._skinned, self.cutoff + self.skin, x)

    def _allocate(
        self, fns: partition.NeighborListFns, reach: float, x, extra: int = 0
    ) -> partition.NeighborList:
        return _allocate(self.box, self.capacity, self._displacement, fns, reach, x, extra)

    def _wrap(self, x):
        return jnp.mod(jnp.asarray(x), self.box)

    def grow(self, x, neighbors: partition.NeighborList) -> partition.NeighborList:
        """A list for ``x`` with room for at least 1.5 × the pairs ``neighbors`` could hold
        (after an overflow; not jittable)."""
        extra = int(np.ceil(0.5 * neighbors.max_occupancy / self.n_particles))
        return self._allocate(self._skinned, self.cutoff + self.skin, x, extra)

    def update(self, x, neighbors: partition.NeighborList) -> partition.NeighborList:
        """The list at ``x``: the same one if no particle moved by ``skin / 2``, else rebuilt."""
        return self._skinned.update(self._wrap(x), neighbors)

    def stale(self, x, neighbors: partition.NeighborList) -> jax.Array:
        """Whether :meth:`update` would rebuild the list at ``x`` (some particle moved by
        ``skin / 2`` since it was built): JAX-MD's own test, for callers that decide once for
        a batch of lists (under ``vmap`` a rebuild that one list needs is computed for all)."""
        moved = jax.vmap(self._displacement)(self._wrap(x), neighbors.reference_position)
        return jnp.any(jnp.sum(moved**2, axis=-1) > (self.skin / 2) ** 2)

    def at(self, x) -> partition.NeighborList:
        """A list built from scratch at ``x`` with no skin (jittable; capacity fixed at build).

        Used by the self-contained energy E(x, θ): within a linearisation (Hessian-vector
        products at a relaxed state) it is built once.
        """
        x = self._wrap(jax.lax.stop_gradient(x))
        return self._exact.update(x, replace(self._template, reference_position=x))


_list_at = jax.jit(PairList.at, static_argnums=0)
_rebuild = jax.jit(lambda fns, x, neighbors: fns.update(x, neighbors), static_argnums=0)
_BUILDERS: dict[tuple, tuple] = {}
"""Allocation lists by box, reach and capacity, shared by the systems of one cell (an ensemble's
sweep points, a design's trials), so that they share one compiled rebuild."""


def _builder(box, capacity, displacement, reach: float):
    """A list of ``reach`` in the cell ``box`` that always rebuilds (no skin test), and its cell
    list, made once per cell, reach and capacity (an orthorhombic periodic cell: one
    displacement serves every system in it)."""
    key = (box.tobytes(), float(reach), float(capacity))
    if key not in _BUILDERS:
        if len(_BUILDERS) >= 16:
            _BUILDERS.pop(next(iter(_BUILDERS)))
        always = partition.neighbor_list(
            displacement,
            jnp.asarray(box),
            reach,
            dr_threshold=0.0,
            format=partition.OrderedSparse,
            capacity_multiplier=capacity,
            fractional_coordinates=False,
        )
        # JAX-MD's allocation makes its cell list from the box in float32.
        cells = partition.cell_list(np.asarray(box, dtype=np.float32), reach, capacity)
        _BUILDERS[key] = (always, cells)
    return _BUILDERS[key]


def build_pair_list(displacement, box: np.ndarray, cutoff: float, settings: dict, x0) -> PairList:
    """Neighbour-list functions for an orthorhombic periodic ``box`` (side lengths) and ``cutoff``."""
    skin = settings["skin"] * cutoff
    kwargs = dict(
        format=partition.OrderedSparse,
        capacity_multiplier=settings["capacity"],
        fractional_coordinates=False,
    )
    skinned = partition.neighbor_list(displacement, jnp.asarray(box), cutoff, dr_threshold=skin, **kwargs)
    exact = partition.neighbor_list(displacement, jnp.asarray(box), cutoff, dr_threshold=0.0, **kwargs)
    box = np.asarray(box, dtype=np.float64)
    template = _allocate(box, settings["capacity"], displacement, exact, cutoff, x0)
    return PairList(
        cutoff, skin, settings["capacity"], int(np.shape(x0)[0]), box, skinned, exact, template, displacement
    )


def _allocate(box, capacity, displacement, fns, reach: float, x, extra: int = 0) -> partition.NeighborList:
    """What ``fns.allocate(x, extra_capacity=extra)`` returns, in one compiled call.

    JAX-MD's allocation runs eagerly, one operation at a time (about 40 dispatches, each
    traced, lowered and looked up in the compilation cache: 0.2-0.4 s per list in a fresh
    process). The two numbers it needs from the data are computed here instead: the fullest
    cell (NumPy, JAX-MD's own cell dimensions) and the number of pairs (from one rebuild at
    full length, compiled once per list and cell capacity); the rebuild is JAX-MD's own.
    """
    always, cells = _builder(box, capacity, displacement, reach)
    x = _host_wrap(x, box)
    n = x.shape[0]
    cell_capacity = int(_fullest_cell(x, box, reach) * capacity) + extra
    template = partition.NeighborList(
        np.zeros((2, 1), np.int32),
        x,
        partition.PartitionError(np.zeros((), np.uint8)),
        cell_capacity,
        2**62,
        partition.OrderedSparse,
        reach,
        cells,
        always.update,
    )
    built = _rebuild(always, x, template)
    idx = np.asarray(built.idx)
    # Pairs fill the front of the rebuilt array; its last slot may hold a discarded entry.
    pairs = int(np.count_nonzero(idx[0, :-1] < n))
    if host_overflowed(built) or pairs >= idx.shape[1] - 1:
        return fns.allocate(x, extra_capacity=extra)  # not expected: JAX-MD's own way
    occupancy = min(int(pairs * capacity + n * extra), idx.shape[1], n * (n - 1) // 2)
    return replace(built, idx=jnp.asarray(idx[:, :occupancy]), max_occupancy=occupancy, update_fn=fns.update)


def _host_wrap(x, box: np.ndarray) -> np.ndarray:
    """Positions wrapped into the box in NumPy: :meth:`PairList._wrap`'s values (NumPy's remainder
    is jnp.mod's: fmod, then + box where the signs differ) without a JAX dispatch."""
    return np.mod(np.asarray(x, dtype=np.float64), box)


def _fullest_cell(x: np.ndarray, box: np.ndarray, reach: float) -> int:
    """The most particles in one cell of JAX-MD's cell list for ``reach`` at wrapped positions
    ``x``, as its allocation counts them (its cell dimensions, from the box in float32)."""
    box32 = np.reshape(np.asarray(box, dtype=np.float32), (1, -1))
    _, size, per_side, _ = partition._cell_dimensions(x.shape[1], box32, reach)
    _, size, per_side, _ = partition._cell_dimensions(x.shape[1], box32, size)
    cells = np.mod((x / size).astype(np.int32), per_side)
    return int(np.unique(cells, axis=0, return_counts=True)[1].max())


def cell_list_bytes(box: np.ndarray, cutoff: float, capacity: float, x) -> float:
    """Memory that JAX-MD's cell list for ``cutoff`` takes at positions ``x``: one slot per
    particle a cell can hold (the fullest cell's count × ``capacity``) in every cell, each slot a
    position and an index. A float: it may exceed any integer type."""
    box = np.asarray(box, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    per_side = np.floor(box / cutoff)
    cells = np.floor(np.mod(x, box) / (box / per_side)).astype(np.int64)
    cells = np.mod(cells, per_side.astype(np.int64))  # as JAX-MD does, for x on the far edge
    fullest = np.unique(cells, axis=0, return_counts=True)[1].max()
    return float(np.prod(per_side)) * int(fullest * capacity) * (x.shape[1] + 1) * 8


def all_pairs_bytes(n_particles: int, dimension: int) -> float:
    """Memory of the (N, N) distance and (N, N, d) displacement arrays of an all-pairs sum."""
    return float(n_particles) ** 2 * (dimension + 1) * 8


def cell_list_problem(settings: dict, x, space_kind: str, box: np.ndarray, reach: float) -> str | None:
    """Why no cell list can serve a system whose interaction range is ``reach`` (``None``: one can)."""
    cutoff = reach * (1 + settings["margin"])
    if not possible_pair_list(space_kind, box, cutoff * (1 + settings["skin"])):
        return (
            "needs an orthorhombic periodic cell at least three list cutoffs"
            f" ({cutoff * (1 + settings['skin']):.3g}) wide"
        )
    need = cell_list_bytes(box, cutoff, settings["capacity"], x)
    if need > MEMORY_LIMIT:
        return (
            f"would need {need / 2**30:.3g} GiB in this cell, above mdsens.neighbors.MEMORY_LIMIT ="
            f" {MEMORY_LIMIT / 2**30:g} GiB (a cell this large for its particles is mostly empty)"
        )
    return None


def use_pair_list(settings: dict, x, space_kind: str, box: np.ndarray, reach: float) -> bool:
    """Whether a system with positions ``x`` (N, d) whose interaction range is ``reach`` gets a
    neighbour list (see the module docstring).

    Raises:
        UserError: ``mode = "always"`` where no cell list fits, or all pairs where their arrays
            would take more than :data:`MEMORY_LIMIT`.
    """
    n, d = np.shape(x)
    if settings["mode"] != "never":
        problem = cell_list_problem(settings, x, space_kind, box, reach)
        if problem is None and (settings["mode"] == "always" or n >= AUTO_MIN_PARTICLES):
            return True
        if settings["mode"] == "always":
            raise UserError(f"neighbors.mode = always: a cell list {problem}; use neighbors.mode = auto")
    need = all_pairs_bytes(n, d)
    if need > MEMORY_LIMIT:
        raise UserError(
            f"{n} particles summed over all pairs would need {need / 2**30:.3g} GiB, above"
            f" mdsens.neighbors.MEMORY_LIMIT = {MEMORY_LIMIT / 2**30:g} GiB; use an orthorhombic"
            " periodic cell of normal density with neighbors.mode = auto (a neighbour list)"
        )
    return False


def possible_pair_list(space_kind: str, box: np.ndarray, reach: float) -> bool:
    """A cell list needs an orthorhombic periodic cell wider than three ``reach`` (the list's
    cutoff plus skin) along every axis."""
    return space_kind == "periodic" and bool(np.isfinite(reach)) and bool(np.all(box > 3 * reach))
