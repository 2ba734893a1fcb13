"""Ensembles: the same recipe relaxed and differentiated over many seeds and swept recipe values.

A member is one seed at one sweep point (a value for every ``--sweep`` key; several sweeps give
their product). :func:`ensemble` plans the members, runs them in batches
(:mod:`mdsens.ensemble_batch`: relaxed and differentiated together under ``jax.vmap``, the member
axis sharded over the local devices), writes each finished member's file at once and the table
and statistics at the end (:mod:`mdsens.ensemble_files`).

Members batch together when they share a system shape and cell: the seeds of one sweep point
always do; different sweep points do when the swept value changes θ alone (``species.B.diameter``
with a fixed ``box.side``); a swept value that changes the cell (``box.packing_fraction``, or a
diameter with a fixed packing fraction, which sizes the box) gives each point its own batches and
compilation. A sweep that changes the members' shape (N, d) is refused.

Under ``jax.distributed`` (one process per host or GPU, see docs/ensembles.md) each process takes
every ``process_count``-th member of each batch group and writes its members' files into the run
directory (which all processes must see: a shared file system); process 0 waits for all and
writes the table.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from mdsens import ensemble_files as files
from mdsens.ensemble_batch import BatchEngine, MemberOutcome, local_mesh, scalar_names
from mdsens.errors import UserError
from mdsens.observables import parse_observable
from mdsens.parameters import expand_parameters
from mdsens.run_lock import run_lock
from mdsens.run_paths import RESULTS, check_target, safe_name
from mdsens.structures import generate
from mdsens.system import System, load_system

MEMORY_BUDGET = 2 * 2**30
"""Bytes a batch may take where the device does not say how much memory it has (CPU)."""
BYTES_PER_COORDINATE = 8 * 200
"""Estimated bytes per member per coordinate (N × d) of a batch: the minimiser's state, the
linear solves' Krylov vectors, dx*/dθ and the pair list, with room to spare."""
CPU_MEMBERS_PER_DEVICE = 8
"""Members per CPU device in a batch. The batch's derivatives are solved together (for 64
members of the 128-particle packing on two devices: 0.22 s in batches of 16, 0.26 s in batches of
8, 0.56 s in batches of 2); its relaxation runs in groups of
:data:`mdsens.ensemble_batch.CPU_RELAX_GROUP` members per device."""


