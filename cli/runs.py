"""Which run a command works on: the one ``--run`` names, else the latest run, said on screen."""

from __future__ import annotations

from pathlib import Path


def chosen_run(run: Path | None) -> tuple[Path, str | None]:
    """The run directory to use, and, when ``--run`` was not given, a line that names the run
    taken instead (the latest one may be older than the user thinks: a failed relax marks none).

    Raises:
        UserError: no run exists yet, or ``--run`` names no directory.
    """
    # Imported here, not at the top: run_files loads ASE (a second), and every `mdsens` start
    # (help, systems) imports this module.
    from mdsens.run_files import run_directory
    from mdsens.run_paths import latest_run, relaxed_at

    if run is not None:
        return run_directory(run), None
    latest = run_directory(latest_run())
    return latest, f"No --run given: using {latest}, the latest run (relaxed {relaxed_at(latest)})"
