"""Experiments that regenerate committed results: ``python -m mdsens.experiments.<name>``.

* :mod:`mdsens.experiments.paper` — the seed paper's experiment (Blondel et al. 2022): dx*/dθ
  of the 128-particle packing, and implicit differentiation against unrolled autodiff and finite
  differences (accuracy, wall time, peak memory), written to ``results/paper/``.
"""
