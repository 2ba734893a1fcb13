"""Where runs go and which run is the latest: default run directories that stay in ``results/``,
the refusal to write a run into a directory that is not one, and ``results/.latest-run``.

No JAX here: the commands that run no physics use this module.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mdsens import atomic
from mdsens.errors import UserError
from mdsens.manifest import MANIFEST, STAGE_PREFIX, read_manifest
from mdsens.run_lock import LOCK

if TYPE_CHECKING:
    from mdsens.system import System

RESULTS = Path("results")
LATEST = ".latest-run"


def safe_name(name: object) -> str:
    """``name`` as one path component: letters, digits, ``.``, ``_`` and ``-`` kept, anything
    else (separators, control characters, spaces) replaced by ``_``, leading dots dropped (no
    ``..``, no hidden directory); ``run`` if nothing is left."""
    text = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name)).lstrip(".")
    return text[:100] or "run"


def default_run_dir(system: System) -> Path:
    """``results/<system name>`` (:func:`safe_name`; ``results/run`` for an unnamed system),
    relative to the working directory: whatever the recipe's name says, a directory of
    ``results/``."""
    return RESULTS / safe_name(system.name or "run")


def check_target(run_dir: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to write a run into ``run_dir`` if it is a file, or a directory that holds files
    but no run (no ``manifest.json``), unless ``force``.

    Raises:
        UserError: what is in the way, and how to write the run anyway.
    """
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} exists and is not a directory")
    if force or not run.is_dir() or (run / MANIFEST).exists():
        return run
    others = sorted(p.name for p in run.iterdir() if p.name != LOCK and not p.name.startswith(STAGE_PREFIX))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(
            f"{run} is not an mdsens run (no manifest.json) and is not empty ({shown}): choose a "
            "new or empty directory with --out, or pass --force to add the run's files to it "
            "(mdsens then removes none of the files there)"
        )
    return run


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


def mark_latest(run_dir: str | Path) -> None:
    """Record ``run_dir`` as the run that commands without ``--run`` use (``results/.latest-run``)."""
    atomic.write_text(RESULTS / LATEST, str(Path(run_dir).resolve()))


def relaxed_at(run: str | os.PathLike) -> str:
    """When the run's relaxation was written, as local time ``YYYY-MM-DD HH:MM:SS`` (``unknown``
    for a run without ``relaxed.npz``)."""
    run = Path(run)
    if not (run / "relaxed.npz").is_file():
        return "unknown"
    try:
        manifest = read_manifest(run)
    except UserError:
        manifest = None  # the command that reads the run reports it
    entry = None if manifest is None else manifest.files.get("relaxed.npz")
    if entry is not None:
        when = datetime.datetime.fromisoformat(entry.written)
    else:
        when = datetime.datetime.fromtimestamp((run / "relaxed.npz").stat().st_mtime, datetime.UTC)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")
