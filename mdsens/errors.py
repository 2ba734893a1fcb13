"""Errors that mean "the input is wrong", as opposed to bugs.

The CLI turns a :class:`UserError` into a one-line message and exit code 2; anything else is a
bug and keeps its traceback.
"""

import zipfile

# What reading a damaged or foreign file raises (NumPy, zipfile, ASE, tomllib): a user error.
READ_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile)


class UserError(ValueError):
    """Bad input from the user: unknown system or parameter, bad override, missing run, bad file."""


class NotConvergedError(RuntimeError):
    """A relaxation stopped at its step cap before reaching ``fmax``."""
