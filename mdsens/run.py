"""Run directories: the files that users, viewers and later stages read (see docs/file-formats.md).

A run directory ``RUN/`` holds

* ``system.toml`` — the resolved recipe (``mdsens relax --system RUN/system.toml`` reproduces it);
* ``relaxed.npz`` — relaxed positions at full float64 precision and the relaxation record; later
  stages read positions from here, never from the 8-decimal extxyz copy;
* ``relaxed.extxyz`` — the relaxed structure for ASE and OVITO;
* ``sensitivity.npz`` / ``sensitivity.json`` / ``sensitivity.extxyz`` — dx*/dθ per parameter,
  energy sensitivities and diagnostics, and the same vectors as per-atom arrays.

Every file is written atomically, and a stage's files are renamed into place together. Writing a
new relaxation first removes everything made from the previous one (sensitivity files,
``check.json``, ``export.*``, figures), and writing sensitivities first removes the figures, so a
directory never mixes two states, even when a command is interrupted. The files are read back by
:mod:`mdsens.run_files`.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import platform
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
from mdsens.errors import UserError
from mdsens.recipe import dump_recipe
from mdsens.relaxation import RelaxResult
from mdsens.run_files import read_recipe, read_relaxed, run_directory
from mdsens.sensitivity import SensitivityResult, parameter_names, parameter_value
from mdsens.system import System, build_system

RESULTS = Path("results")
LATEST = ".latest-run"
# Files made from a run's sensitivities (the figures), and from its relaxation (all of them).
FIGURE_GLOBS = ("*.png",)
DOWNSTREAM_GLOBS = ("sensitivity.*", "check.json", "export.*", *FIGURE_GLOBS)


def default_run_dir(system: System) -> Path:
    """``results/<system name>`` (``results/run`` for an unnamed system), relative to the working
    directory."""
    return RESULTS / (system.name or "run")


def latest_run() -> Path:
    """The run that commands without ``--run`` use: the one ``results/.latest-run`` names
    (:func:`mark_latest`; ``mdsens relax`` marks its run) while it holds a ``relaxed.npz``, else
    the one under ``results/`` whose ``relaxed.npz`` was modified last.

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

    What the previous relaxation in ``run_dir`` led to (sensitivity files, ``check.json``,
    ``export.*``, figures) is removed before the new files are moved in. This does not mark the
    run as the latest one (see :func:`mark_latest`).
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
    }
    atoms = _atoms(system, result.positions)
    # ASE moves an info["energy"] into the calculator on reading; keep it there from the start.
    atoms.info.update({k: v for k, v in record.items() if k != "energy"})
    atoms.calc = SinglePointCalculator(atoms, energy=result.energy, forces=_vectors3(forces))
    arrays = {"positions": result.positions, "types": system.types, "cell": system.cell, "pbc": system.pbc}
    arrays.update({key: np.asarray(value) for key, value in record.items()})
    contents = {
        "system.toml": dump_recipe(system.recipe).encode(),
        "relaxed.npz": _npz_bytes(arrays),
        "relaxed.extxyz": _extxyz_bytes(atoms),
    }
    _replace_stage(run, contents, DOWNSTREAM_GLOBS)
    return run


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _extxyz_bytes(atoms: ase.Atoms) -> bytes:
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue().encode()


def _replace_stage(run: Path, contents: dict[str, bytes], stale_globs: tuple[str, ...]) -> None:
    """Remove the files of ``run`` that ``stale_globs`` match, then write ``contents`` (file name
    -> bytes) atomically.

    The contents are complete before anything on disk changes, so a failing writer leaves the
    directory as it was; the stale files go before the new ones come in, so an interruption
    leaves the previous state without its downstream files, never beside them.
    """
    run.mkdir(parents=True, exist_ok=True)
    for pattern in stale_globs:
        for stale in run.glob(pattern):
            stale.unlink()
    atomic.write_all(
        {run / name: (lambda tmp, data=data: tmp.write_bytes(data)) for name, data in contents.items()}
    )


def mark_latest(run_dir: str | Path) -> None:
    """Record ``run_dir`` as the run that commands without ``--run`` use (``results/.latest-run``)."""
    atomic.write_text(RESULTS / LATEST, str(Path(run_dir).resolve()))


def load_run(run_dir: str | Path | None = None) -> tuple[System, RelaxResult, Path]:
    """Read a run directory (default: :func:`latest_run`): its system, relaxed state and path.

    The System is rebuilt from ``system.toml``; the relaxed state is that of ``relaxed.npz``.

    Raises:
        UserError: missing directory or file, unreadable or inconsistent files.
    """
    run = run_directory(latest_run() if run_dir is None else run_dir)
    recipe = read_recipe(run)
    positions, stored = read_relaxed(run)
    try:
        result = _relax_result(positions, stored)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"cannot read {run / 'relaxed.npz'}: {type(error).__name__} {error}") from None
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
    )


def _property_name(parameter: str) -> str:
    # extxyz column names cannot hold dots.
    return "dx_d_" + parameter.replace(".", "_").replace("-", "_")


def save_sensitivity(run_dir: str | Path, system: System, result: SensitivityResult) -> list[Path]:
    """Write ``sensitivity.npz``, ``sensitivity.json`` and ``sensitivity.extxyz`` into ``run_dir``
    (a run of :func:`save_relaxation`), after removing its figures; return their paths."""
    run = run_directory(run_dir)
    entries = result.parameters
    positions, _ = read_relaxed(run)
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
    contents = {
        "sensitivity.npz": _npz_bytes({k: v.dx for k, v in entries.items()}),
        "sensitivity.json": (json.dumps(summary, indent=2) + "\n").encode(),
        "sensitivity.extxyz": _extxyz_bytes(atoms),
    }
    _replace_stage(run, contents, FIGURE_GLOBS)
    return [run / name for name in contents]


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
