"""Run directories: the files that users, viewers and later stages read (see docs/file-formats.md).

A run directory ``RUN/`` holds

* ``system.toml`` — the resolved recipe (``mdsens relax --system RUN/system.toml`` reproduces it);
* ``relaxed.npz`` — relaxed positions at full float64 precision and the relaxation record; later
  stages read positions from here, never from the 8-decimal extxyz copy;
* ``relaxed.extxyz`` — the relaxed structure for ASE and OVITO;
* ``sensitivity.npz`` / ``sensitivity.json`` / ``sensitivity.extxyz`` — dx*/dθ per parameter,
  energy sensitivities and diagnostics, and the same vectors as per-atom arrays;
* ``observables.json`` / ``observables.npz`` — observables q(x*, θ) with their total
  derivatives dq/dθ (``mdsens sensitivity --observable``), and with per-particle parameters the
  (N,) gradient by every particle's own value (also a per-atom column of ``sensitivity.extxyz``);
* ``manifest.json`` — every file mdsens wrote for the run, and the relaxed state they belong to.

Each stage's files are committed as a whole with :func:`mdsens.manifest.write_stage`: a new
relaxation removes what mdsens made from the previous one (and nothing else), new sensitivities
the figures; an interrupted command leaves the previous run as it was. The files are read back,
and checked against the manifest, by :mod:`mdsens.run_files`.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import platform
import re
import tomllib
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import ase
import ase.io
import ase.io.formats
import jax
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from mdsens import atomic
from mdsens.errors import UserError
from mdsens.manifest import read_manifest, state_of, write_stage
from mdsens.observable_gradients import ObservableGradient, ObservableResult
from mdsens.parameters import parameter_names, parameter_value
from mdsens.recipe import dump_recipe
from mdsens.relaxation import RelaxResult
from mdsens.run_files import (
    listed,
    open_run,
    read_recipe,
    read_relaxed,
    read_summary,
    run_directory,
    verify_run,
)
from mdsens.run_lock import run_lock

# Where runs go, and which one is the latest, live in run_paths (no JAX, for the CLI); they are
# part of this module's interface too.
from mdsens.run_paths import (  # noqa: F401
    LATEST,
    RESULTS,
    check_target,
    default_run_dir,
    latest_run,
    mark_latest,
    safe_name,
)
from mdsens.sensitivity import ParameterSensitivity, SensitivityResult
from mdsens.system import System, build_system
from mdsens.validity import Validity


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that determine the numbers."""
    out = {"python": platform.python_version()}
    for package in ("mdsens", "jax", "jaxlib", "jax-md", "numpy", "ase"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def atoms_at(system: System, positions: np.ndarray) -> ase.Atoms:
    """The atoms that a run's extxyz files hold (``relaxed.extxyz``, ``sensitivity.extxyz``,
    ``predicted.extxyz``): the input's atoms (order, symbols, tags, cell, pbc, info) at
    ``positions``, with mdsens's per-atom arrays and parameter values. 2-D systems lie in z = 0
    and are not periodic in z."""
    atoms = system.atoms.copy()
    atoms.positions = vectors3(positions)
    atoms.arrays["type"] = system.types.astype(int)
    if "diameter" in system.params:
        diameters = np.asarray(system.params["diameter"])[system.types]
        atoms.arrays["diameter"] = diameters
        atoms.arrays["radius"] = diameters / 2  # OVITO sizes particles by a "radius" column
    atoms.info["species_names"] = ",".join(system.species)
    atoms.info["system"] = system.name
    atoms.info["potential"] = system.potential.name
    for name in parameter_names(system):
        atoms.info[name] = parameter_value(system, system.params, name)
    return atoms


def vectors3(vectors: np.ndarray) -> np.ndarray:
    """(N, d) vectors as (N, 3), zero beyond d: ASE's positions and per-atom vector arrays."""
    out = np.zeros((vectors.shape[0], 3))
    out[:, : vectors.shape[1]] = vectors
    return out


def relaxed_state(system: System, positions: np.ndarray) -> str:
    """The state (:func:`mdsens.manifest.state_of`) of ``system`` relaxed to ``positions``, as
    the run files record it: the recipe as ``system.toml`` parses back."""
    return state_of(tomllib.loads(dump_recipe(system.recipe)), np.asarray(positions, dtype=np.float64))


def bytes_writer(data: bytes) -> Callable[[Path], object]:
    """A writer of ``data`` to the path it is given, for :func:`mdsens.manifest.write_stage`."""
    return lambda path: path.write_bytes(data)


def save_relaxation(run_dir: str | Path | None, system: System, result: RelaxResult) -> Path:
    """Write ``system.toml``, ``relaxed.npz`` and ``relaxed.extxyz``; return the run directory.

    The files are committed as a new state (:func:`mdsens.manifest.write_stage`): what mdsens
    wrote from the previous relaxation in ``run_dir`` (sensitivity files, ``check.json``,
    ``export.*``, figures) is removed; files it did not write are kept, and are not part of the
    run. This does not mark the run as the latest one (see :func:`mark_latest`), and does not
    refuse a directory that is not a run (the CLI does: :func:`check_target`).
    """
    run = default_run_dir(system) if run_dir is None else Path(run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} exists and is not a directory")
    forces = np.asarray(jax.jit(system.force_fn)(result.positions, system.params))
    record = {
        "energy": result.energy,
        "max_force": result.max_force,
        "steps": result.steps,
        "converged": result.converged,
        "fmax": result.fmax,
        "minimizer": result.minimizer,
        "wall_time": result.wall_time,
        "initial_energy": result.initial_energy,
        "diverged": result.diverged,
        "reason": result.reason,
    }
    atoms = atoms_at(system, result.positions)
    # ASE moves an info["energy"] into the calculator on reading; keep it there from the start.
    atoms.info.update({k: v for k, v in record.items() if k != "energy"})
    atoms.calc = SinglePointCalculator(atoms, energy=result.energy, forces=vectors3(forces))
    positions = np.asarray(result.positions, dtype=np.float64)
    arrays = {"positions": positions, "types": system.types, "cell": system.cell, "pbc": system.pbc}
    arrays.update({key: np.asarray(value) for key, value in record.items()})
    contents = {
        "system.toml": dump_recipe(system.recipe).encode(),
        "relaxed.npz": _npz_bytes(arrays),
        "relaxed.extxyz": extxyz_bytes(atoms),
    }
    state = relaxed_state(system, positions)
    write_stage(run, "relax", state, [(name, bytes_writer(data)) for name, data in contents.items()])
    return run


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def extxyz_bytes(atoms: ase.Atoms) -> bytes:
    """``atoms`` as the bytes of an extxyz file (per-atom arrays and info included)."""
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue().encode()


def load_run(run_dir: str | Path | None = None) -> tuple[System, RelaxResult, Path]:
    """Read a run directory (default: :func:`latest_run`): its system, relaxed state and path.

    The System is rebuilt from ``system.toml``; the relaxed state is that of ``relaxed.npz``. The
    files are checked against each other and the run's manifest
    (:func:`mdsens.run_files.verify_run`).

    Raises:
        UserError: missing directory or file, unreadable files, or files that disagree.
    """
    run, manifest = open_run(latest_run() if run_dir is None else run_dir)
    recipe = read_recipe(run)
    positions, stored = read_relaxed(run)
    try:
        result = _relax_result(positions, stored)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"cannot read {run / 'relaxed.npz'}: {type(error).__name__} {error}") from None
    summary = read_summary(run) if listed(manifest, "sensitivity.json") else None
    verify_run(run, manifest, recipe, positions, summary)
    system = build_system(recipe)
    if positions.shape != system.positions.shape:
        raise UserError(
            f"{run / 'relaxed.npz'} holds positions of shape {positions.shape}, but system.toml"
            f" describes {system.positions.shape}"
        )
    return system, result, run


