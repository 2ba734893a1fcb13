"""The files of ``mdsens design``: the target structure it reads, and what it writes into
``RUN/design/`` (or ``--out``), committed together (:func:`mdsens.manifest.write_stage`: all the
files or none; the directory is not a run and has no manifest of its own).

* ``history.csv``: one row per trial of the outer loop (:class:`mdsens.design.DesignStep`):
  ``step, attempt, accepted, loss, grad_norm, inner_steps, converged, contact_changes,
  basin_jump``, a column per parameter value (per-particle parameters: ``diameter[mean]``,
  ``diameter[min]``, ``diameter[max]``), and ``note``.
* ``design.json``: the inputs, the final values (per-particle: every particle's), loss, gradient
  norm, reason for stopping, whether it converged, counts (steps, trials, rejected, basin jumps,
  failed inner relaxations), relaxation engines, wall time, versions.
* ``design.extxyz``: the final relaxed structure, with per-atom ``type``, ``diameter`` (every
  particle's own value) and ``radius``, and the parameter values in the header.
* ``system.toml``: the recipe at the final parameters with ``design.extxyz`` as its structure:
  ``mdsens relax --system DIR/system.toml`` starts from the designed state and reproduces it.
  For per-particle designs the diameters come from the file's per-atom array (the recipe sets
  none for that parameter).
* ``design-loss.png``, ``design-parameters.png``, ``design-structure.png``: drawn from the files
  above (:mod:`mdsens.plot_design`).
"""

from __future__ import annotations

import copy
import csv
import datetime
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import ase
import ase.io
import numpy as np

from mdsens.design import DesignResult
from mdsens.errors import UserError
from mdsens.manifest import write_stage
from mdsens.parameters import parameter_names, parameter_value
from mdsens.plot_design import FIXED
from mdsens.recipe import dump_recipe
from mdsens.run import versions
from mdsens.structures import read_structure, species_of
from mdsens.system import System

STAGE = "design"
HISTORY = "history.csv"
JSON = "design.json"
STRUCTURE = "design.extxyz"
RECIPE = "system.toml"


def read_target(system: System, path: str | Path, index: int = -1) -> np.ndarray:
    """The (N, d) positions of a target structure (any format ``ase.io.read`` reads).

    Raises:
        UserError: unreadable file, another atom count, other species in another order, or
            (for a periodic system) another cell.
    """
    atoms = read_structure(path, index)
    if len(atoms) != system.n_particles:
        raise UserError(f"--target {path}: {len(atoms)} atoms, but the system has {system.n_particles}")
    species, types = species_of(atoms)
    named = [species[t] for t in types]
    expected = [system.species[t] for t in system.types]
    if named != expected:
        first = next(i for i, (a, b) in enumerate(zip(named, expected, strict=True)) if a != b)
        raise UserError(
            f"--target {path}: atom {first} is {named[first]}, but the system's atom {first} is"
            f" {expected[first]}: give the same atoms in the same order"
        )
    d = system.dimension
    if np.any(system.cell):
        # The design keeps the system's cell: a target relaxed in another one (a packing at fixed
        # φ whose diameters changed has another box) is out of reach of any θ.
        cell = np.asarray(atoms.cell.array[:d, :d], dtype=np.float64)
        if not np.allclose(cell, system.cell, rtol=1e-6, atol=1e-9):
            raise UserError(
                f"--target {path}: its cell {_sides(cell)} is not the run's {_sides(system.cell)}:"
                " a design keeps the run's cell, so relax the target in it (for a packing whose"
                " diameters change: mdsens relax --set box.side=L)"
            )
    positions = np.asarray(atoms.positions[:, :d], dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise UserError(f"--target {path}: positions are not all finite")
    return positions


def _sides(cell: np.ndarray) -> str:
    """A cell in a few characters: its side lengths where it is orthorhombic."""
    if np.allclose(cell, np.diag(np.diag(cell))):
        return " × ".join(f"{v:.6g}" for v in np.diag(cell))
    return np.array2string(cell, precision=6)


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def history_text(result: DesignResult) -> str:
    """``history.csv`` (module docstring)."""
    columns = list(result.history[0].values)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*FIXED, *columns, "note"])
    for e in result.history:
        row = [e.step, e.attempt, int(e.accepted), repr(e.loss), repr(e.grad_norm), e.inner_steps]
        row += [int(e.converged), e.contact_changes, int(e.basin_jump)]
        writer.writerow(row + [repr(e.values[c]) for c in columns] + [e.note])
    return buffer.getvalue()


