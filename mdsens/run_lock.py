"""One writer at a time per run directory: an exclusive ``flock`` on ``RUN/.lock``.

A second command that wants to write a run while another one holds it does not wait: it stops at
once with a :class:`~mdsens.errors.UserError` that names the holder (waiting behind a relaxation
of unknown length would look like a hang). The lock is reentrant within a process, so a command
that holds its run's lock can call library functions that take it again. The lock file is removed
when the lock is released, so a finished command leaves no trace; taking the lock checks that
the directory is writable, which is why ``mdsens relax`` takes it before relaxing.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdsens.errors import UserError

LOCK = ".lock"

# Run directories whose lock this process holds -> how many nested holders.
_held: dict[Path, int] = {}


def holds_lock(run: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``run``."""
    return Path(os.path.abspath(run)) in _held


@contextmanager
def run_lock(run: str | os.PathLike, command: str, *, create: bool = False) -> Iterator[None]:
    """Hold the write lock of ``run`` (named ``command`` for whoever finds it taken).

    With ``create``, missing directories up to ``run`` are made first, and those that are still
    empty when the lock is released are removed again (a command that fails writes nothing).

    Raises:
        UserError: another process holds the lock, or ``run`` cannot be created or written.
    """
    key = Path(os.path.abspath(run))
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    created = _make_directories(Path(run)) if create else []
    try:
        fd = _acquire(Path(run), command)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # Unlinked while still held: a process that opened the old file re-checks (see _acquire).
        (Path(run) / LOCK).unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(created)


def _make_directories(run: Path) -> list[Path]:
    missing = []
    path = run
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    created = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            created.append(directory)
    except FileExistsError:
        if not run.is_dir():
            _remove_empty(created)
            raise UserError(f"cannot create {run}: a file is in the way") from None
    except OSError as error:
        _remove_empty(created)
        raise UserError(f"cannot create {run}: {error.strerror or error}") from None
    return created


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or gone): neither it nor its parents are ours to remove


def _acquire(run: Path, command: str) -> int:
    if not run.is_dir():
        raise UserError(f"{run} is not a directory")
    path = run / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"cannot write to {run}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{run} is being written by another mdsens command ({holder}): wait until it "
                "ends, or write elsewhere"
            ) from None
        # The holder before us may have removed the file after we opened it; then lock anew.
        try:
            current = os.stat(path)
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if not os.access(run, os.W_OK | os.X_OK):
        path.unlink(missing_ok=True)
        os.close(fd)
        raise UserError(f"cannot write to {run}: permission denied")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, mdsens {command}".encode())
    return fd