def _relax_result(positions: np.ndarray, stored: dict) -> RelaxResult:
    return RelaxResult(
        positions=positions,
        energy=float(stored["energy"]),
        max_force=float(stored["max_force"]),
        steps=int(stored["steps"]),
        converged=bool(stored["converged"]),
        wall_time=float(stored["wall_time"]),
        minimizer=str(stored["minimizer"]),
        fmax=float(stored["fmax"]),
        initial_energy=float(stored["initial_energy"]),
        # Runs written before these were recorded did not diverge (they would not be written).
        diverged=bool(stored.get("diverged", False)),
        reason=str(stored.get("reason", "")),
    )


def _column_safe(parameter: str) -> str:
    # extxyz keys and column names cannot hold dots or dashes.
    return parameter.replace(".", "_").replace("-", "_")


def _property_name(parameter: str) -> str:
    return "dx_d_" + _column_safe(parameter)


def _energy_key(parameter: str) -> str:
    return "dE_d_" + _column_safe(parameter)


def _parameter_summary(name: str, entry: ParameterSensitivity, validity: Validity | None) -> dict:
    return {
        "value": entry.value,
        "denergy": entry.denergy,
        # "max|dx*/dθ|" everywhere (CLI, figures): the longest per-particle vector dx_i*/dθ.
        "max_particle_dx": entry.max_displacement,
        "exactly_zero": entry.exactly_zero,
        "resolved": entry.resolved,
        "extxyz_column": _property_name(name),
        "extxyz_energy_key": _energy_key(name),
        "solver": entry.solver,
        "iterations": entry.iterations,
        # No solve ran for an exact zero: there is no residual to report.
        "residual": None if entry.exactly_zero else entry.residual,
        "converged": entry.converged,
        "wall_time": entry.wall_time,
        # How far θ may move, in its units, before a contact or the Hessian's positivity changes.
        "validity": None if validity is None else validity.to_json(),
    }


