"""Reading a run directory's files into arrays and dicts, without building its System (no JAX).

This is the one reader of the files that :mod:`mdsens.run` writes (see docs/file-formats.md):
:func:`mdsens.run.load_run` builds the System on top of :func:`read_recipe` and
:func:`read_relaxed`; the figures (:mod:`mdsens.plot`) read the whole run with :func:`read_run`.
Every damaged, missing or inconsistent file is a :class:`~mdsens.errors.UserError` naming it and
the command that rewrites it. A run with a manifest (:mod:`mdsens.manifest`) is checked file by
file against it (:func:`verify_run`): a file that is not the one mdsens wrote, or that belongs to
another relaxed state, is refused; files the manifest does not list are ignored.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np

from mdsens.errors import READ_ERRORS, UserError
from mdsens.manifest import Manifest, file_digest, read_manifest, recover, state_of
from mdsens.structures import species_of

RELAX_FILES = ("system.toml", "relaxed.npz", "relaxed.extxyz")
SENSITIVITY_FILES = ("sensitivity.npz", "sensitivity.json", "sensitivity.extxyz")
OBSERVABLE_FILES = ("observables.json", "observables.npz")


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
class PerAtomGradient:
    """One observable's derivative by every particle's own value of a parameter, as
    ``observables.npz`` holds it: ``values[i]`` = dq/d(``parameter``[i])."""

    observable: str  # its name: pressure, distance:3,17, file.py:function
    parameter: str  # the per-species parameter made per-particle: diameter
    units: str  # the observable's units, in words (energy / length^2); the derivative's are per θ
    values: np.ndarray  # (N,)


@dataclass(frozen=True)
class RunFiles:
    """A run directory as its files hold it: the relaxed state, structure and sensitivities."""

    path: Path
    positions: np.ndarray  # (N, d) float64 from relaxed.npz
    structure: Structure
    sensitivities: dict[str, np.ndarray]  # parameter name -> dx*/dθ (N, d); empty without sensitivity.npz
    values: dict[str, float]  # parameter name -> θ, from sensitivity.json; empty where it does not say
    # Parameter name -> its sensitivity.json entry (value, max_particle_dx, exactly_zero,
    # resolved, ...; see docs/file-formats.md); empty without the file.
    parameters: dict[str, dict]
    rattlers: np.ndarray | None  # (N,) bool from sensitivity.json; None where it does not say
    recipe: dict | None  # system.toml; None for a run without one (made by hand)
    state: str | None  # the manifest's state; None for a run without a manifest (not checked)
    # Observable name -> its observables.json entry (value, units, gradient, ...); empty without it.
    observables: dict[str, dict] = field(default_factory=dict)
    per_atom: list[PerAtomGradient] = field(default_factory=list)  # from observables.npz


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


def open_run(run_dir: str | os.PathLike) -> tuple[Path, Manifest | None]:
    """``run_dir`` as a path, with its manifest (None for a run without one), after completing
    any commit that a stopped command left unfinished.

    Raises:
        UserError: no such directory, a damaged manifest, or a commit to complete while another
            command writes the run.
    """
    run = run_directory(run_dir)
    recover(run)
    return run, read_manifest(run)


def _rewrite_hint(run: Path, name: str) -> str:
    if name in SENSITIVITY_FILES:
        return f"run `mdsens sensitivity --run {run}` again"
    if name in OBSERVABLE_FILES:
        return f"run `mdsens sensitivity --observable NAME --run {run}` again"
    return f"run `mdsens relax --system {run}/system.toml --out {run}` again"


def verify_run(
    run: Path,
    manifest: Manifest | None,
    recipe: dict | None,
    positions: np.ndarray,
    summary: dict | None,
    observables: dict | None = None,
) -> str | None:
    """Check that the files a reader uses belong together; return the run's state.

    With a manifest: the relaxation files and the sensitivity and observable files it lists must
    be the bytes mdsens wrote, and ``system.toml`` with ``relaxed.npz`` must hash to its state.
    Without one (a run made by hand or by an older mdsens) only the states that
    ``sensitivity.json`` and ``observables.json`` (``summary``, ``observables``) record, if any,
    are compared with the relaxed state; None is returned.

    Raises:
        UserError: the files disagree; the message says which command rewrites them.
    """
    actual = None if recipe is None else state_of(recipe, positions)
    if manifest is not None:
        for name in (*RELAX_FILES, *SENSITIVITY_FILES, *OBSERVABLE_FILES):
            entry = manifest.files.get(name)
            if entry is None:
                if name in RELAX_FILES:
                    raise UserError(f"{run}/manifest.json does not list {name}: {_rewrite_hint(run, name)}")
                continue
            path = run / name
            if not path.is_file() or file_digest(path) != entry.sha256:
                what = "is missing" if not path.is_file() else "is not the file mdsens wrote for this run"
                raise UserError(
                    f"{path} {what} (changed since, or left by an interrupted command): "
                    f"{_rewrite_hint(run, name)}"
                )
        if actual != manifest.state:
            raise UserError(
                f"{run}: system.toml and relaxed.npz are not the state its manifest records: "
                f"{_rewrite_hint(run, 'relaxed.npz')}"
            )
    for name, record in (("sensitivity.json", summary), ("observables.json", observables)):
        recorded = record.get("state") if isinstance(record, dict) else None
        if recorded is not None and actual is not None and recorded != actual:
            raise UserError(
                f"{run}/{name} was computed from another relaxed state than relaxed.npz "
                f"holds: {_rewrite_hint(run, name)}"
            )
    return None if manifest is None else manifest.state


def listed(manifest: Manifest | None, name: str) -> bool:
    """Whether a reader should use the file ``name`` of a run: one its manifest lists, or, in a
    run without a manifest, any."""
    return manifest is None or name in manifest.files


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


def _read_json(path: Path):
    """The value in the JSON file ``path``.

    Raises:
        UserError: the file cannot be read or is not JSON.
    """
    try:
        return json.loads(path.read_text())
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def read_summary(run: Path) -> dict | None:
    """``sensitivity.json`` as a dict; None if the run has none."""
    path = run / "sensitivity.json"
    if not path.is_file():
        return None
    summary = _read_json(path)
    return summary if isinstance(summary, dict) else None


def read_observables_summary(run: Path) -> dict | None:
    """``observables.json`` as a dict; None if the run has none."""
    path = run / "observables.json"
    if not path.is_file():
        return None
    summary = _read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("observables"), dict):
        raise UserError(f"{path} has no table of observables: {_rewrite_hint(run, 'observables.json')}")
    return summary


def read_per_atom(run: Path, summary: dict, n: int) -> list[PerAtomGradient]:
    """The per-particle gradients that ``observables.json`` lists, from ``observables.npz``.

    Raises:
        UserError: the file is missing or unreadable, or an array is missing, not (n,) or not
            finite.
    """
    wanted = []
    for name, entry in summary["observables"].items():
        tables = entry.get("per_particle") if isinstance(entry, dict) else None
        for key, table in (tables or {}).items():
            if not isinstance(table, dict) or not isinstance(table.get("npz_key"), str):
                raise UserError(f"{run}/observables.json: {name} per_particle {key} names no npz_key")
            wanted.append((name, key, str(entry.get("units", "")), table["npz_key"]))
    if not wanted:
        return []
    path = run / "observables.npz"
    try:
        with np.load(path) as data:
            arrays = {npz_key: np.asarray(data[npz_key], dtype=np.float64) for *_, npz_key in wanted}
    except KeyError as error:
        raise UserError(f"{path} has no array {error}: {_rewrite_hint(run, 'observables.npz')}") from None
    except READ_ERRORS as error:
        raise UserError(f"cannot read {path}: {type(error).__name__} {error}") from None
    out = []
    for name, key, units, npz_key in wanted:
        values = arrays[npz_key]
        if values.shape != (n,) or not np.all(np.isfinite(values)):
            raise UserError(f"{path}: array {npz_key!r} is not {n} finite numbers (one per particle)")
        out.append(PerAtomGradient(name, key, units, values))
    return out


def _entries(summary: dict | None) -> dict[str, dict]:
    params = summary.get("parameters") if summary is not None else None
    if not isinstance(params, dict):
        return {}
    return {name: entry for name, entry in params.items() if isinstance(entry, dict)}


def read_parameter_values(run: Path) -> dict[str, float]:
    """Parameter values θ recorded in ``sensitivity.json``; empty where there is none."""
    return _values(read_summary(run))


def _values(summary: dict | None) -> dict[str, float]:
    return {
        name: float(entry["value"])
        for name, entry in _entries(summary).items()
        if isinstance(entry.get("value"), int | float)
    }


def _rattlers(summary: dict | None, n: int) -> np.ndarray | None:
    indices = summary.get("rattlers") if summary is not None else None
    if not isinstance(indices, list) or not all(isinstance(i, int) and 0 <= i < n for i in indices):
        return None
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def read_run(run_dir: str | os.PathLike) -> RunFiles:
    """Everything the figures draw: ``relaxed.npz`` and ``relaxed.extxyz`` (required), and
    ``sensitivity.npz``, ``sensitivity.json``, ``observables.json`` and ``observables.npz``
    where present, checked with :func:`verify_run`."""
    run, manifest = open_run(run_dir)
    positions, _ = read_relaxed(run)
    structure = read_structure(run, len(positions))
    sensitivities = read_sensitivities(run, positions.shape) if listed(manifest, "sensitivity.npz") else {}
    summary = read_summary(run) if listed(manifest, "sensitivity.json") else None
    observables = read_observables_summary(run) if listed(manifest, "observables.json") else None
    recipe = read_recipe(run) if manifest is not None or (run / "system.toml").is_file() else None
    state = verify_run(run, manifest, recipe, positions, summary, observables)
    return RunFiles(
        path=run,
        positions=positions,
        structure=structure,
        sensitivities=sensitivities,
        values=_values(summary),
        parameters={name: entry for name, entry in _entries(summary).items() if name in sensitivities},
        rattlers=_rattlers(summary, len(positions)),
        recipe=recipe,
        state=state,
        observables={} if observables is None else dict(observables["observables"]),
        per_atom=[] if observables is None else read_per_atom(run, observables, len(positions)),
    )
