"""The files of ``mdsens uncertainty``: the covariance file it reads, and ``RUN/uncertainty.json``,
``RUN/uncertainty.npz`` and its figures, which it writes.

A covariance file gives Σθ over scalar parameter names (:mod:`mdsens.parameters`), either as
JSON::

    {"names": ["diameter.A", "diameter.B"], "matrix": [[1e-4, 2e-5], [2e-5, 4e-5]]}

or as CSV, a header row of names followed by one row of numbers per name::

    diameter.A,diameter.B
    1e-4,2e-5
    2e-5,4e-5

The suffix (``.json`` or ``.csv``) says which. Entries are covariances in the parameters' units
squared; the matrix is checked by :func:`mdsens.uncertainty.covariance_from_matrix`.

The run's files are committed as one stage, ``uncertainty`` (:func:`mdsens.manifest.write_stage`:
atomically, listed in ``RUN/manifest.json``, tied to the relaxed state they were computed from,
which ``uncertainty.json`` records as ``state``), under the run's lock; the figures are drawn from
the two data files as written (:mod:`mdsens.plot_uncertainty`).

``uncertainty.json``: ``state``, ``inputs`` (the command line's choices), ``parameters`` (value,
std, relative_std by name), ``parameter_covariance`` (names, matrix), ``rattlers`` (indices,
masked), ``warnings``, ``positions`` (``linear`` and ``monte_carlo``: rms/median/max of the per-atom
σ_i = √tr C_i over non-rattlers and the atom of the largest; ``comparison``: atoms compared, and
for ``nominal`` (first order with Σθ) and ``drawn`` (with the sample covariance of the δ drawn)
``ratio_p5``/``ratio_p50``/``ratio_p95`` of σ_MC,i / σ_linear,i and ``rms_ratio``), ``observables``
(value, units, sigma_linear, gradient, sigma_monte_carlo, ratio, ratio_drawn), ``monte_carlo``
(samples, seed,
converged, excluded samples with reasons, contact_changed_samples, sampling_error, prediction_error
‖Δx − J δ‖/‖J δ‖: median, max and max over samples that kept their contacts; steps), ``wall_time``
and ``versions``. Numbers that are not finite are written as null.

``uncertainty.npz``: ``parameter_names`` (P,), ``parameter_values`` (P,), ``parameter_covariance``
(P, P), ``jacobian`` (P, N, d) dx*/dθ, ``covariance`` (N, d, d) the blocks C_i, ``sigma`` (N,),
``sigma_axes`` (N, d), ``rattlers`` (N,), ``observable_names`` / ``observable_values`` /
``observable_sigma`` (Q,), ``observable_gradients`` (Q, P), ``observable_covariance`` (Q, Q); with
the Monte Carlo check also ``mc_covariance`` (N, d, d), ``mc_sigma`` (N,), ``mc_mean`` (N, d),
``mc_observable_sigma`` (Q,), ``sigma_ratio`` and ``sigma_ratio_drawn`` (N,; NaN where not
compared) and per sample
``sample_deltas`` (K, P), ``sample_converged``, ``sample_steps``, ``sample_contact_changes``,
``sample_prediction_error`` (K,) and ``sample_observables`` (K, Q; NaN for samples left out).
Rattlers' rows are 0.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mdsens.errors import READ_ERRORS, UserError
from mdsens.manifest import write_stage
from mdsens.plot import DPI
from mdsens.plot_geometry import RunGeometry
from mdsens.plot_uncertainty import read_uncertainty, uncertainty_figures
from mdsens.relaxation import RelaxResult
from mdsens.run import relaxed_state, versions
from mdsens.run_files import open_run, read_run, run_directory
from mdsens.run_lock import run_lock
from mdsens.system import System
from mdsens.uncertainty import LinearUncertainty, MonteCarlo, Ratios, compare

STAGE = "uncertainty"
JSON = "uncertainty.json"
NPZ = "uncertainty.npz"


def read_covariance(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(names, matrix) from a covariance file (module docstring), not yet checked against a
    system.

    Raises:
        UserError: a missing or unreadable file, an unknown suffix, or contents not of the form
            described.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--cov {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise UserError(f"--cov {path}: give a .json or .csv file (see mdsens uncertainty --help)")
    try:
        text = path.read_text()
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"--cov {path}: cannot read it: {error}") from None
    return _read_json(path, text) if suffix == ".json" else _read_csv(path, text)


def _read_json(path: Path, text: str) -> tuple[list[str], np.ndarray]:
    try:
        data = json.loads(text)
    except ValueError as error:
        raise UserError(f"--cov {path}: not JSON: {error}") from None
    if not isinstance(data, dict) or not {"names", "matrix"} <= set(data):
        raise UserError(f'--cov {path}: expected {{"names": [...], "matrix": [[...], ...]}}')
    names, rows = data["names"], data["matrix"]
    if not isinstance(names, list) or not isinstance(rows, list):
        raise UserError(f'--cov {path}: "names" must be a list of names and "matrix" a list of rows')
    return names, _numbers(path, rows)


def _read_csv(path: Path, text: str) -> tuple[list[str], np.ndarray]:
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        raise UserError(f"--cov {path}: empty; expected a header row of names and a row per name")
    names = [cell.strip() for cell in rows[0]]
    return names, _numbers(path, rows[1:])


def _numbers(path: Path, rows: list) -> np.ndarray:
    """``rows`` as a 2-D float array; a UserError for anything else (ragged, not numbers)."""
    if not all(isinstance(row, list) for row in rows) or len({len(row) for row in rows}) > 1:
        raise UserError(f"--cov {path}: the matrix rows must all be lists of the same length")
    try:
        array = np.array(
            [[float(cell.strip() if isinstance(cell, str) else cell) for cell in row] for row in rows],
            dtype=float,
        )
    except (TypeError, ValueError) as error:
        raise UserError(f"--cov {path}: the matrix must hold numbers only ({error})") from None
    return array.reshape(len(rows), -1)


def _number(value) -> float | None:
    """A float for JSON; None for NaN or infinity (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _sigma_summary(sigma: np.ndarray, atoms: np.ndarray) -> dict:
    """Root-mean-square, median and largest per-atom σ over ``atoms``, and which atom is largest."""
    if not atoms.any():
        return {"rms_sigma": None, "median_sigma": None, "max_sigma": None, "max_sigma_atom": None}
    values = sigma[atoms]
    largest = int(np.flatnonzero(atoms)[np.argmax(values)])
    return {
        "rms_sigma": _number(np.sqrt(np.mean(values**2))),
        "median_sigma": _number(np.median(values)),
        "max_sigma": _number(sigma[largest]),
        "max_sigma_atom": largest,
    }


def _ratio_summary(ratios: Ratios) -> dict:
    return {
        **{f"ratio_p{p:g}": _number(v) for p, v in ratios.percentiles.items()},
        "rms_ratio": _number(ratios.rms_ratio),
    }


def uncertainty_summary(
    system: System, state: str, linear: LinearUncertainty, mc: MonteCarlo | None, inputs: dict
) -> dict:
    """What ``uncertainty.json`` holds (module docstring)."""
    covariance = linear.covariance
    atoms = ~linear.rattlers
    comparison = None if mc is None else compare(linear, mc)
    parameters = {
        name: {
            "value": float(value),
            "std": float(std),
            "relative_std": _number(std / abs(value)) if value else None,
        }
        for name, value, std in zip(covariance.names, covariance.values, covariance.std, strict=True)
    }
    mc_sigma = None if mc is None else mc.observable_sigma
    observables = {}
    for k, (name, entry) in enumerate(linear.observables.items()):
        observables[name] = {
            "value": entry.value,
            "units": entry.units,
            "sigma_linear": entry.sigma,
            "gradient": entry.gradient,
            "sigma_monte_carlo": None if mc is None else _number(mc_sigma[k]),
            "ratio": None if comparison is None else _number(comparison.nominal.observables[name]),
            "ratio_drawn": None if comparison is None else _number(comparison.drawn.observables[name]),
        }
    positions: dict = {"linear": _sigma_summary(linear.sigma, atoms), "monte_carlo": None, "comparison": None}
    monte_carlo = None
    if mc is not None:
        positions["monte_carlo"] = _sigma_summary(mc.sigma, atoms & np.isfinite(mc.sigma))
        positions["comparison"] = {
            "atoms_compared": int(comparison.atoms.sum()),
            "nominal": _ratio_summary(comparison.nominal),
            "drawn": _ratio_summary(comparison.drawn),
        }
        errors = mc.prediction_error[mc.converged]
        kept = mc.prediction_error[mc.converged & (mc.contact_changes == 0)]
        monte_carlo = {
            "samples": len(mc.converged),
            "seed": mc.seed,
            "converged": mc.used,
            "excluded": [{"sample": k, "reason": r} for k, r in enumerate(mc.reasons) if not mc.converged[k]],
            "contact_changed_samples": mc.changed,
            "sampling_error": _number(comparison.sampling_error),
            "prediction_error": {
                "median": _number(np.median(errors)) if errors.size else None,
                "max": _number(np.max(errors)) if errors.size else None,
                "max_without_contact_change": _number(np.max(kept)) if kept.size else None,
            },
            "steps": {
                "median": _number(np.median(mc.steps[mc.converged])) if mc.used else None,
                "max": int(np.max(mc.steps)) if len(mc.steps) else None,
            },
        }
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": system.name,
        "state": state,
        "inputs": inputs,
        "parameters": parameters,
        "parameter_covariance": {"names": list(covariance.names), "matrix": covariance.matrix.tolist()},
        "rattlers": np.flatnonzero(linear.rattlers).tolist(),
        "warnings": linear.warnings,
        "positions": positions,
        "observables": observables,
        "monte_carlo": monte_carlo,
        "wall_time": {"linear": linear.wall_time, "monte_carlo": None if mc is None else mc.wall_time},
        "versions": versions(),
    }


