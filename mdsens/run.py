"""Run directories: the files that users, viewers and later stages read (see docs/file-formats.md).

A run directory ``RUN/`` holds

* ``system.toml`` — the resolved recipe (``mdsens relax --system RUN/system.toml`` reproduces it);
* ``relaxed.npz`` — relaxed positions at full float64 precision and the relaxation record; later
  stages read positions from here, never from the 8-decimal extxyz copy;
* ``relaxed.extxyz`` — the relaxed structure for ASE and OVITO;
* ``sensitivity.npz`` / ``sensitivity.json`` / ``sensitivity.extxyz`` — dx*/dθ per parameter,
  energy sensitivities and diagnostics, and the same vectors as per-atom arrays.

Every file is written atomically. Writing a new relaxation removes the sensitivity files and
figures of the previous one, so a directory never mixes two states.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tomllib
import warnings
from importlib import metadata
from pathlib import Path

import ase
import ase.io
import ase.io.formats
import jax
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from mdsens import atomic
from mdsens.errors import READ_ERRORS, UserError
from mdsens.recipe import dump_recipe
from mdsens.relaxation import RelaxResult
from mdsens.sensitivity import SensitivityResult, parameter_names, parameter_value
from mdsens.system import System, build_system

RESULTS = Path("results")
LATEST = ".latest-run"
DOWNSTREAM_GLOBS = ("sensitivity.*", "*.png")


def default_run_dir(system: System) -> Path:
    """``results/<system name>``, relative to the working directory."""
    return RESULTS / (system.name or "run")


def latest_run() -> Path:
    """The run written most recently from this working directory.

    Raises:
        UserError: no run has been written here yet.
    """
    pointer = RESULTS / LATEST
    if pointer.is_file():
        run = Path(pointer.read_text().strip())
        if (run / "relaxed.npz").is_file():
            return Path(os.path.relpath(run)) if run.is_relative_to(Path.cwd()) else run
    runs = sorted(RESULTS.glob("*/relaxed.npz"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"no run found under {RESULTS}/: run `mdsens relax` first, or pass --run DIR")
    return runs[-1].parent


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that determine the numbers."""
    out = {"python": platform.python_version()}
    for package in ("mdsens", "jax", "jaxlib", "jax-md", "numpy", "ase"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def _atoms(system: System, positions: np.ndarray) -> ase.Atoms:
    """The input's atoms (order, symbols, tags, cell, pbc, info) at new positions, with mdsens's
    per-atom arrays and parameter values. 2-D systems lie in z = 0 and are not periodic in z."""
    atoms = system.atoms.copy()
    atoms.positions = _vectors3(positions)
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


def _vectors3(vectors: np.ndarray) -> np.ndarray:
    out = np.zeros((vectors.shape[0], 3))
    out[:, : vectors.shape[1]] = vectors
    return out


def save_relaxation(run_dir: str | Path | None, system: System, result: RelaxResult) -> Path:
    """Write ``system.toml``, ``relaxed.npz`` and ``relaxed.extxyz``; return the run directory.

    Removes the previous run's sensitivity files and figures from ``run_dir``.
    """
    run = default_run_dir(system) if run_dir is None else Path(run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} exists and is not a directory")
    run.mkdir(parents=True, exist_ok=True)
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
    }
    atoms = _atoms(system, result.positions)
    # ASE moves an info["energy"] into the calculator on reading; keep it there from the start.
    atoms.info.update({k: v for k, v in record.items() if k != "energy"})
    atoms.calc = SinglePointCalculator(atoms, energy=result.energy, forces=_vectors3(forces))
    arrays = {"positions": result.positions, "types": system.types, "cell": system.cell, "pbc": system.pbc}
    arrays.update({key: np.asarray(value) for key, value in record.items()})
    atomic.write_all(
        {
            run / "system.toml": lambda tmp: tmp.write_text(dump_recipe(system.recipe)),
            run / "relaxed.npz": lambda tmp: np.savez(tmp, **arrays),
            run / "relaxed.extxyz": lambda tmp: ase.io.write(tmp, atoms, format="extxyz"),
        }
    )
    for pattern in DOWNSTREAM_GLOBS:
        for stale in run.glob(pattern):
            stale.unlink()
    return run


def mark_latest(run_dir: str | Path) -> None:
    """Record ``run_dir`` as the run that commands without ``--run`` use (``results/.latest-run``)."""
    atomic.write_text(RESULTS / LATEST, str(Path(run_dir).resolve()))


