"""A run directory's manifest, and the commit that puts a stage's files in place as a whole.

``RUN/manifest.json`` lists every file mdsens wrote for the run, with its content hash, the stage
that wrote it, and the run's ``state``: a hash of the resolved recipe and the relaxed positions
(:func:`state_of`). Files it does not list are not part of the run: readers ignore them, and no
command ever removes them.

A stage (``relax``, ``sensitivity``, ``figures``, ``check``, ``export``) is written in three steps,
under the run's lock (:mod:`mdsens.run_lock`):

1. every new file is written into a hidden staging directory ``RUN/.stage-*``;
2. the new manifest, then ``COMMIT`` (the files to remove and to move in), are written there:
   from this moment on the stage is committed;
3. the files it replaces are removed and the new ones renamed into ``RUN``, the manifest last.

A command stopped before step 2 (error, Ctrl-C, kill) leaves the previous run exactly as it was;
its staging directory is discarded by the next writer. One stopped during step 3 leaves a
committed staging directory, which the next reader or writer completes (:func:`recover`). So
readers see the previous state or the new one, never a mixture.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdsens.errors import READ_ERRORS, UserError
from mdsens.run_lock import holds_lock, run_lock

MANIFEST = "manifest.json"
FORMAT = "mdsens-run/1"
COMMIT = "COMMIT"
STAGE_PREFIX = ".stage-"
STAGES = ("relax", "sensitivity", "figures", "check", "export", "uncertainty", "predict")
# Besides files of the same names, the earlier files that a new stage replaces: a relaxation
# replaces everything (a new state), new sensitivities the figures drawn from the old ones, a new
# uncertainty (or prediction) the old one's files, including a figure the new one does not draw.
REPLACES = {
    "relax": set(STAGES),
    "sensitivity": {"sensitivity", "figures"},
    "uncertainty": {"uncertainty"},
    "predict": {"predict"},
}
# Test hook: "PHASE:FILE" makes a commit stop at PHASE ("staging": some files staged, nothing
# committed; "applying": committed, one file moved in) until FILE exists, so that a test can
# kill the process there. Never set outside tests.
PAUSE_ENV = "MDSENS_TEST_PAUSE"

Writer = Callable[[Path], object]

# Staging directories of this process's commits in progress: recover() leaves them alone.
_active: set[Path] = set()


def state_of(recipe: dict, positions: np.ndarray) -> str:
    """The state of a run: SHA-256 of the resolved recipe (as ``system.toml`` parses) and the
    relaxed positions (float64, bit for bit)."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    array = np.ascontiguousarray(positions, dtype="<f8")
    digest = hashlib.sha256()
    for part in (FORMAT.encode(), text.encode(), repr(array.shape).encode(), array.tobytes()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class Entry:
    """One file of a run: the stage that wrote it, its SHA-256 and when it was written."""

    stage: str
    sha256: str
    written: str


@dataclass(frozen=True)
class Manifest:
    """What ``RUN/manifest.json`` holds."""

    state: str
    files: dict[str, Entry]

    def to_json(self) -> str:
        files = {name: vars(entry) for name, entry in sorted(self.files.items())}
        return json.dumps({"format": FORMAT, "state": self.state, "files": files}, indent=2) + "\n"


def read_manifest(run: Path) -> Manifest | None:
    """The run's manifest; None if it has none (a directory not written by this mdsens).

    Raises:
        UserError: the manifest is damaged.
    """
    path = run / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data["format"] != FORMAT or not isinstance(data["state"], str):
            raise ValueError(f"not an {FORMAT} manifest")
        files = {name: Entry(**entry) for name, entry in data["files"].items()}
    except (*READ_ERRORS, UnicodeDecodeError, TypeError, AttributeError) as error:
        raise UserError(
            f"cannot read {path}: {type(error).__name__} {error}; rerun the command that wrote the run"
        ) from None
    return Manifest(state=data["state"], files=files)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause(phase: str) -> None:
    want, _, release = os.environ.get(PAUSE_ENV, "").partition(":")
    if want != phase or not release:
        return
    print(f"mdsens test pause: {phase}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 600
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def recover(run: Path) -> None:
    """Complete the committed stages that a stopped command left in ``run``; as a writer (one
    that holds the lock), also discard uncommitted ones.

    Raises:
        UserError: a commit needs completing while another command holds the lock.
    """
    writer = holds_lock(run)
    stages = [s for s in run.glob(f"{STAGE_PREFIX}*") if s.is_dir() and _absolute(s) not in _active]
    if not any((s / COMMIT).is_file() for s in stages) and not (writer and stages):
        return
    with run_lock(run, "recover"):
        for stage in sorted(run.glob(f"{STAGE_PREFIX}*")):
            if _absolute(stage) in _active or not stage.is_dir():
                continue
            if (stage / COMMIT).is_file():
                _apply(run, stage)
            else:
                shutil.rmtree(stage, ignore_errors=True)


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _apply(run: Path, stage: Path) -> None:
    commit = json.loads((stage / COMMIT).read_text())
    for name in commit["remove"]:
        (run / name).unlink(missing_ok=True)
    for index, name in enumerate(commit["move"]):
        if (stage / name).exists():  # absent when an earlier, stopped attempt moved it
            os.replace(stage / name, run / name)
        if index == 0:
            _pause("applying")
    _fsync(run)
    shutil.rmtree(stage)


def _unchanged(run: Path, name: str, entry: Entry) -> bool:
    path = run / name
    return path.is_file() and file_digest(path) == entry.sha256


def write_stage(
    directory: str | os.PathLike, stage: str, state: str | None, files: Iterable[tuple[str, Writer]]
) -> list[Path]:
    """Write ``files`` (name, ``writer(path)``) into ``directory`` as one commit; return their paths.

    Each writer is called on its file's path in the staging directory as ``files`` yields it, so
    a generator can draw one figure at a time. With ``state`` the files join the run's manifest:
    ``directory`` must hold a run of that state (for the ``relax`` stage, ``state`` is the new
    one), and the earlier files the stage replaces (:data:`REPLACES`) are removed if they are
    still as mdsens wrote them. Without ``state`` (a directory that is not a run, or a run
    without a manifest) the files are moved in together and nothing else changes.

    Raises:
        UserError: the run holds another state than ``state`` (it was relaxed again meanwhile),
            the directory cannot be written, or its lock is held by another command.
    """
    run = Path(directory)
    with run_lock(run, stage, create=True):
        recover(run)
        staging = _absolute(Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{stage}-", dir=run)))
        _active.add(staging)
        try:
            names = []
            for name, writer in files:
                writer(staging / name)
                _fsync(staging / name)
                names.append(name)
                if len(names) == 1:
                    _pause("staging")
            _commit(run, stage, state, staging, names)
            _apply(run, staging)
        finally:
            _active.discard(staging)
            if staging.exists() and not (staging / COMMIT).exists():
                shutil.rmtree(staging, ignore_errors=True)
    return [run / name for name in names]


def _commit(run: Path, stage: str, state: str | None, staging: Path, names: list[str]) -> None:
    old = read_manifest(run)
    move, remove = list(names), []
    if state is not None:
        if stage != "relax" and (old is None or old.state != state):
            raise UserError(
                f"{run} no longer holds the relaxed state these {stage} files were made from (it "
                f"was relaxed again meanwhile): run the command again on {run}"
            )
        replaced = REPLACES.get(stage, set())
        kept = {} if old is None else {n: e for n, e in old.files.items() if e.stage not in replaced}
        written = _now()
        entries = {**kept, **{n: Entry(stage, file_digest(staging / n), written) for n in names}}
        if old is not None:
            remove = [n for n, e in old.files.items() if n not in entries and _unchanged(run, n, e)]
        (staging / MANIFEST).write_text(Manifest(state=state, files=entries).to_json())
        _fsync(staging / MANIFEST)
        move.append(MANIFEST)
    pending = staging / f"{COMMIT}.tmp"
    pending.write_text(json.dumps({"remove": remove, "move": move}))
    _fsync(pending)
    os.replace(pending, staging / COMMIT)  # the commit point
    _fsync(staging)
