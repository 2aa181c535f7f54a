"""Slide-level quality check: is this slide inside the domain the model was validated on?

A slide is *outside the validated domain* when

* its red cells do not measure about 7.5 um at the slide's pixel spacing (the scale
  check of :func:`analysis.crops.slide_scale_check` failed: wrong spacing in the
  header, another magnification, or not a blood smear), or
* its white cells as a whole lie far from every training class in the reference
  network's feature space: the median "unlike any training class" distance of the
  slide's cells (after the site calibration's shift, when there is one) is above
  ``slide_feature_threshold`` of the review rule, chosen on val as a margin above the
  largest per-lab median of the val labs (another stain, a smear this lab was never
  calibrated for, or a slide made mostly of cells of no trained class), or
* its site's calibration found the node reading the cells the site's staff named below the
  accuracy it is validated for (``calibrate-site --labelled``:
  :attr:`analysis.site.SiteCalibration.below_validated_accuracy`), or found far more of the
  site's unlabelled cells unsure than at any validated lab
  (:attr:`analysis.site.SiteCalibration.too_many_unsure`).

Every cell of such a slide goes to review (reason ``outside-validated-domain``), and
the SR, the viewer, the demo output and ``status --json`` say so with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Fewer cells than this say too little about the slide's cells as a whole.
MIN_CELLS_FOR_DISTRIBUTION = 10
#: The slide threshold is this multiple of a reference median: the largest val lab's
#: (chosen by :mod:`analysis.training.review_rule`) or a site calibration's own.
SLIDE_MARGIN = 1.25


@dataclasses.dataclass(frozen=True)
class DomainCheck:
    """``inside``: ``True`` inside, ``False`` outside, with every reason in words."""

    inside: bool
    reasons: tuple[str, ...]
    median_feature_distance: float | None

    @property
    def summary(self) -> str:
        """One line for the SR's parameters, logs and ``status --json``."""
        if self.inside:
            return "inside the validated domain"
        return "outside the validated domain: " + "; ".join(self.reasons)


def check_domain(scale_ok: bool | None, red_cell_diameter_um: float | None,
                 feature_distance: np.ndarray | None, slide_feature_threshold: float | None,
                 site: Any = None) -> DomainCheck:
    """Apply the checks (see the module docstring); ``site``: the site calibration used."""
    reasons = [] if site is None else list(site.outside_reasons)
    if scale_ok is False:
        reasons.append(f"red cells measure {red_cell_diameter_um:.1f} um at the slide's pixel "
                       f"spacing, expected about 7.5 um")
    median = None
    if feature_distance is not None and len(feature_distance) >= MIN_CELLS_FOR_DISTRIBUTION:
        median = float(np.median(feature_distance))
        if slide_feature_threshold is not None and median > slide_feature_threshold:
            reasons.append(f"its white cells look unlike every calibrated site (median distance "
                           f"{median:.1f} > {slide_feature_threshold:.1f})")
    return DomainCheck(inside=not reasons, reasons=tuple(reasons), median_feature_distance=median)


def slide_threshold(rule_threshold: float | None, site: Any = None) -> float | None:
    """The slide check's threshold: a margin above the site calibration's own median distance,
    else the review rule's (``None``: the distribution is not checked)."""
    if site is not None and site.median_distance > 0:
        return SLIDE_MARGIN * float(site.median_distance)
    return rule_threshold


def headline(parameters: Mapping[str, Any]) -> str | None:
    """The one line a person reads first about a result's slide check (``None`` for results
    written before the check existed), from the result's provenance parameters."""
    verdict = parameters.get("validated_domain")
    if not verdict:
        return None
    verdict = str(verdict)
    return ("WARNING: this slide is " if verdict.startswith("outside") else "slide check: ") + verdict
