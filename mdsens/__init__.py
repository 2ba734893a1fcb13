"""mdsens: relax particle systems with JAX-MD and differentiate the relaxed structure x*(θ).

Python API (mirrors the command line)::

    import mdsens
    system = mdsens.load_system("binary-packing", overrides=["n_particles=256"], seed=1)
    relaxed = mdsens.relax(system)                       # FIRE to max|F| <= fmax
    result = mdsens.compute_sensitivity(system, relaxed, ["diameter.B"])
    result.parameters["diameter.B"].dx                   # dx*/dθ, shape (N, d)
    run = mdsens.save_relaxation("results/mine", system, relaxed)
    mdsens.save_sensitivity(run, system, result)
    mdsens.plot_run(run)

    x_star = mdsens.relaxed_positions_fn(system)         # differentiable x*(params, x0)
    jax.grad(lambda p: loss(x_star(p, relaxed.positions)))(system.params)

Importing mdsens switches JAX to float64 (``jax_enable_x64``): derivatives of relaxed states are
meaningless in float32. Nothing else loads at import: each attribute's module loads on first use,
and JAX-MD only when a computation needs it (:mod:`mdsens.jaxmd`), so that listing systems,
printing help or refusing bad input takes about the time of ``import jax``.
"""

import importlib

import jax

jax.config.update("jax_enable_x64", True)

# The one version source: pyproject.toml reads this line by parsing the file (setuptools `attr`).
__version__ = "0.1.0"

_EXPORTS = {
    "load_system": "mdsens.system",
    "build_system": "mdsens.system",
    "System": "mdsens.system",
    "relax": "mdsens.relaxation",
    "Relaxer": "mdsens.relaxation",
    "RelaxResult": "mdsens.relaxation",
    "compute_sensitivity": "mdsens.sensitivity",
    "Sensitivity": "mdsens.sensitivity",
    "relaxed_positions_fn": "mdsens.sensitivity",
    "parameter_names": "mdsens.parameters",
    "with_per_particle": "mdsens.parameters",
    "parse_observable": "mdsens.observables",
    "observable_gradients": "mdsens.observable_gradients",
    "save_relaxation": "mdsens.run",
    "save_sensitivity": "mdsens.run",
    "load_run": "mdsens.run",
    "plot_run": "mdsens.plot",
    "UserError": "mdsens.errors",
    "NotConvergedError": "mdsens.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mdsens' has no attribute {name!r}")
