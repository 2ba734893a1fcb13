"""Writing a prediction (:mod:`mdsens.prediction`): ``predict.json`` and ``predicted.extxyz``.

Into a run they go to ``RUN/predict/``, committed as one stage and listed in the run's manifest
with the relaxed state they were predicted from (:func:`mdsens.manifest.write_stage`, as
:func:`mdsens.run.save_check` does); elsewhere (``--out DIR``) they are written into ``DIR``
together, atomically. ``predict.json`` holds Δθ by parameter name, the predicted energies, the
validity radius along the step and, after ``--verify``, the measured errors.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path

import numpy as np

from mdsens.errors import UserError
from mdsens.manifest import write_stage
from mdsens.prediction import ParameterStep, Prediction, Verification
from mdsens.run import atoms_at, bytes_writer, extxyz_bytes, relaxed_state, vectors3, versions
from mdsens.run_files import open_run
from mdsens.run_lock import run_lock
from mdsens.system import System
from mdsens.validity import Crossing, Validity

FOLDER = "predict"
JSON = "predict.json"
STRUCTURE = "predicted.extxyz"
LISTED_CROSSINGS = 20
"""predict.json lists at most this many of the contacts a step is predicted to change (nearest
first) and counts them all."""


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _verification(verification: Verification) -> dict:
    relaxed, start = verification.relaxed, verification.from_start
    return {
        "converged": verification.converged,
        "energy": relaxed.energy,
        "position_error_max": verification.position_error_max,
        "position_error_rms": verification.position_error_rms,
        "baseline_error_max": verification.baseline_error_max,
        "baseline_error_rms": verification.baseline_error_rms,
        "energy_error_first_order": verification.energy_error_first,
        "energy_error_second_order": verification.energy_error_second,
        "steps_from_prediction": relaxed.steps,
        "steps_from_relaxed": start.steps,
        "steps_saved": verification.steps_saved,
        "fmax": relaxed.fmax,
        "contact_changes": verification.contact_changes,
        "crossed": list(verification.crossed),
        "crossed_particles": verification.crossed_particles,
    }


def _structure(system: System, step: ParameterStep, prediction: Prediction) -> bytes:
    """The predicted structure as extxyz, with θ₁'s parameter values and diameters and the
    predicted displacement dx as a per-atom array."""
    atoms = atoms_at(dataclasses.replace(system, params=step.params), prediction.positions)
    atoms.new_array("predicted_displacement", vectors3(prediction.dx))
    atoms.info["predicted_energy_first_order"] = prediction.energy_first
    atoms.info["predicted_energy_second_order"] = prediction.energy_second
    return extxyz_bytes(atoms)


def save_prediction(
    run_dir: str | Path,
    system: System,
    positions: np.ndarray,
    overrides: list[str],
    step: ParameterStep,
    prediction: Prediction,
    validity: Validity,
    crossings: list[Crossing],
    verification: Verification | None = None,
    out: str | Path | None = None,
) -> list[Path]:
    """Write ``predict.json`` and ``predicted.extxyz`` into ``RUN/predict/`` (listed in the run's
    manifest with the state ``positions`` of ``system``), or into ``out``; return their paths.

    ``predict.json`` holds the relaxed state predicted from (as the run's manifest names it), the
    step, the predicted energies, the validity radius along the step in units of the step (t = 1
    is the requested θ₁), the contacts predicted to change within it, and the verification when
    there is one.

    Raises:
        UserError: the run no longer holds that state (it was relaxed again meanwhile), or
            ``out`` is a file.
    """
    state = relaxed_state(system, positions)
    radius = validity.radius_up
    summary = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": system.name,
        "state": state,
        "overrides": list(overrides),
        "changes": {
            name: {"from": old, "to": new, "delta": new - old} for name, (old, new) in step.changes.items()
        },
        "energy": {
            "relaxed": prediction.energy,
            "first_order": prediction.energy_first,
            "second_order": prediction.energy_second,
            "slope": prediction.slope,
            "curvature": prediction.curvature,
            "first_order_by_parameter": prediction.energy_by_name,
        },
        "max_particle_displacement": float(np.max(np.linalg.norm(prediction.dx, axis=-1)))
        if prediction.dx.size
        else 0.0,
        "solve": {
            "iterations": prediction.iterations,
            "residual": prediction.residual,
            "converged": prediction.converged,
            "wall_time": prediction.wall_time,
        },
        "validity": {
            **validity.to_json(),
            "step_over_radius": 1.0 / radius if radius > 0 else None,
            "within": radius >= 1.0,
            "predicted_crossings": len(crossings),
            "crossings": [
                {"t": c.t, "pair": list(c.pair), "radius": c.radius} for c in crossings[:LISTED_CROSSINGS]
            ],
        },
        "verify": None if verification is None else _verification(verification),
        "structure": STRUCTURE,
        "versions": versions(),
    }
    structure = _structure(system, step, prediction)
    if out is not None:
        target = Path(out)
        if target.exists() and not target.is_dir():
            raise UserError(f"--out {target} exists and is not a directory")
        return write_stage(target, "predict", None, _contents(summary, structure, ""))
    run, manifest = open_run(run_dir)
    with run_lock(run, "predict"):
        # The stage moves its files into RUN/predict/, which must exist by then; a folder made
        # here for a commit that fails is removed again.
        folder = run / FOLDER
        made = not folder.exists()
        folder.mkdir(exist_ok=True)
        try:
            files = _contents(summary, structure, FOLDER)
            return write_stage(run, "predict", None if manifest is None else state, files)
        except BaseException:
            if made and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            raise


def _contents(summary: dict, structure: bytes, folder: str):
    """(name, writer) of the two files, under ``folder`` (the staging directory gets it too)."""

    def inside(data: bytes):
        def write(path: Path) -> None:
            path.parent.mkdir(exist_ok=True)
            bytes_writer(data)(path)

        return write

    prefix = f"{folder}/" if folder else ""
    return [
        (prefix + JSON, inside((json.dumps(summary, indent=2) + "\n").encode())),
        (prefix + STRUCTURE, inside(structure)),
    ]
