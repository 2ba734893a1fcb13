"""Commands that run no physics start without JAX-MD: listing systems, help, refusing bad input,
drawing a finished run. Each runs in a fresh interpreter, as a user's shell would start it, and the
interpreter reports which modules it loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

COMMITTED_RUN = Path(__file__).resolve().parents[1] / "results" / "paper"

# Each argv runs in turn through mdsens.cli.main in one interpreter; after each, the script prints
# its exit code and whether jax_md has been imported so far.
SCRIPT = """
import json, sys
from mdsens.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    print("@@" + json.dumps([argv, code, "jax_md" in sys.modules, sorted(sys.modules)]), flush=True)
"""

COMMANDS = ("relax", "sensitivity", "plot", "check", "export", "paper", "systems")


def python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code args`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def run_cli(argvs: list[list[str]], cwd: Path) -> list[tuple[list[str], int, bool, list[str]]]:
    done = python(SCRIPT, json.dumps(argvs), cwd=cwd)
    reports = [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("@@")]
    assert len(reports) == len(argvs), done.stderr[-2000:]
    return [tuple(report) for report in reports]


def test_commands_without_physics_do_not_import_jax_md(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(COMMITTED_RUN, run)
    expected = [
        (["systems"], 0),
        (["--help"], 0),
        *(([command, "--help"], 0) for command in COMMANDS),
        # Bad input: each refused with exit 2 before any physics.
        (["relax", "--set", "n_particles"], 2),  # not KEY=VALUE
        (["relax", "--set", "species.B.diamter=0.7"], 2),  # unknown key
        (["relax", "--set", "potential.r_cutoff=-1"], 2),  # a potential's setting, checked
        (["relax", "--system", "no-such-system"], 2),
        (["sensitivity", "--run", "no-such-run"], 2),
        (["plot", "--run", str(run)], 0),  # draws a finished run from its files
    ]
    reports = run_cli([argv for argv, _ in expected], tmp_path)
    for (argv, code), (_, got, _, _) in zip(expected, reports, strict=True):
        assert got == code, f"mdsens {' '.join(argv)} exited {got}"
    first = next((argv for argv, _, loaded, _ in reports if loaded), None)
    assert first is None, f"mdsens {' '.join(first)} imported JAX-MD"
    # Listing systems and printing help need neither ASE nor Matplotlib (a second each to import).
    after_help = reports[1 + len(COMMANDS)][3]
    assert not {name.split(".")[0] for name in after_help} & {"ase", "matplotlib", "scipy"}
    assert not any(name.startswith("jax_md") for name in reports[-1][3])
    assert (run / "sensitivity-histogram.png").is_file()


def test_the_first_attribute_loads_jax_md_and_a_users_import_still_sees_all_of_it(tmp_path):
    """mdsens loads the four JAX-MD modules it uses without jax_md/__init__.py; a user who then
    imports jax_md still reaches any of its submodules."""
    code = """
import sys
import mdsens.system
assert "jax_md" not in sys.modules
from mdsens.jaxmd import space
space.free()
loaded = sorted(name for name in sys.modules if name.startswith("jax_md"))
assert "jax_md.space" in loaded and "jax_md.rigid_body" not in loaded and "jax_md.nn" not in loaded, loaded
import jax_md
assert callable(jax_md.energy.soft_sphere_pair)
from jax_md import rigid_body
assert rigid_body.RigidBody is not None
try:
    jax_md.no_such_module
except AttributeError:
    print("ok")
"""
    done = python(code, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_jax_md_imported_before_mdsens_is_kept(tmp_path):
    """A program that imported jax_md itself keeps its fully initialised package."""
    code = """
import sys
import jax_md
from mdsens.jaxmd import partition
partition.neighbor_list
assert sys.modules["jax_md"] is jax_md and partition.neighbor_list is jax_md.partition.neighbor_list
print("ok")
"""
    done = python(code, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
