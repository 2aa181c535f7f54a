"""What the analysis of one slide produces: plain, frozen, validated dataclasses.

No DICOM, no torch: the viewer and the encoders in ``dicom_node.encode`` load
these without loading a model. Geometry is in *image coordinates* of the total
pixel matrix of the base (highest resolution) level: ``(x, y) = (column, row)``
in pixels, with ``(0, 0)`` at the top left corner of the top left pixel, so the
centre of that pixel is ``(0.5, 0.5)`` (the convention of 2D SCOORD graphic
data, PS3.3 C.10.5.1.2).

Once a constructor returns, the object is valid: every ``__post_init__`` raises
:class:`ValueError` (or :class:`TypeError`) naming the argument and the rule.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from analysis.classes import CLASS_NAMES, CellClassValues

#: Two-sided 95 % standard normal quantile, ``Phi^-1(0.975)``.
Z_95 = 1.959963984540054

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1


class FlagReasonValues(str, enum.Enum):
    """Why a cell was flagged for review or as suspected abnormal."""

    HIGH_UNCERTAINTY = "high-uncertainty"
    """The posterior uncertainty is above the threshold calibrated on the val split."""

    HIGH_ANOMALY_SCORE = "high-anomaly-score"
    """Even the best class explains the cell poorly (anomaly score above its threshold)."""

    SIGNIFICANT_CLASS = "significant-class"
    """The cell was called a clinically significant class (immature granulocyte,
    erythroblast), which always goes to a person, as analysers do."""

    MODELS_DISAGREE = "models-disagree"
    """The diffusion classifier and the discriminative reference call different classes."""

    OUTSIDE_DOMAIN = "outside-validated-domain"
    """The slide as a whole is outside the validated domain (scale check failed, or
    its cells look unlike every calibrated site): every cell goes to review."""


#: What a person reads for each reason (viewer, demo, PDF, the SR's code meanings).
FLAG_REASON_LABELS: Mapping[FlagReasonValues, str] = types.MappingProxyType({
    FlagReasonValues.HIGH_UNCERTAINTY: "uncertain",
    FlagReasonValues.HIGH_ANOMALY_SCORE: "unlike any training class",
    FlagReasonValues.SIGNIFICANT_CLASS: "significant class",
    FlagReasonValues.MODELS_DISAGREE: "models disagree",
    FlagReasonValues.OUTSIDE_DOMAIN: "outside the validated domain",
})


class HeatmapKindValues(str, enum.Enum):
    """What a heatmap grid shows."""

    COUNTERFACTUAL_EVIDENCE = "counterfactual-evidence"
    """Where the predicted class explains the cells better than the runner-up."""

    ANOMALY = "anomaly"
    """Where the cells are explained poorly by every class."""


def _check_uid(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not _UID_RE.match(value):
        raise ValueError(f"{name} must be a valid UID (PS3.5 9.1, at most 64 characters), not {value!r}")
    return value


def _check_finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, not {value!r}")
    return float(value)


def _check_unit_interval(value: Any, name: str) -> float:
    number = _check_finite(value, name)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], not {number}")
    return number


def wilson_interval(count: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``count / total``.

    Parameters
    ----------
    count:
        Number of successes, ``0 <= count <= total``.
    total:
        Number of trials, at least 1.
    z:
        Standard normal quantile of the confidence level (1.96 for 95 %).

    Returns
    -------
    tuple[float, float]
        Lower and upper limit as proportions in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``total < 1`` or ``count`` is outside ``[0, total]``.
    """
    if total < 1:
        raise ValueError(f"total must be at least 1 for an interval, not {total}")
    if not 0 <= count <= total:
        raise ValueError(f"count must lie in [0, total={total}], not {count}")
    p = count / total
    z2 = z * z
    denominator = 1.0 + z2 / total
    centre = (p + z2 / (2.0 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / total + z2 / (4.0 * total * total))
    # At count == 0 (or total) the exact limit is 0 (or 1); rounding must not cross it.
    lower = 0.0 if count == 0 else max(0.0, centre - half)
    upper = 1.0 if count == total else min(1.0, centre + half)
    return lower, upper


@dataclasses.dataclass(frozen=True)
class ClassCount:
    """One line of the differential: how many cells of one class, out of how many.

    The percentage is ``100 * count / total`` with ``total`` the number of all
    classified cells on the slide (every class, erythroblasts and platelets
    included), so the eight percentages add up to 100.

    The 95 % confidence interval is the **Wilson score interval** (Wilson 1927).
    A manual or automated differential counts 100 to a few hundred cells, and the
    rare classes (basophils, eosinophils, immature granulocytes) have counts of
    0 to 5. There the textbook Wald interval ``p +/- 1.96 sqrt(p(1-p)/n)`` fails:
    it has width 0 at a count of 0 and covers the true proportion far less often
    than 95 %. The Wilson interval stays inside [0, 1], has a useful upper limit at
    a count of 0 and has close to nominal coverage for small ``n`` and extreme
    ``p`` (Brown, Cai and DasGupta, Statistical Science 2001), without the
    over-wide intervals of the exact Clopper-Pearson interval.

    Parameters
    ----------
    label:
        The class.
    count:
        Cells of that class, ``0 <= count <= total``.
    total:
        All classified cells on the slide.
    """

    label: CellClassValues
    count: int
    total: int

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "label", CellClassValues(self.label))
        except ValueError:
            raise ValueError(f"label must be one of {', '.join(CLASS_NAMES)}, not {self.label!r}") from None
        for name in ("count", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            object.__setattr__(self, name, int(value))
        if self.total < 0:
            raise ValueError(f"total must be 0 or more, not {self.total}")
        if not 0 <= self.count <= self.total:
            raise ValueError(f"count must lie in [0, total={self.total}], not {self.count}")

    @property
    def percentage(self) -> float | None:
        """``100 * count / total``; ``None`` when no cell was classified."""
        return None if self.total == 0 else 100.0 * self.count / self.total

    @property
    def confidence_interval(self) -> tuple[float, float] | None:
        """95 % Wilson score interval of the percentage, in percent; ``None`` if ``total == 0``."""
        if self.total == 0:
            return None
        lower, upper = wilson_interval(self.count, self.total)
        return 100.0 * lower, 100.0 * upper


def differential(labels: list[CellClassValues] | tuple[CellClassValues, ...]) -> tuple[ClassCount, ...]:
    """Count the cells per class, in the fixed class order of :data:`CLASS_NAMES`.

    Parameters
    ----------
    labels:
        The class of each cell.

    Returns
    -------
    tuple[ClassCount, ...]
        One entry per class (also for classes with no cell).
    """
    values = [CellClassValues(label) for label in labels]
    return tuple(ClassCount(c, sum(1 for v in values if v is c), len(values)) for c in CellClassValues)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One white cell found and classified on the slide.

    Parameters
    ----------
    cell_id:
        Number of the cell on the slide, 0 or more, unique within a :class:`SlideResult`.
    x, y:
        Centre of the cell in image coordinates of the base level (see module docstring).
    outline:
        Polygon around the cell, at least 3 distinct vertices ``(x, y)``, not
        closed (the first vertex is not repeated at the end).
    bbox:
        Bounding box ``(x0, y0, x1, y1)`` in base-level pixels, ``x0 < x1``, ``y0 < y1``.
    area_um2:
        Area of the cell in square micrometres, positive.
    label:
        The class (one of :data:`analysis.classes.CLASS_NAMES`).
    probabilities:
        Posterior probability of every class (all eight keys), each in [0, 1], summing to 1.
    uncertainty:
        Normalised uncertainty in [0, 1] (0 certain, 1 uniform posterior).
    anomaly_score:
        How badly even the best class explains the cell (finite; higher is more anomalous).
    review, review_reason, review_reasons:
        Whether the cell needs a person's review, and why: every reason that applies
        (``review_reasons``, in the order of :class:`FlagReasonValues`) and the first of
        them (``review_reason``). Give either; a reason exactly when flagged.
    abnormal, abnormal_reason:
        Whether the cell is suspected abnormal (for example a blast), and why. The
        analysis also sends every suspected abnormal cell to review.
    diffusion_label, reference_label:
        The class each model called on its own (the diffusion classifier and the
        discriminative second model), where the analysis had both: what a reviewer reads
        behind "models disagree" or a significant class the reported class is not.
    """

    cell_id: int
    x: float
    y: float
    outline: tuple[tuple[float, float], ...]
    bbox: tuple[int, int, int, int]
    area_um2: float
    label: CellClassValues
    probabilities: Mapping[str, float]
    uncertainty: float
    anomaly_score: float
    review: bool = False
    review_reason: FlagReasonValues | None = None
    abnormal: bool = False
    abnormal_reason: FlagReasonValues | None = None
    review_reasons: tuple[FlagReasonValues, ...] = ()
    diffusion_label: CellClassValues | None = None
    reference_label: CellClassValues | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cell_id, bool) or not isinstance(self.cell_id, (int, np.integer)):
            raise TypeError(f"cell_id must be an int, not {type(self.cell_id).__name__}")
        if self.cell_id < 0:
            raise ValueError(f"cell_id must be 0 or more, not {self.cell_id}")
        object.__setattr__(self, "cell_id", int(self.cell_id))
        object.__setattr__(self, "x", _check_finite(self.x, "x"))
        object.__setattr__(self, "y", _check_finite(self.y, "y"))
        try:
            outline = tuple((float(p[0]), float(p[1])) for p in self.outline if len(p) == 2)
        except (TypeError, ValueError):
            raise ValueError("outline must be a sequence of (x, y) pairs") from None
        if len(outline) != len(self.outline) or not all(math.isfinite(v) for p in outline for v in p):
            raise ValueError("outline must be a sequence of finite (x, y) pairs")
        if len(set(outline)) < 3:
            raise ValueError(f"outline must have at least 3 distinct vertices, not {len(set(outline))}")
        if outline[0] == outline[-1]:
            raise ValueError("outline must not be closed: do not repeat the first vertex at the end")
        object.__setattr__(self, "outline", outline)
        if len(self.bbox) != 4:
            raise ValueError(f"bbox must be (x0, y0, x1, y1), not {self.bbox!r}")
        x0, y0, x1, y1 = (int(v) for v in self.bbox)
        if (x0, y0, x1, y1) != tuple(self.bbox):
            raise ValueError(f"bbox must hold integers, not {self.bbox!r}")
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"bbox must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, not {self.bbox!r}")
        object.__setattr__(self, "bbox", (x0, y0, x1, y1))
        if not (x0 <= self.x <= x1 and y0 <= self.y <= y1):
            raise ValueError(f"the centre ({self.x}, {self.y}) must lie inside bbox {self.bbox}")
        area = _check_finite(self.area_um2, "area_um2")
        if area <= 0:
            raise ValueError(f"area_um2 must be positive, not {area}")
        object.__setattr__(self, "area_um2", area)
        try:
            object.__setattr__(self, "label", CellClassValues(self.label))
        except ValueError:
            raise ValueError(f"label must be one of {', '.join(CLASS_NAMES)}, not {self.label!r}") from None
        for name in ("diffusion_label", "reference_label"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, CellClassValues(value))
                except ValueError:
                    raise ValueError(f"{name} must be one of {', '.join(CLASS_NAMES)}, "
                                     f"not {value!r}") from None
        if not isinstance(self.probabilities, Mapping):
            raise TypeError("probabilities must be a mapping of class name to probability")
        if set(self.probabilities) != set(CLASS_NAMES):
            raise ValueError(f"probabilities must have exactly the keys {', '.join(CLASS_NAMES)}, "
                             f"not {', '.join(map(str, self.probabilities))}")
        probs = {c: _check_unit_interval(self.probabilities[c], f"probabilities[{c!r}]") for c in CLASS_NAMES}
        if abs(sum(probs.values()) - 1.0) > 1e-3:
            raise ValueError(f"probabilities must sum to 1 (within 1e-3), not {sum(probs.values()):.6f}")
        object.__setattr__(self, "probabilities", types.MappingProxyType(probs))
        object.__setattr__(self, "uncertainty", _check_unit_interval(self.uncertainty, "uncertainty"))
        object.__setattr__(self, "anomaly_score", _check_finite(self.anomaly_score, "anomaly_score"))
        self._normalise_review_reasons()
        for flag, reason in (("review", "review_reason"), ("abnormal", "abnormal_reason")):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool")
            object.__setattr__(self, flag, bool(getattr(self, flag)))
            value = getattr(self, reason)
            if getattr(self, flag) != (value is not None):
                raise ValueError(f"{reason} must be given exactly when {flag} is True")
            if value is not None:
                try:
                    object.__setattr__(self, reason, FlagReasonValues(value))
                except ValueError:
                    allowed = ", ".join(v.value for v in FlagReasonValues)
                    raise ValueError(f"{reason} must be one of {allowed}, not {value!r}") from None

    def _normalise_review_reasons(self) -> None:
        try:
            reasons = tuple(FlagReasonValues(r) for r in self.review_reasons)
        except (TypeError, ValueError):
            allowed = ", ".join(v.value for v in FlagReasonValues)
            raise ValueError(f"review_reasons must hold values of {allowed}, not {self.review_reasons!r}") from None
        if len(set(reasons)) != len(reasons):
            raise ValueError(f"review_reasons must not repeat a reason: {[r.value for r in reasons]}")
        order = list(FlagReasonValues)
        reasons = tuple(sorted(reasons, key=order.index))
        if self.review_reason is None:
            if reasons:
                object.__setattr__(self, "review_reason", reasons[0])
        else:
            try:
                first = FlagReasonValues(self.review_reason)
            except ValueError:
                return  # reported by the loop below with the list of allowed values
            if not reasons:
                reasons = (first,)
            elif first != reasons[0]:
                raise ValueError(f"review_reason must be the first of review_reasons ({reasons[0].value}), "
                                 f"not {first.value}")
        object.__setattr__(self, "review_reasons", reasons)

    @property
    def review_labels(self) -> tuple[str, ...]:
        """The review reasons as a person reads them (see :data:`FLAG_REASON_LABELS`)."""
        return tuple(FLAG_REASON_LABELS[r] for r in self.review_reasons)

    @property
    def probability(self) -> float:
        """Posterior probability of the assigned class."""
        return self.probabilities[self.label.value]


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file, lower-case hex (:attr:`ModelProvenance.weights_sha256`)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelProvenance:
    """Which model produced a result, and how it was configured.

    Parameters
    ----------
    name:
        Name of the model (for example ``"cytodiffusion"``), not empty.
    version:
        Version of the model, not empty.
    weights_sha256:
        SHA-256 of the weights file, 64 lower-case hex digits.
    parameters:
        Settings that shaped the result (thresholds, budgets, ...); keys are
        non-empty strings, values are str, int, float or bool.
    """

    name: str
    version: str
    weights_sha256: str
    parameters: Mapping[str, str | int | float | bool] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("name", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64:
                raise ValueError(f"{name} must be a non-empty string of at most 64 characters, not {value!r}")
        if not isinstance(self.weights_sha256, str) or not _SHA256_RE.match(self.weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lower-case hex digits, not {self.weights_sha256!r}")
        if not isinstance(self.parameters, Mapping):
            raise TypeError("parameters must be a mapping")
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"parameters keys must be non-empty strings, not {key!r}")
            if not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"parameters[{key!r}] must be str, int, float or bool, "
                                f"not {type(value).__name__}")
        object.__setattr__(self, "parameters", types.MappingProxyType(dict(self.parameters)))


@dataclasses.dataclass(frozen=True, eq=False)
class HeatmapGrid:
    """A heatmap on a coarse grid aligned with the base level of the slide.

    Grid pixel ``[i, j]`` covers the base-level pixels with rows
    ``[i * cell_size_px, (i + 1) * cell_size_px)`` and columns
    ``[j * cell_size_px, (j + 1) * cell_size_px)``; the grid starts at the top
    left corner of the slide and has ``ceil(rows / cell_size_px)`` rows and
    ``ceil(columns / cell_size_px)`` columns. Its pixel spacing is
    ``cell_size_px`` times the base-level pixel spacing.

    Parameters
    ----------
    kind:
        What the heatmap shows.
    values:
        2D ``float32`` array ``(grid rows, grid columns)``, every value in [0, 1]
        (0: no evidence, 1: the strongest). Stored read-only.
    cell_size_px:
        Side of one grid pixel in base-level pixels, at least 1.
    """

    kind: HeatmapKindValues
    values: np.ndarray
    cell_size_px: int

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", HeatmapKindValues(self.kind))
        except ValueError:
            allowed = ", ".join(v.value for v in HeatmapKindValues)
            raise ValueError(f"kind must be one of {allowed}, not {self.kind!r}") from None
        if isinstance(self.cell_size_px, bool) or not isinstance(self.cell_size_px, (int, np.integer)):
            raise TypeError("cell_size_px must be an int")
        if self.cell_size_px < 1:
            raise ValueError(f"cell_size_px must be at least 1, not {self.cell_size_px}")
        object.__setattr__(self, "cell_size_px", int(self.cell_size_px))
        if not isinstance(self.values, np.ndarray) or self.values.dtype != np.float32:
            raise TypeError("values must be a numpy float32 array")
        if self.values.ndim != 2 or 0 in self.values.shape:
            raise ValueError(f"values must be a non-empty 2D array, not shape {self.values.shape}")
        if not np.all(np.isfinite(self.values)) or self.values.min() < 0.0 or self.values.max() > 1.0:
            raise ValueError("values must be finite and lie in [0, 1]")
        values = self.values.copy()
        values.setflags(write=False)
        object.__setattr__(self, "values", values)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the grid."""
        return int(self.values.shape[0]), int(self.values.shape[1])


@dataclasses.dataclass(frozen=True)
class SlideResult:
    """Everything the analysis of one slide produced.

    Parameters
    ----------
    study_instance_uid, series_instance_uid:
        UIDs of the source slide's study and series.
    sop_instance_uids:
        SOP Instance UIDs of the base level (one or more instances), not empty, no duplicates.
    frame_of_reference_uid:
        Frame of Reference UID of the slide (the slide coordinate system).
    total_pixel_matrix_columns, total_pixel_matrix_rows:
        Size of the base level's total pixel matrix.
    pixel_spacing_mm:
        Base-level Pixel Spacing (0028,0030) in mm: spacing between rows, then
        between columns, both positive.
    cells:
        Every classified cell; ids unique; each inside the total pixel matrix.
    provenance:
        The model that produced the result.
    heatmaps:
        Optional heatmap grids, at most one per kind, all on the same grid.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    frame_of_reference_uid: str
    total_pixel_matrix_columns: int
    total_pixel_matrix_rows: int
    pixel_spacing_mm: tuple[float, float]
    cells: tuple[CellResult, ...]
    provenance: ModelProvenance
    heatmaps: tuple[HeatmapGrid, ...] = ()

    def __post_init__(self) -> None:
        for name in ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid"):
            _check_uid(getattr(self, name), name)
        uids = tuple(self.sop_instance_uids)
        if not uids:
            raise ValueError("sop_instance_uids must name at least one base-level instance")
        for uid in uids:
            _check_uid(uid, "sop_instance_uids")
        if len(set(uids)) != len(uids):
            raise ValueError("sop_instance_uids must not repeat a UID")
        object.__setattr__(self, "sop_instance_uids", uids)
        for name in ("total_pixel_matrix_columns", "total_pixel_matrix_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
            object.__setattr__(self, name, int(value))
        if len(self.pixel_spacing_mm) != 2:
            raise ValueError("pixel_spacing_mm must be (row spacing, column spacing)")
        spacing = tuple(_check_finite(v, "pixel_spacing_mm") for v in self.pixel_spacing_mm)
        if min(spacing) <= 0:
            raise ValueError(f"pixel_spacing_mm must be positive, not {spacing}")
        object.__setattr__(self, "pixel_spacing_mm", spacing)
        if not isinstance(self.provenance, ModelProvenance):
            raise TypeError("provenance must be a ModelProvenance")
        cells = tuple(self.cells)
        if not all(isinstance(c, CellResult) for c in cells):
            raise TypeError("cells must hold CellResult items")
        ids = [c.cell_id for c in cells]
        if len(set(ids)) != len(ids):
            raise ValueError("cells must have unique cell_id values")
        width, height = self.total_pixel_matrix_columns, self.total_pixel_matrix_rows
        for cell in cells:
            x1, y1 = cell.bbox[2], cell.bbox[3]
            inside = all(0 <= px <= width and 0 <= py <= height for px, py in cell.outline)
            if x1 > width or y1 > height or not inside:
                raise ValueError(f"cells: cell {cell.cell_id} reaches outside the total pixel matrix "
                                 f"({width} x {height})")
        object.__setattr__(self, "cells", cells)
        heatmaps = tuple(self.heatmaps)
        if not all(isinstance(h, HeatmapGrid) for h in heatmaps):
            raise TypeError("heatmaps must hold HeatmapGrid items")
        kinds = [h.kind for h in heatmaps]
        if len(set(kinds)) != len(kinds):
            raise ValueError("heatmaps must hold at most one grid per kind")
        for grid in heatmaps:
            size = grid.cell_size_px
            expected = (-(-height // size), -(-width // size))
            if grid.shape != expected:
                raise ValueError(f"heatmaps: the {grid.kind.value} grid with cell_size_px={size} must "
                                 f"have shape {expected}, not {grid.shape}")
        if len({h.cell_size_px for h in heatmaps}) > 1:
            raise ValueError("heatmaps must all use the same cell_size_px")
        object.__setattr__(self, "heatmaps", heatmaps)

    @property
    def counts(self) -> tuple[ClassCount, ...]:
        """The differential: one :class:`ClassCount` per class, in class order."""
        return differential([c.label for c in self.cells])

    @property
    def review_cells(self) -> tuple[CellResult, ...]:
        """Cells flagged for review."""
        return tuple(c for c in self.cells if c.review)

    @property
    def abnormal_cells(self) -> tuple[CellResult, ...]:
        """Cells suspected abnormal."""
        return tuple(c for c in self.cells if c.abnormal)