def uncertainty_arrays(linear: LinearUncertainty, mc: MonteCarlo | None) -> dict[str, np.ndarray]:
    """What ``uncertainty.npz`` holds (module docstring)."""
    covariance = linear.covariance
    observables = list(linear.observables.values())
    arrays = {
        "parameter_names": np.array(covariance.names, dtype=str),
        "parameter_values": covariance.values,
        "parameter_covariance": covariance.matrix,
        "jacobian": linear.jacobian,
        "covariance": linear.blocks,
        "sigma": linear.sigma,
        "sigma_axes": linear.sigma_axes,
        "rattlers": linear.rattlers,
        "observable_names": np.array([o.name for o in observables], dtype=str),
        "observable_values": np.array([o.value for o in observables], dtype=float),
        "observable_sigma": np.array([o.sigma for o in observables], dtype=float),
        "observable_gradients": np.array(
            [[o.gradient[n] for n in covariance.names] for o in observables], dtype=float
        ).reshape(len(observables), len(covariance.names)),
        "observable_covariance": linear.observable_covariance,
    }
    if mc is not None:
        comparison = compare(linear, mc)
        arrays.update(
            {
                "mc_covariance": mc.blocks,
                "mc_sigma": mc.sigma,
                "mc_mean": mc.mean,
                "mc_observable_sigma": mc.observable_sigma,
                "sigma_ratio": comparison.nominal.ratio,
                "sigma_ratio_drawn": comparison.drawn.ratio,
                "sample_deltas": mc.deltas,
                "sample_converged": mc.converged,
                "sample_steps": mc.steps,
                "sample_contact_changes": mc.contact_changes,
                "sample_prediction_error": mc.prediction_error,
                "sample_observables": mc.observables,
            }
        )
    return arrays