# How many particles observables.json names as those whose own value moves an observable most.
LARGEST_PARTICLES = 5


def observable_column(observable: str, key: str) -> str:
    """The ``sensitivity.extxyz`` column of dq/d(``key``[i]) for observable ``observable``:
    ``d_pressure_d_diameter``, ``d_distance_3_17_d_diameter`` (letters, digits and ``_`` only)."""
    return f"d_{_identifier(observable)}_d_{_identifier(key)}"


def observable_npz_key(observable: str, key: str) -> str:
    """The ``observables.npz`` key of dq/d(``key``[i]): ``pressure/diameter``."""
    return f"{observable}/{key}"


def _identifier(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _observable_solver(result: ObservableResult, entry: ObservableGradient, sensitivity: SensitivityResult):
    """The diagnostics of the solves behind one observable's gradient: its adjoint solve
    (reverse mode), or the forward solves of the parameters' dx*/dθ (sensitivity.json's, when
    they were passed in: ``solves`` counts only those run for the observables)."""
    if result.mode == "reverse":
        return {
            "mode": "reverse",
            "solves": 1,
            "iterations": entry.iterations,
            "residual": entry.residual,
            "converged": entry.converged,
        }
    used = [p for name, p in sensitivity.parameters.items() if name in entry.gradient and not p.exactly_zero]
    return {
        "mode": "forward",
        "solves": result.solves,
        "iterations": sum(p.iterations for p in used),
        # No solve ran where every dx*/dθ is exactly zero: no residual to report.
        "residual": max((p.residual for p in used), default=None),
        "converged": all(p.converged for p in used),
    }


def _per_particle_summary(system: System, name: str, key: str, values: np.ndarray) -> dict:
    order = np.argsort(-np.abs(values), kind="stable")[:LARGEST_PARTICLES]
    return {
        "npz_key": observable_npz_key(name, key),
        "extxyz_column": observable_column(name, key),
        "largest": [
            {"atom": int(i), "species": system.species[system.types[i]], "gradient": float(values[i])}
            for i in order
        ],
        # Σ_i dq/d(key[i]) over a species is dq/d(key.species): the species value moves them all.
        "species_sums": {
            f"{key}.{species}": float(np.sum(values[system.types == t]))
            for t, species in enumerate(system.species)
        },
    }


def observables_summary(
    system: System, result: ObservableResult, sensitivity: SensitivityResult, state: str
) -> dict:
    """What ``observables.json`` holds (see docs/file-formats.md)."""
    keys = sorted({key for entry in result.observables.values() for key in entry.per_particle})
    names = list(next(iter(result.observables.values())).gradient) if result.observables else []
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": system.name,
        "state": state,
        "mode": result.mode,
        "reason": result.reason,
        "solves": result.solves,
        "wall_time": result.wall_time,
        "parameters": names,
        "per_particle": keys,
        "observables": {
            name: {
                "value": entry.value,
                "units": entry.units,
                "gradient": entry.gradient,
                "explicit": entry.explicit,
                "solver": _observable_solver(result, entry, sensitivity),
                "rattler_dependence": entry.rattler_dependence,
                "warnings": entry.warnings,
                "per_particle": {
                    key: _per_particle_summary(system, name, key, np.asarray(values))
                    for key, values in entry.per_particle.items()
                },
            }
            for name, entry in result.observables.items()
        },
        "versions": versions(),
    }


