"""``python -m mdsens.cli``: the same command line as the ``mdsens`` console script."""

from . import main

main()