def save_uncertainty(
    run_dir: str | Path,
    system: System,
    relaxed: RelaxResult,
    linear: LinearUncertainty,
    mc: MonteCarlo | None = None,
    inputs: dict | None = None,
) -> list[Path]:
    """Write ``uncertainty.json``, ``uncertainty.npz`` and the figures (``uncertainty.png``, and
    ``uncertainty-samples.png`` with ``mc``) into the run ``run_dir``, as one commit; return
    their paths.

    ``relaxed`` is the state the uncertainty was computed from: the files are refused unless the
    run still holds it. ``inputs`` (the command line's choices) is recorded as is.

    Raises:
        UserError: the run holds another relaxed state, or its lock is held by another command.
    """
    run = run_directory(run_dir)
    with run_lock(run, STAGE):
        run, manifest = open_run(run)
        positions = np.asarray(relaxed.positions, dtype=np.float64)
        state = relaxed_state(system, positions)
        summary = uncertainty_summary(system, state, linear, mc, inputs or {})
        buffer = io.BytesIO()
        np.savez(buffer, **uncertainty_arrays(linear, mc))
        contents = {JSON: (json.dumps(summary, indent=2) + "\n").encode(), NPZ: buffer.getvalue()}
        geometry = RunGeometry(read_run(run))

        def files() -> Iterator[tuple[str, object]]:
            staged: list[Path] = []
            for name, data in contents.items():
                yield name, lambda path, data=data: (staged.append(path.parent), path.write_bytes(data))
            # Drawn from the files just staged, as a reader of the run would see them.
            data, arrays = read_uncertainty(staged[0])
            for name, figure in uncertainty_figures(geometry, data, arrays):
                yield name, lambda path, figure=figure: figure.savefig(path, dpi=DPI)

        return write_stage(run, STAGE, None if manifest is None else state, files())
