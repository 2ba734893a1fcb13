"""An ensemble's files: one atomic file per finished member (what ``--resume`` keeps), and the
table, arrays and statistics written together at the end.

``RUN/members/NNNNNN.npz``: one member, written atomically (:func:`mdsens.atomic.write_with`) as
soon as it is done: its arrays (``positions``, ``dx/<param>``) and ``meta``, a JSON string with
its seed, swept values, outcome and scalars and the ``key`` (a hash of everything that defines
it: resolved recipe, seed, parameters, observables). ``--resume`` reuses a member file whose key
matches and recomputes any other.

``RUN/ensemble.csv`` (one row per member), ``RUN/ensemble.npz`` (arrays stacked over members,
key ``positions`` or ``dx/<param>``, shape (M, N, d); NaN for a failed member) and
``RUN/ensemble.json`` (the ensemble's definition, the statistics per sweep point, the failed
members with their reasons, timings, versions) are committed together
(:func:`mdsens.manifest.write_stage`): a reader sees all three of one ensemble or none.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from mdsens import atomic
from mdsens.errors import READ_ERRORS, UserError
from mdsens.manifest import write_stage

MEMBERS = "members"
TABLE = "ensemble.csv"
ARRAYS = "ensemble.npz"
SUMMARY = "ensemble.json"
FIXED_COLUMNS = ("member", "seed")
OUTCOME_COLUMNS = ("converged", "path", "reason")


def member_key(recipe: dict, names: list[str], observables: list[str]) -> str:
    """A hash of what defines a member (its resolved recipe includes its seed and swept values)."""
    text = json.dumps(
        {"recipe": recipe, "names": names, "observables": observables}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def member_path(run: Path, index: int) -> Path:
    return Path(run) / MEMBERS / f"{index:06d}.npz"


def write_member(run: Path, index: int, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write one member's file atomically (complete or absent)."""

    def writer(path: Path) -> None:
        np.savez(path, meta=np.asarray(json.dumps(meta)), **arrays)

    atomic.write_with(member_path(run, index), writer)


def read_member(run: Path, index: int, key: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """A member's stored ``(meta, arrays)`` if its file exists and was made with ``key``."""
    path = member_path(run, index)
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except (*READ_ERRORS, ValueError, KeyError):
        return None  # unreadable: recomputed
    return (meta, arrays) if meta.get("key") == key else None


def existing_members(run: Path) -> bool:
    """Whether ``run`` already holds member files or an ensemble table."""
    run = Path(run)
    return (run / TABLE).exists() or any((run / MEMBERS).glob("*.npz"))


def table_text(rows: list[dict], columns: list[str]) -> str:
    """The CSV of ``rows``: numbers at full precision (``repr``), empty where missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _cell(row[c]) for c in columns])
    return buffer.getvalue()


def _cell(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_table(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``RUN/ensemble.csv`` as its columns and rows of strings.

    Raises:
        UserError: no table in ``run``.
    """
    path = Path(run) / TABLE
    if not path.is_file():
        raise UserError(f"{run} holds no {TABLE}: run `mdsens ensemble --out {run}` first")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def read_summary(run: Path) -> dict:
    """``RUN/ensemble.json``."""
    path = Path(run) / SUMMARY
    if not path.is_file():
        raise UserError(f"{run} holds no {SUMMARY}: run `mdsens ensemble --out {run}` first")
    return json.loads(path.read_text())


def stacked_arrays(members: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every member's arrays stacked along a first axis; NaN where a member lacks one."""
    keys = sorted({k for m in members for k in m})
    out = {}
    for key in keys:
        shape = next(m[key].shape for m in members if key in m)
        out[key] = np.stack([m.get(key, np.full(shape, np.nan)) for m in members])
    return out


def write_results(run: Path, rows: list[dict], columns: list[str], arrays: dict, summary: dict) -> list[Path]:
    """Commit ``ensemble.csv``, ``ensemble.npz`` and ``ensemble.json`` together into ``run``."""

    def npz(path: Path) -> None:
        np.savez(path, **arrays)

    files = [
        (TABLE, lambda path: path.write_text(table_text(rows, columns))),
        (ARRAYS, npz),
        (SUMMARY, lambda path: path.write_text(json.dumps(summary, indent=2, default=_json) + "\n")),
    ]
    return write_stage(run, "ensemble", None, files)


def _json(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