def save_sensitivity(
    run_dir: str | Path,
    system: System,
    result: SensitivityResult,
    relaxed: RelaxResult | None = None,
    observables: ObservableResult | None = None,
) -> list[Path]:
    """Write ``sensitivity.npz``, ``sensitivity.json`` and ``sensitivity.extxyz`` into ``run_dir``
    (a run of :func:`save_relaxation`), replacing the earlier ones and the figures; return their
    paths.

    ``relaxed`` is the state ``result`` was computed from; given, the files are refused unless
    the run still holds that state (it may have been relaxed again meanwhile). Without it the
    run's own positions are taken to be that state.

    ``observables`` (computed at the same state) adds ``observables.json``, and where it holds
    per-particle gradients ``observables.npz`` and one ``sensitivity.extxyz`` column each
    (:func:`observable_column`). Written in the same commit: a later ``mdsens sensitivity``
    without observables removes them.

    Raises:
        UserError: the run holds another state (or ``system`` is not the run's system), or two
            observables' per-particle gradients would share one column name.
    """
    run = run_directory(run_dir)
    with run_lock(run, "sensitivity"):
        run, manifest = open_run(run)
        stored = read_relaxed(run)[0] if relaxed is None else relaxed.positions
        positions = np.asarray(stored, dtype=np.float64)
        state = relaxed_state(system, positions)
        entries = result.parameters
        atoms = atoms_at(system, positions)
        for name, entry in entries.items():
            atoms.new_array(_property_name(name), vectors3(entry.dx))
            atoms.info[_energy_key(name)] = entry.denergy
        atoms.new_array("rattler", result.rattlers.astype(bool))
        per_atom = {} if observables is None else _per_atom_gradients(observables)
        for column, values in per_atom.values():
            atoms.new_array(column, values)
        spectrum = None
        if result.spectrum is not None:
            spectrum = {
                **dataclasses.asdict(result.spectrum),
                "condition_number": result.spectrum.condition_number,
            }
        summary = {
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "system": system.name,
            "state": state,
            "state_relaxed": result.state_relaxed,
            "max_force": result.max_force,
            "removed_modes": result.removed_modes,
            "rattlers": np.flatnonzero(result.rattlers).tolist(),
            "hessian_spectrum": spectrum,
            "warnings": result.warnings,
            "wall_time": result.wall_time,
            "parameters": {
                name: _parameter_summary(name, e, result.validity.get(name)) for name, e in entries.items()
            },
            "versions": versions(),
        }
        contents = {
            "sensitivity.npz": _npz_bytes({k: v.dx for k, v in entries.items()}),
            "sensitivity.json": (json.dumps(summary, indent=2) + "\n").encode(),
            "sensitivity.extxyz": extxyz_bytes(atoms),
        }
        if observables is not None:
            text = json.dumps(observables_summary(system, observables, result, state), indent=2) + "\n"
            contents["observables.json"] = text.encode()
            if per_atom:
                contents["observables.npz"] = _npz_bytes({k: v for k, (_, v) in per_atom.items()})
        files = [(name, bytes_writer(data)) for name, data in contents.items()]
        return write_stage(run, "sensitivity", None if manifest is None else state, files)


