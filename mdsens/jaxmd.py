"""The four JAX-MD modules mdsens uses (space, smap, partition, minimize), loaded on first use.

``from mdsens.jaxmd import space`` gives a stand-in that imports ``jax_md.space`` when one of its
attributes is first read, so that importing mdsens, validating a recipe or listing systems does not
load JAX-MD at all. When it does load, it skips ``jax_md/__init__.py``: that file imports every
JAX-MD submodule (nn, energy, rigid_body, ...), about 10 s on two cores, 7 s of it in
``rigid_body``, none of which mdsens uses; the four modules above alone take under 3 s.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _package_getattr(name: str) -> types.ModuleType:
    """``jax_md.NAME`` for a package registered by :func:`_register_bare_package`: import it now."""
    try:
        return importlib.import_module(f"jax_md.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"jax_md.{name}":
            raise
        raise AttributeError(f"module 'jax_md' has no attribute {name!r}") from None


def _register_bare_package() -> None:
    """Put an unexecuted ``jax_md`` package into ``sys.modules`` unless JAX-MD is already imported.

    It has the real package's spec and search path, so ``import jax_md.space`` finds the real file,
    and a module ``__getattr__``, so that code which later runs ``import jax_md`` and reads
    ``jax_md.energy`` still gets the submodule.
    """
    if "jax_md" in sys.modules:
        return
    spec = importlib.util.find_spec("jax_md")
    if spec is None or spec.submodule_search_locations is None:
        importlib.import_module("jax_md")  # not installed: let Python raise its usual error
        return
    package = importlib.util.module_from_spec(spec)  # sets __spec__, __path__, __file__; runs nothing
    package.__getattr__ = _package_getattr
    sys.modules["jax_md"] = package


def load(name: str) -> types.ModuleType:
    """Import ``jax_md.NAME`` without running ``jax_md/__init__.py`` if JAX-MD is not loaded yet."""
    _register_bare_package()
    return importlib.import_module(f"jax_md.{name}")


class _OnFirstUse(types.ModuleType):
    """Stands for ``jax_md.NAME``: every attribute read is forwarded to the module, imported once."""

    def __init__(self, name: str):
        super().__init__(f"jax_md.{name}")
        self._short_name = name

    def __getattr__(self, attribute: str):
        return getattr(load(self._short_name), attribute)


space = _OnFirstUse("space")
smap = _OnFirstUse("smap")
partition = _OnFirstUse("partition")
minimize = _OnFirstUse("minimize")

__all__ = ["load", "minimize", "partition", "smap", "space"]
