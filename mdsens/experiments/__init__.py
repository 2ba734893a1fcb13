"""Experiments that regenerate committed results, each behind a ``mdsens`` command.

* :mod:`mdsens.experiments.paper` (``mdsens paper``) — the seed paper's experiment (Blondel et
  al. 2022): dx*/dθ of the 128-particle packing, and implicit differentiation against unrolled
  autodiff and finite differences (accuracy, wall time, peak memory), committed in
  ``results/paper/``; its tables and summary in :mod:`~mdsens.experiments.paper_files`, its
  figures in :mod:`~mdsens.experiments.paper_figures`.
"""
