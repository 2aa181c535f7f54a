"""What only builds and measures the models; the node never imports it.

The top of :mod:`analysis` is what the node runs (slides, cells, framing, the classifiers,
uncertainty, review, heatmaps); this package is everything that makes the shipped weights and
calibration and the numbers of the model card:

- datasets: :mod:`~analysis.training.pbc` (PBC single cells and their splits),
  :mod:`~analysis.training.labs` (every lab's cells, framed the one way);
- training: :mod:`~analysis.training.train` (the diffusion classifier, ``cytonode train``),
  :mod:`~analysis.training.reference_train` (the EfficientNet-Lite0 reference),
  :mod:`~analysis.training.baseline_train` (the small CNN);
- calibration and evaluation: :mod:`~analysis.training.evaluate` (``cytonode evaluate``: PBC
  val calibration, PBC test, aml_dev, leave-one-class-out),
  :mod:`~analysis.training.evaluate_labs` (per lab and leave-one-lab-out),
  :mod:`~analysis.training.adaptation` (test-time adaptation measured on unseen labs);
- the review rule: :mod:`~analysis.training.review_signals` (per-cell signals) and
  :mod:`~analysis.training.review_rule` (the rule chosen on val);
- figures: :mod:`~analysis.training.plots` (model card and framing contact sheet).

Modules with a command line run as ``python -m analysis.training.<module>``.
``tests/analysis/test_layout.py`` checks that the node's run-time modules load none of this.
"""
