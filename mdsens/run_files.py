"""Reading a run directory's files into arrays and dicts, without building its System (no JAX).

This is the one reader of the files that :mod:`mdsens.run` writes (see docs/file-formats.md):
:func:`mdsens.run.load_run` builds the System on top of :func:`read_recipe` and
:func:`read_relaxed`; the figures (:mod:`mdsens.plot`) read the whole run with :func:`read_run`.
Every damaged, missing or inconsistent file is a :class:`~mdsens.errors.UserError` naming it.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import ase
import ase.io
import numpy as np

from mdsens.errors import READ_ERRORS, UserError
from mdsens.structures import species_of


@dataclass(frozen=True)
class Structure:
    """What ``relaxed.extxyz`` says about the atoms beyond their positions."""

    cell: np.ndarray  # (3, 3), one lattice vector per row; zeros for a free cluster
    pbc: np.ndarray  # (3,) bool
    types: np.ndarray  # (N,) species index
    species: tuple[str, ...]  # species names; ``types`` indexes this tuple
    diameters: np.ndarray | None  # (N,) for soft spheres; None for potentials without a size
    defect: object  # atoms.info["defect_position"] as ASE reads it back; None if absent


@dataclass(frozen=True)
class RunFiles:
    """A run directory as its files hold it: the relaxed state, structure and sensitivities."""

    path: Path
    positions: np.ndarray  # (N, d) float64 from relaxed.npz
    structure: Structure
    sensitivities: dict[str, np.ndarray]  # parameter name -> dx*/dθ (N, d); empty without sensitivity.npz
    values: dict[str, float]  # parameter name -> θ, from sensitivity.json; empty where it does not say


def run_directory(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a path, if it is a directory.

    Raises:
        UserError: it does not exist or is not a directory.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    return run


def _required(run: Path, name: str) -> Path:
    path = run / name
    if not path.is_file():
        raise UserError(f"{path} is missing: is {run} a run of `mdsens relax`?")
    return path


def read_recipe(run: Path) -> dict:
    """The resolved recipe in ``system.toml``."""
    path = _required(run, "system.toml")
    try:
        return tomllib.loads(path.read_text())
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def read_relaxed(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Relaxed positions (N, d) at full precision, and the other arrays of ``relaxed.npz``.

    Raises:
        UserError: the file is missing or unreadable, or its positions are not N finite points
            of 1 to 3 coordinates.
    """
    path = _required(run, "relaxed.npz")
    try:
        with np.load(path) as data:
            stored = {key: data[key] for key in data.files}
    except READ_ERRORS as error:
        raise UserError(f"cannot read {path}: {type(error).__name__} {error}") from None
    if "positions" not in stored:
        raise UserError(f"cannot read {path}: it has no array 'positions'")
    positions = np.asarray(stored.pop("positions"), dtype=np.float64)
    if positions.ndim != 2 or not 1 <= positions.shape[1] <= 3:
        raise UserError(f"{path}: positions have shape {positions.shape}, expected (N, d) with d <= 3")
    if not np.all(np.isfinite(positions)):
        raise UserError(f"{path}: positions have non-finite values")
    return positions, stored


def read_structure(run: Path, n: int) -> Structure:
    """Cell, periodicity, species and sizes of the ``n`` atoms in ``relaxed.extxyz``.

    The positions in that file are rounded to 8 decimals; read them with :func:`read_relaxed`.
    """
    path = _required(run, "relaxed.extxyz")
    try:
        atoms = ase.io.read(path, format="extxyz")
    except StopIteration:
        raise UserError(f"cannot read {path}: it holds no structure") from None
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {type(error).__name__} {error}") from None
    if not isinstance(atoms, ase.Atoms) or len(atoms) != n:
        count = len(atoms) if isinstance(atoms, ase.Atoms) else "no"
        raise UserError(f"{path} holds {count} atoms, but relaxed.npz holds {n} positions")
    species, types = species_of(atoms)
    diameters = atoms.arrays.get("diameter")
    return Structure(
        cell=np.asarray(atoms.cell.array, dtype=float),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        types=np.asarray(types, dtype=int),
        species=species,
        diameters=None if diameters is None else np.asarray(diameters, dtype=float),
        defect=atoms.info.get("defect_position"),
    )


def read_sensitivities(run: Path, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """dx*/dθ per parameter from ``sensitivity.npz``, each of ``shape`` (that of the positions);
    empty if the run has no such file."""
    path = run / "sensitivity.npz"
    if not path.is_file():
        return {}
    try:
        with np.load(path) as data:
            arrays = {name: np.asarray(data[name], dtype=np.float64) for name in data.files}
    except READ_ERRORS as error:
        raise UserError(f"cannot read {path}: {type(error).__name__} {error}") from None
    for name, array in arrays.items():
        if array.shape != shape:
            raise UserError(
                f"{path}: array {name!r} has shape {array.shape}, expected {shape} like the positions"
            )
        if not np.all(np.isfinite(array)):
            raise UserError(f"{path}: array {name!r} has non-finite values")
    return arrays


def read_parameter_values(run: Path) -> dict[str, float]:
    """Parameter values θ recorded in ``sensitivity.json``; empty where there is none."""
    path = run / "sensitivity.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    params = summary.get("parameters") if isinstance(summary, dict) else None
    if not isinstance(params, dict):
        return {}
    return {
        name: float(entry["value"])
        for name, entry in params.items()
        if isinstance(entry, dict) and isinstance(entry.get("value"), int | float)
    }


def read_run(run_dir: str | os.PathLike) -> RunFiles:
    """Everything the figures draw: ``relaxed.npz`` and ``relaxed.extxyz`` (required), and
    ``sensitivity.npz`` and ``sensitivity.json`` where present."""
    run = run_directory(run_dir)
    positions, _ = read_relaxed(run)
    return RunFiles(
        path=run,
        positions=positions,
        structure=read_structure(run, len(positions)),
        sensitivities=read_sensitivities(run, positions.shape),
        values=read_parameter_values(run),
    )