def design_summary(system: System, result: DesignResult, inputs: dict) -> dict:
    """What ``design.json`` holds (module docstring)."""
    trials = result.history[1:]
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": system.name,
        "inputs": inputs,
        "values": result.values,
        "start_values": result.history[0].values,
        "per_particle": {k: v.tolist() for k, v in result.per_particle.items()},
        "loss": _number(result.loss),
        "start_loss": _number(result.history[0].loss),
        "grad_norm": _number(result.grad_norm),
        "reason": result.reason,
        "converged": result.converged,
        "steps": result.steps,
        "trials": len(trials),
        "rejected": sum(not e.accepted for e in trials),
        "basin_jumps": sum(e.basin_jump for e in trials),
        "failed_relaxations": sum(not e.converged for e in trials),
        "contact_changes_accepted": sum(e.contact_changes for e in trials if e.accepted),
        "engines": result.engines,
        "wall_time": result.wall_time,
        "versions": versions(),
    }


def final_atoms(system: System, result: DesignResult, target: np.ndarray | None = None) -> ase.Atoms:
    """The final structure with its per-atom values (and, given a target, ``target_displacement``)."""
    atoms = system.atoms.copy()
    positions = np.zeros((system.n_particles, 3))
    positions[:, : system.dimension] = result.positions
    atoms.positions = positions
    atoms.arrays["type"] = system.types.astype(int)
    atoms.info["species_names"] = ",".join(system.species)
    atoms.info["system"] = system.name
    atoms.info["potential"] = system.potential.name
    if "diameter" in result.params:
        own = result.per_particle.get("diameter")
        diameters = np.asarray(result.params["diameter"])[system.types] if own is None else own
        atoms.arrays["diameter"] = np.asarray(diameters, dtype=np.float64)
        atoms.arrays["radius"] = atoms.arrays["diameter"] / 2
    if target is not None:
        import jax
        import jax.numpy as jnp

        d = np.asarray(jax.vmap(system.displacement)(jnp.asarray(result.positions), jnp.asarray(target)))
        shown = np.zeros((system.n_particles, 3))
        shown[:, : system.dimension] = d - d.mean(axis=0)
        atoms.arrays["target_displacement"] = shown
    for name in parameter_names(system):
        atoms.info[name] = parameter_value(system, result.params, name)
    return atoms


def design_recipe(system: System, result: DesignResult, structure: Path) -> dict:
    """The recipe at the final parameters, positions from ``structure`` (module docstring)."""
    recipe = copy.deepcopy(system.recipe)
    for key in ("box", "lattice", "n_particles", "dimension", "structure_index"):
        recipe.pop(key, None)
    recipe["structure"] = str(structure.resolve())
    recipe["rattle"] = 0.0
    recipe["description"] = f"designed by mdsens design from {system.name}"
    per_particle = set(result.per_particle)
    for name, spec in system.potential.parameters.items():
        values = np.asarray(result.params[name])
        if spec.level != "species":
            recipe.setdefault("potential", {})[name] = float(values)
            continue
        recipe.get("potential", {}).pop(name, None)
        for t, species in enumerate(system.species):
            table = recipe.setdefault("species", {}).setdefault(species, {})
            table.pop("fraction", None)
            if name in per_particle:
                table.pop(name, None)  # from the structure's per-atom array
            else:
                table[name] = float(values[t])
    for pair, table in recipe.get("pairs", {}).items():
        a, b = pair.split("-")
        for name in table:
            table[name] = parameter_value(system, result.params, f"{name}.{a}-{b}")
    return recipe


def save_design(
    out: str | Path, system: System, result: DesignResult, inputs: dict, target: np.ndarray | None = None
) -> list[Path]:
    """Write the design's files (module docstring) into ``out`` as one commit; return their paths.

    Raises:
        UserError: ``out`` exists and is not a directory, or cannot be written.
    """
    from mdsens.plot import DPI
    from mdsens.plot_design import design_figures

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    buffer = io.StringIO()
    ase.io.write(buffer, final_atoms(system, result, target), format="extxyz")
    contents = {
        HISTORY: history_text(result).encode(),
        JSON: (json.dumps(design_summary(system, result, inputs), indent=2) + "\n").encode(),
        STRUCTURE: buffer.getvalue().encode(),
        RECIPE: dump_recipe(design_recipe(system, result, out / STRUCTURE)).encode(),
    }

    def files() -> Iterator[tuple[str, object]]:
        staged: list[Path] = []
        for name, data in contents.items():
            yield name, lambda path, data=data: (staged.append(path.parent), path.write_bytes(data))
        # Drawn from the files just staged, as a reader of the directory would see them.
        for name, figure in design_figures(staged[0]):
            yield name, lambda path, figure=figure: figure.savefig(path, dpi=DPI)

    return write_stage(out, STAGE, None, files())
