"""Atomic file writes: a result file is either complete or absent, never half-written.

Every writer goes to a temporary file in the destination directory, which is renamed into place
only once all the files of a stage are written (``os.replace`` is atomic on POSIX), so an
interrupted or failed run leaves the earlier result as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

Writer = Callable[[Path], object]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_all(writers: dict[Path, Writer]) -> None:
    """Call each ``writer(tmp_path)``; only if all succeed, rename every file into place.

    A temporary file keeps its destination's suffix, so writers that pick a format from the file
    name (ASE, matplotlib, NumPy) behave as they would on the destination itself.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, writer in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
            os.close(fd)
            staged.append((Path(tmp), path))
            writer(Path(tmp))
            # mkstemp creates files readable by the owner only; results are for sharing.
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_with(path: str | os.PathLike, writer: Writer) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    write_all({Path(path): writer})


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_with(path, lambda tmp: tmp.write_text(text))
