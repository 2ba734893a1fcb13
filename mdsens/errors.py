"""Errors that mean "the input is wrong", as opposed to bugs.

The CLI turns a :class:`UserError` into a one-line message and exit code 2; anything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: unknown system or parameter, bad override, missing run, bad file."""


class NotConvergedError(RuntimeError):
    """A relaxation stopped at its step cap before reaching ``fmax``."""