def per_atom_columns(observables: list[str], keys: list[str]) -> dict[tuple[str, str], str]:
    """(observable, per-particle parameter) → its ``sensitivity.extxyz`` column, for each pair.

    Raises:
        UserError: two observables would share a column (names alike but for punctuation).
    """
    out: dict[tuple[str, str], str] = {}
    owners: dict[str, str] = {}
    for name in observables:
        for key in keys:
            column = observable_column(name, key)
            if owners.setdefault(column, name) != name:
                raise UserError(
                    f"observables {owners[column]!r} and {name!r} would share the sensitivity.extxyz"
                    f" column {column}: compute them in separate runs"
                )
            out[name, key] = column
    return out


def _per_atom_gradients(observables: ObservableResult) -> dict[str, tuple[str, np.ndarray]]:
    """npz key → (extxyz column, (N,) dq/d(key[i])) of every per-particle gradient."""
    entries = observables.observables
    keys = sorted({key for entry in entries.values() for key in entry.per_particle})
    columns = per_atom_columns(list(entries), keys)
    return {
        observable_npz_key(name, key): (columns[name, key], np.asarray(values, dtype=np.float64))
        for name, entry in entries.items()
        for key, values in entry.per_particle.items()
    }


def save_check(run_dir: str | Path, system: System, relaxed: RelaxResult, report: dict) -> Path:
    """Write ``report`` (``mdsens check``'s results) as ``RUN/check.json``, with the state it was
    checked at; return its path.

    Raises:
        UserError: the run no longer holds the state ``relaxed``.
    """
    run, manifest = open_run(run_dir)
    state = relaxed_state(system, relaxed.positions)
    text = json.dumps({**report, "state": state}, indent=2) + "\n"
    files = [("check.json", lambda path: path.write_text(text))]
    return write_stage(run, "check", None if manifest is None else state, files)[0]


def export_structure(run_dir: str | Path | None, format: str, path: str | Path | None = None) -> Path:
    """Write a run's relaxed structure with ``ase.io.write`` in ``format``; return the path.

    What is written is the input structure (atom order, symbols, tags, cell, per-atom arrays of
    the input file) at the relaxed positions; mdsens's own arrays stay in the run's extxyz files.
    The default path is ``RUN/export.<format>``; a file written into the run directory joins its
    manifest (and goes with the next relaxation).

    Raises:
        UserError: unknown format, a format that cannot hold this structure, or a missing run.
    """
    try:
        ase.io.formats.ioformats[format]
    except KeyError:
        raise UserError(f"unknown format {format!r}; see `ase info --formats`") from None
    system, result, run = load_run(run_dir)
    path = run / f"export.{format}" if path is None else Path(path)
    atoms = system.atoms.copy()
    atoms.positions = vectors3(result.positions)

    def write(tmp: Path) -> None:
        ase.io.write(tmp, atoms, format=format)

    try:
        with warnings.catch_warnings():
            # ASE warns before failing on a cell a format cannot hold; the error says it once.
            warnings.simplefilter("ignore", RuntimeWarning)
            if path.parent.resolve() == run.resolve():
                state = relaxed_state(system, result.positions) if read_manifest(run) else None
                write_stage(run, "export", state, [(path.name, write)])
            else:
                atomic.write_with(path, write)
    except UserError:
        raise
    except (ValueError, TypeError, NotImplementedError, KeyError, RuntimeError) as error:
        raise UserError(f"cannot write {format}: {error}") from None
    return path