def one_device_per_core() -> None:
    """Make JAX show one CPU device per core, so that a batch's members spread over the cores.

    Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` unless it is set already.
    Call it before anything starts JAX's backend (after that it has no effect); accelerators
    are not affected.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores or 1}".strip()


@dataclass(frozen=True)
class Member:
    """One member: its index in the table, seed, swept values and resolved recipe."""

    index: int
    seed: int
    point: tuple[tuple[str, float], ...]
    recipe: dict = field(repr=False)


@dataclass(frozen=True)
class EnsembleResult:
    """An ensemble's table, arrays and statistics.

    Attributes:
        columns: the table's columns, in order.
        rows: one dict per member (``member``, ``seed``, the swept keys, ``converged``,
            ``path``, ``reason``, then the numbers of :func:`mdsens.ensemble_batch.scalar_names`).
        arrays: stacked over members: ``positions`` and ``dx/<param>``, shape (M, N, d).
        statistics: one entry per sweep point: its values, member counts and per number the
            mean, standard deviation and standard error over its converged members.
        failed: ``{"member", "seed", "reason"}`` of every member that did not converge.
        computed: members computed by this call (the others came from files, ``resume``).
        run: the run directory written (``None`` on processes other than 0).
        wall_time: seconds.
    """

    columns: list[str]
    rows: list[dict]
    arrays: dict[str, np.ndarray]
    statistics: list[dict]
    failed: list[dict]
    computed: int
    run: Path | None
    wall_time: float

    def column(self, name: str) -> np.ndarray:
        """One column over all members as an array."""
        return np.asarray([row.get(name) for row in self.rows])


def parse_seeds(text: str) -> list[int]:
    """``START:STOP`` (Python's range, STOP excluded), ``START:STOP:STEP`` or ``S1,S2,...``.

    Raises:
        UserError: malformed, negative, repeated, or no seed at all.
    """
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                raise ValueError
            seeds = list(range(*parts))
        else:
            seeds = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(
            f"bad --seeds {text!r}: expected START:STOP, START:STOP:STEP or a list 1,2,5"
        ) from None
    if not seeds:
        raise UserError(f"--seeds {text!r} is empty: STOP must exceed START (e.g. 0:64)")
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: seeds must be distinct and non-negative")
    return seeds


def parse_sweep(text: str) -> tuple[str, list[int | float]]:
    """``KEY=V1,V2,...`` or ``KEY=START:STOP:COUNT`` (COUNT values, both ends included).

    Raises:
        UserError: malformed (no ``=``, an empty or non-numeric value, a count below 2).
    """
    key, sep, values = str(text).partition("=")
    key = key.strip()
    hint = "expected KEY=V1,V2,... or KEY=START:STOP:COUNT, e.g. species.B.diameter=0.55,0.6,0.65"
    if not sep or not key or not values.strip():
        raise UserError(f"bad --sweep {text!r}: {hint}")
    try:
        if ":" in values:
            start, stop, count = values.split(":")
            count = int(count)
            if count < 2:
                raise ValueError
            out = [float(v) for v in np.linspace(float(start), float(stop), count)]
        else:
            # Integers stay integers: integer recipe fields (n_particles) refuse 8.0.
            out = [int(v) if v.strip().lstrip("+-").isdigit() else float(v) for v in values.split(",")]
        if not all(np.isfinite(out)):
            raise ValueError
    except ValueError:
        raise UserError(f"bad --sweep {text!r}: {hint}") from None
    if len(set(out)) != len(out):
        raise UserError(f"--sweep {text!r} repeats a value")
    return key, out


def _points(sweeps: list[str]) -> list[tuple[tuple[str, float], ...]]:
    parsed = [parse_sweep(s) for s in sweeps]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise UserError(f"--sweep names {keys[0]!r} twice: give all its values in one --sweep")
    return [tuple(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in parsed))]


def _overrides(point) -> list[str]:
    return [f"{key}={value!r}" for key, value in point]


def member_positions(system: System, seed: int) -> np.ndarray:
    """The initial positions ``load_system(..., seed=seed)`` gives at ``system``'s recipe,
    without building a system (which compiles its checks)."""
    recipe = {**system.recipe, "seed": seed}
    if "structure" in recipe:
        positions = np.asarray(system.atoms.positions[:, : system.dimension], dtype=np.float64)
    else:
        positions = np.array(generate(recipe).positions[:, : system.dimension], dtype=np.float64)
    if recipe["rattle"] > 0:
        rng = np.random.default_rng(seed)
        positions = positions + rng.normal(scale=recipe["rattle"], size=positions.shape)
    return positions


def _group_key(system: System) -> str:
    """Systems with equal keys batch together: same shape, cell, species, methods; θ may differ."""
    recipe = {k: v for k, v in system.recipe.items() if k not in ("seed", "description", "species", "pairs")}
    recipe["potential"] = {
        k: v for k, v in recipe["potential"].items() if k in system.potential.settings or k == "name"
    }
    return json.dumps(
        {
            "recipe": recipe,
            "cell": system.cell.tolist(),
            "types": system.types.tolist(),
            "species": list(system.species),
            "overridden": {k: v.tolist() for k, v in system.overridden.items()},
        },
        sort_keys=True,
        default=str,
    )


def batch_size(n_members: int, system: System, devices: int, asked: int | None) -> int:
    """Members per batch: ``asked``; on CPU :data:`CPU_MEMBERS_PER_DEVICE` per device; else as many
    as fit :data:`MEMORY_BUDGET` (or a quarter of the device's memory where it says). A multiple
    of ``devices``."""
    if asked is not None:
        if asked < 1:
            raise UserError(f"--batch must be at least 1, not {asked}")
        size = asked
    elif jax.local_devices()[0].platform == "cpu":
        size = min(n_members, CPU_MEMBERS_PER_DEVICE * devices)
    else:
        budget = MEMORY_BUDGET
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            budget = stats["bytes_limit"] // 4
        size = max(1, min(n_members, budget // (BYTES_PER_COORDINATE * system.positions.size)))
    return devices * math.ceil(size / devices)


def ensemble(
    system: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    seeds: list[int] | str = (0,),
    sweep: list[str] | tuple[str, ...] = (),
    params: list[str] | tuple[str, ...] = ("diameter",),
    observables: list[str] | tuple[str, ...] = (),
    *,
    batch: int | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EnsembleResult:
    """Relax and differentiate every member; write the run; return the table.

    Args:
        system: recipe name or path (default ``binary-packing``).
        overrides: ``KEY=VALUE`` recipe overrides for every member.
        seeds: seeds of the initial positions (a list, or text for :func:`parse_seeds`).
        sweep: ``KEY=V1,V2`` or ``KEY=START:STOP:COUNT`` (:func:`parse_sweep`); several give
            their product.
        params: parameter names (``diameter`` expands to every species).
        observables: observable names (:func:`mdsens.observables.parse_observable`).
        batch: members per batch (default: what fits memory).
        run_dir: where to write (default ``results/<name>-ensemble``).
        resume: reuse the member files of an interrupted run of the same ensemble.
        force: write into a directory that holds other files.
        progress: ``progress(done, total)`` after every batch (on every process).

    Raises:
        UserError: bad seeds or sweep, an unknown sweep key or parameter or observable, a sweep
            that changes the members' shape, an existing ensemble in ``run_dir`` without
            ``resume``; raised before anything is written.
    """
    start = time.perf_counter()
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds)
    if not seeds:
        raise UserError("no seeds: give at least one (e.g. 0:64)")
    points = _points(list(sweep))
    # One system per sweep point: checks every override now, before anything is computed.
    systems = [load_system(system, list(overrides) + _overrides(p), seed=seeds[0]) for p in points]
    shapes = {s.positions.shape for s in systems}
    if len(shapes) > 1:
        raise UserError(
            f"the sweep changes the members' shape (N, d): {' vs '.join(map(str, sorted(shapes)))};"
            " members of one ensemble batch together and must share it: run one ensemble per shape"
        )
    names = expand_parameters(systems[0], list(params))
    for s in systems:
        for spec in observables:
            parse_observable(s, spec)
    target = Path(run_dir) if run_dir is not None else RESULTS / f"{safe_name(systems[0].name)}-ensemble"
    if not (resume and files.existing_members(target)):
        check_target(target, force)
    if files.existing_members(target) and not resume:
        raise UserError(
            f"{target} already holds an ensemble: pass --resume to finish or reuse it, or choose"
            " another --out"
        )
    members = [
        Member(i, seed, point, {**s.recipe, "seed": seed})
        for i, (s, point, seed) in enumerate(
            (s, p, seed) for s, p in zip(systems, points, strict=True) for seed in seeds
        )
    ]
    keys = {m.index: files.member_key(m.recipe, names, list(observables)) for m in members}
    work = (target, systems, points, members, keys, names, observables, batch, progress)
    # Every process checks the directory before any writes into it; the first barrier waits
    # for all of them (and for process 0's lock), the second for all members' files.
    if jax.process_index() != 0:
        _barrier("directory checked")
        computed = _compute(*work)
        _barrier("members written")
        return EnsembleResult([], [], {}, [], [], computed, None, time.perf_counter() - start)
    with run_lock(target, "ensemble", create=True):
        _barrier("directory checked")
        computed = _compute(*work)
        _barrier("members written")
        return _finish(target, members, keys, names, observables, points, computed, start)


def start_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a ``jax.distributed`` job: the coordinator ``HOST:PORT``, the process count and this
    process's id, or (all ``None``) what JAX reads from the environment (SLURM, Open MPI, or
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Must come before
    anything computes with JAX. CPU processes exchange data over Gloo.

    Raises:
        UserError: JAX has already started (or the job cannot be joined).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise UserError(f"cannot join the jax.distributed job: {message}") from None


def _barrier(name: str) -> None:
    """Wait for every process (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mdsens ensemble: {name}")


def _compute(target, systems, points, members, keys, names, observables, batch, progress) -> int:
    """Compute this process's members that have no file yet; return how many."""
    by_point = {p: s for s, p in zip(systems, points, strict=True)}
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(_group_key(by_point[m.point]), []).append(m)
    rank, count = jax.process_index(), jax.process_count()
    todo_total = 0
    plans = []
    for group in groups.values():
        mine = [m for k, m in enumerate(group) if k % count == rank]
        todo = [m for m in mine if files.read_member(target, m.index, keys[m.index]) is None]
        todo_total += len(todo)
        plans.append((group, len(mine), todo))
    done = 0
    mesh = local_mesh()
    for group, mine, todo in plans:
        if not todo:
            continue
        point_systems = [by_point[m.point] for m in group]
        # The template's list reaches as far as the widest member's interactions.
        template = max(point_systems, key=lambda s: s.reach())
        engine = _engine(template, names, observables, mesh)
        # Sized by all of this process's members of the group, not those left: a resumed run
        # keeps the batch shape, and with it the compiled functions.
        size = batch_size(mine, template, engine.devices, batch)
        for offset in range(0, len(todo), size):
            chunk = todo[offset : offset + size]
            outcomes = engine.run(
                [by_point[m.point].params for m in chunk],
                [member_positions(by_point[m.point], m.seed) for m in chunk],
                size,
            )
            for m, outcome in zip(chunk, outcomes, strict=True):
                _save(target, m, keys[m.index], outcome)
            done += len(chunk)
            if progress is not None:
                progress(done, todo_total)
    return done


_ENGINES: dict[tuple, BatchEngine] = {}
"""Compiled batch engines by template recipe, parameters, observables and devices: a resumed
or repeated ensemble in the same process compiles nothing again."""


def _engine(template: System, names, observables, mesh) -> BatchEngine:
    recipe = {k: v for k, v in template.recipe.items() if k not in ("seed", "description")}
    recipe = json.dumps(recipe, sort_keys=True, default=str)
    key = (recipe, tuple(names), tuple(observables), tuple(d.id for d in mesh.devices.flat))
    if key not in _ENGINES:
        if len(_ENGINES) >= 4:
            _ENGINES.pop(next(iter(_ENGINES)))
        parsed = tuple(parse_observable(template, o) for o in observables)
        _ENGINES[key] = BatchEngine(template, tuple(names), parsed, mesh)
    return _ENGINES[key]


def _save(target: Path, m: Member, key: str, outcome: MemberOutcome) -> None:
    meta = {
        "key": key,
        "member": m.index,
        "seed": m.seed,
        "point": [list(p) for p in m.point],
        "converged": outcome.ok,
        "path": outcome.path,
        "reason": outcome.reason,
        "scalars": outcome.scalars,
    }
    files.write_member(target, m.index, meta, outcome.arrays)


def statistics(rows: list[dict], numbers: list[str], points) -> list[dict]:
    """Per sweep point: member counts and, per number, mean, standard deviation (ddof = 1) and
    standard error over the converged members (unconverged ones are counted, never averaged)."""
    out = []
    for point in points:
        values = {k: v for k, v in point}
        mine = [r for r in rows if all(r[k] == v for k, v in point)]
        good = [r for r in mine if r["converged"]]
        entry = {
            "point": values,
            "members": len(mine),
            "converged": len(good),
            "unconverged": len(mine) - len(good),
        }
        stats = {}
        for name in numbers:
            data = np.asarray([r[name] for r in good if r.get(name) is not None], dtype=np.float64)
            n = int(data.size)
            std = float(np.std(data, ddof=1)) if n > 1 else None
            stats[name] = {
                "mean": float(np.mean(data)) if n else None,
                "std": std,
                "stderr": None if std is None else std / math.sqrt(n),
                "n": n,
            }
        entry["numbers"] = stats
        out.append(entry)
    return out


def _finish(target, members, keys, names, observables, points, computed, start) -> EnsembleResult:
    """Read every member's file, write the table, arrays and statistics."""
    sweep_keys = [k for k, _ in points[0]]
    numbers = scalar_names(names, list(observables))
    rows, arrays, failed = [], [], []
    for m in members:
        stored = files.read_member(target, m.index, keys[m.index])
        if stored is None:
            raise RuntimeError(f"member {m.index} has no file after all processes finished")
        meta, member_arrays = stored
        row = {"member": m.index, "seed": m.seed, **dict(m.point)}
        row.update(converged=meta["converged"], path=meta["path"], reason=meta["reason"])
        row.update({k: meta["scalars"].get(k) for k in numbers})
        row["wall_time"] = meta["scalars"].get("wall_time")
        rows.append(row)
        arrays.append(member_arrays)
        if not meta["converged"]:
            failed.append({"member": m.index, "seed": m.seed, "reason": meta["reason"]})
    columns = ["member", "seed", *sweep_keys, "converged", "path", "reason", *numbers, "wall_time"]
    stacked = files.stacked_arrays(arrays)
    stats = statistics(rows, numbers, points)
    wall = time.perf_counter() - start
    summary = {
        "recipe": {k: v for k, v in members[0].recipe.items() if k != "seed"},
        "seeds": sorted({m.seed for m in members}),
        "sweep": {k: sorted({dict(m.point)[k] for m in members}) for k in sweep_keys},
        "parameters": names,
        "observables": list(observables),
        "members": len(members),
        "unconverged": len(failed),
        "failed": failed,
        "statistics": stats,
        "computed": computed,
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "wall_time": wall,
    }
    files.write_results(target, rows, columns, stacked, summary)
    return EnsembleResult(columns, rows, stacked, stats, failed, computed, target, wall)