def load_run(run_dir: str | Path | None = None) -> tuple[System, RelaxResult, Path]:
    """Read a run directory (default: the latest run): its system, relaxed state and path.

    Raises:
        UserError: missing directory or file, unreadable or inconsistent files.
    """
    run = latest_run() if run_dir is None else Path(run_dir)
    if not run.is_dir():
        raise UserError(f"no run directory {run}")
    for name in ("system.toml", "relaxed.npz"):
        if not (run / name).is_file():
            raise UserError(f"{run / name} is missing: is {run} a run of `mdsens relax`?")
    try:
        recipe = tomllib.loads((run / "system.toml").read_text())
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {run / 'system.toml'}: {error}") from None
    system = build_system(recipe)
    try:
        with np.load(run / "relaxed.npz") as data:
            stored = {key: data[key] for key in data.files}
        positions = np.asarray(stored["positions"], dtype=np.float64)
        result = _relax_result(positions, stored)
    except READ_ERRORS as error:
        raise UserError(f"cannot read {run / 'relaxed.npz'}: {type(error).__name__} {error}") from None
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
    )


def _property_name(parameter: str) -> str:
    # extxyz column names cannot hold dots.
    return "dx_d_" + parameter.replace(".", "_").replace("-", "_")


def save_sensitivity(run_dir: str | Path, system: System, result: SensitivityResult) -> list[Path]:
    """Write ``sensitivity.npz``, ``sensitivity.json`` and ``sensitivity.extxyz`` into ``run_dir``."""
    run = Path(run_dir)
    entries = result.parameters
    with np.load(run / "relaxed.npz") as data:
        positions = data["positions"]
    atoms = _atoms(system, positions)
    for name, entry in entries.items():
        atoms.new_array(_property_name(name), _vectors3(entry.dx))
        atoms.info[f"denergy_d_{name}"] = entry.denergy
    atoms.new_array("rattler", result.rattlers.astype(bool))
    spectrum = None
    if result.spectrum is not None:
        spectrum = {
            **dataclasses.asdict(result.spectrum),
            "condition_number": result.spectrum.condition_number,
        }
    summary = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": system.name,
        "state_relaxed": result.state_relaxed,
        "max_force": result.max_force,
        "removed_modes": result.removed_modes,
        "rattlers": np.flatnonzero(result.rattlers).tolist(),
        "hessian_spectrum": spectrum,
        "warnings": result.warnings,
        "wall_time": result.wall_time,
        "parameters": {
            name: {
                "value": e.value,
                "denergy": e.denergy,
                "max_abs_dx": float(np.max(np.abs(e.dx))),
                "extxyz_column": _property_name(name),
                "solver": e.solver,
                "iterations": e.iterations,
                "residual": e.residual,
                "converged": e.converged,
                "wall_time": e.wall_time,
            }
            for name, e in entries.items()
        },
        "versions": versions(),
    }
    paths = [run / "sensitivity.npz", run / "sensitivity.json", run / "sensitivity.extxyz"]
    atomic.write_all(
        {
            paths[0]: lambda tmp: np.savez(tmp, **{k: v.dx for k, v in entries.items()}),
            paths[1]: lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"),
            paths[2]: lambda tmp: ase.io.write(tmp, atoms, format="extxyz"),
        }
    )
    for stale in run.glob("*.png"):
        stale.unlink()
    return paths


def export_structure(run_dir: str | Path | None, format: str, path: str | Path | None = None) -> Path:
    """Write a run's relaxed structure with ``ase.io.write`` in ``format``; return the path.

    What is written is the input structure (atom order, symbols, tags, cell, per-atom arrays of
    the input file) at the relaxed positions; mdsens's own arrays stay in the run's extxyz files.
    The default path is ``RUN/export.<format>``.

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
    atoms.positions = _vectors3(result.positions)
    try:
        with warnings.catch_warnings():
            # ASE warns before failing on a cell a format cannot hold; the error says it once.
            warnings.simplefilter("ignore", RuntimeWarning)
            atomic.write_with(path, lambda tmp: ase.io.write(tmp, atoms, format=format))
    except (ValueError, TypeError, NotImplementedError, KeyError, RuntimeError) as error:
        raise UserError(f"cannot write {format}: {error}") from None
    return path
