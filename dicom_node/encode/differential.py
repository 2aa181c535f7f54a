"""The differential a haematologist expects, computed once for every place that shows it.

A manual or analyser differential counts **white cells only**: neutrophils, eosinophils,
basophils, lymphocytes, monocytes and immature granulocytes. Their percentages and 95 % Wilson
score intervals (:func:`analysis.results.wilson_interval`) are over the white cells. Two classes
of the classifier are not white cells and stay out of the percentages:

- **nucleated red cells** (the erythroblast class) are reported per 100 white cells (an NRBC
  count of 3 on 150 white cells is "2.0 per 100 white cells"), as analysers and the ICSH do;
- **platelets** are reported apart, as an estimate: the number seen (objects classified as
  platelets plus, when known, the platelets the cell finder counted without classifying them).

A differential on fewer than :data:`MIN_WHITE_CELLS` white cells carries :attr:`Differential.note`
next to the numbers. "Flagged" means flagged for review (``CellResult.review``); the analysis
sends every suspected abnormal cell to review too, so :attr:`Differential.flagged` is the one
number every page, the demo and the SR show, and :attr:`Differential.unlike_training` says how
many of those the model found unlike any training class.

Usage, from the analysis result or from the JSON cells the viewer reads (``summary.json``, or
the viewer's cells after review, where ``label`` is the reviewed class and ``unclassifiable``
cells leave the count)::

    from dicom_node.encode.differential import Differential

    d = Differential.from_result(result, platelets_detected=12)
    d = Differential.from_summary(summary)            # summary.json
    d = Differential.from_cells(cells, platelets_detected=12)
    d.white_cells            # six ClassCount, total = white cells
    d.nrbc_per_100_wbc       # float, or None without white cells
    d.note                   # "differential on 7 white cells (fewer than 100): interpret with caution"
    d.flag_text              # "7 flagged for review (2 unlike any training class)"
    d.lines()                # the plain-text report (CLI, demo, PDF)
    d.as_json()              # the same as JSON (job result, API)

This module imports no DICOM library: the viewer and the PDF writer use it as well as the SR.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from typing import Any

from analysis.classes import CellClassValues
from analysis.results import FLAG_REASON_LABELS, ClassCount, FlagReasonValues, SlideResult

#: The classes of the white-cell differential, in report order.
WHITE_CELL_CLASSES: tuple[CellClassValues, ...] = (
    CellClassValues.NEUTROPHIL, CellClassValues.EOSINOPHIL, CellClassValues.BASOPHIL,
    CellClassValues.LYMPHOCYTE, CellClassValues.MONOCYTE, CellClassValues.IG,
)

#: Below this many white cells the differential says it is to be read with caution.
MIN_WHITE_CELLS = 100

#: What a person reads for each class (never the abbreviation "ig").
CLASS_LABELS: Mapping[str, str] = types.MappingProxyType({
    CellClassValues.NEUTROPHIL.value: "neutrophil",
    CellClassValues.EOSINOPHIL.value: "eosinophil",
    CellClassValues.BASOPHIL.value: "basophil",
    CellClassValues.LYMPHOCYTE.value: "lymphocyte",
    CellClassValues.MONOCYTE.value: "monocyte",
    CellClassValues.IG.value: "immature granulocyte",
    CellClassValues.ERYTHROBLAST.value: "erythroblast",
    CellClassValues.PLATELET.value: "platelet",
})

_UNLIKE = FlagReasonValues.HIGH_ANOMALY_SCORE


def class_label(name: str | CellClassValues) -> str:
    """The class as a person reads it (``"ig"`` -> ``"immature granulocyte"``)."""
    key = name.value if isinstance(name, CellClassValues) else str(name)
    return CLASS_LABELS.get(key, key)


def reason_labels(reasons: Iterable[str | FlagReasonValues]) -> list[str]:
    """Review reasons (enum values) in words, in the order given; unknown values as they are."""
    out = []
    for reason in reasons:
        try:
            out.append(FLAG_REASON_LABELS[FlagReasonValues(reason)])
        except ValueError:
            out.append(str(reason))
    return out


def described_reasons(reasons: Iterable[str | FlagReasonValues], label: str | None = None,
                      diffusion_label: str | None = None,
                      reference_label: str | None = None) -> list[str]:
    """Review reasons in words (:func:`reason_labels`), with what each model called where
    that is what a reviewer needs to see: "models disagree (diffusion model: immature
    granulocyte, second model: basophil)", and a significant class that only one model
    called, for a cell reported as another ("significant class (second model:
    erythroblast)"). Without the models' own calls (older results), the plain words."""
    from analysis.review import SIGNIFICANT_CLASSES

    calls = [(who, c) for who, c in
             (("diffusion model", diffusion_label), ("second model", reference_label)) if c]
    reasons = list(reasons)
    out = []
    for reason, text in zip(reasons, reason_labels(reasons)):
        detail: list[tuple[str, str]] = []
        if reason == FlagReasonValues.MODELS_DISAGREE and len(calls) == 2:
            detail = calls
        elif reason == FlagReasonValues.SIGNIFICANT_CLASS and label not in SIGNIFICANT_CLASSES:
            detail = [(who, c) for who, c in calls if c in SIGNIFICANT_CLASSES]
        if detail:
            text += " (" + ", ".join(f"{who}: {class_label(c)}" for who, c in detail) + ")"
        out.append(text)
    return out


def cell_reason_labels(cell: Mapping[str, Any]) -> list[str]:
    """The review reasons of a JSON cell (``summary.json``, the viewer) in words, with the
    models' own calls where it has them (:func:`described_reasons`)."""
    return described_reasons(_json_reasons(cell), cell.get("original_label", cell.get("label")),
                             cell.get("diffusion_label"), cell.get("reference_label"))


def result_reason_labels(cell: Any) -> list[str]:
    """:func:`cell_reason_labels` of an :class:`analysis.results.CellResult`."""
    return described_reasons(cell.review_reasons, cell.label, cell.diffusion_label,
                             cell.reference_label)


def _json_reasons(cell: Mapping[str, Any]) -> list[str]:
    """A JSON cell's review reasons: ``review_reasons``, or the single ``review_reason`` of older
    summaries."""
    reasons = cell.get("review_reasons")
    if reasons:
        return [str(r) for r in reasons]
    return [str(cell["review_reason"])] if cell.get("review_reason") else []


@dataclasses.dataclass(frozen=True)
class Differential:
    """The white-cell differential of one slide, with nucleated red cells, platelets and flags.

    Build it with :meth:`from_result`, :meth:`from_summary` or :meth:`from_cells`.

    Parameters
    ----------
    white_cells:
        One :class:`~analysis.results.ClassCount` per class of :data:`WHITE_CELL_CLASSES`, in
        that order, each with ``total`` the number of white cells.
    nucleated_red_cells:
        Cells of the erythroblast class.
    platelets_classified:
        Objects the classifier called platelets.
    platelets_detected:
        Platelets the cell finder counted without classifying them; ``None`` when not known.
    flagged:
        Cells flagged for review.
    unlike_training:
        Flagged cells whose reasons include "unlike any training class" (high anomaly score).
    unclassifiable:
        Cells a reviewer marked unclassifiable (they are in no count above).
    """

    white_cells: tuple[ClassCount, ...]
    nucleated_red_cells: int = 0
    platelets_classified: int = 0
    platelets_detected: int | None = None
    flagged: int = 0
    unlike_training: int = 0
    unclassifiable: int = 0

    def __post_init__(self) -> None:
        labels = tuple(c.label for c in self.white_cells)
        if labels != WHITE_CELL_CLASSES:
            raise ValueError(f"white_cells must hold one count per white-cell class in the order "
                             f"{', '.join(c.value for c in WHITE_CELL_CLASSES)}")
        total = sum(c.count for c in self.white_cells)
        if any(c.total != total for c in self.white_cells):
            raise ValueError("every white-cell count must have the number of white cells as total")
        for name in ("nucleated_red_cells", "platelets_classified", "flagged", "unlike_training",
                     "unclassifiable"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int, 0 or more, not {value!r}")
        if self.platelets_detected is not None and (
                isinstance(self.platelets_detected, bool) or not isinstance(self.platelets_detected, int)
                or self.platelets_detected < 0):
            raise ValueError(f"platelets_detected must be None or an int, 0 or more, "
                             f"not {self.platelets_detected!r}")
        if self.unlike_training > self.flagged:
            raise ValueError("unlike_training counts flagged cells: it cannot exceed flagged")

    # --- Constructors ------------------------------------------------------------------------
    @classmethod
    def _count(cls, labels: list[str], flags: list[list[str]], unclassifiable: int,
               platelets_detected: int | None) -> Differential:
        white = [label for label in labels if label in {c.value for c in WHITE_CELL_CLASSES}]
        return cls(
            white_cells=tuple(ClassCount(c, sum(1 for x in white if x == c.value), len(white))
                              for c in WHITE_CELL_CLASSES),
            nucleated_red_cells=sum(1 for x in labels if x == CellClassValues.ERYTHROBLAST.value),
            platelets_classified=sum(1 for x in labels if x == CellClassValues.PLATELET.value),
            platelets_detected=None if platelets_detected is None else int(platelets_detected),
            flagged=len(flags),
            unlike_training=sum(1 for reasons in flags if _UNLIKE.value in reasons),
            unclassifiable=unclassifiable,
        )

    @classmethod
    def from_result(cls, result: SlideResult, *, platelets_detected: int | None = None) -> Differential:
        """The differential of an analysis result (the algorithm's classes)."""
        return cls._count([c.label.value for c in result.cells],
                          [[r.value for r in c.review_reasons] for c in result.cells if c.review],
                          0, platelets_detected)

    @classmethod
    def from_cells(cls, cells: Iterable[Mapping[str, Any]], *,
                   platelets_detected: int | None = None) -> Differential:
        """The differential of JSON cells: ``label``, ``review``, ``review_reasons`` (or the older
        ``review_reason``) and, after review, ``unclassifiable`` (such a cell is in no count)."""
        cells = list(cells)
        counted = [c for c in cells if not c.get("unclassifiable")]
        return cls._count([str(c["label"]) for c in counted],
                          [_json_reasons(c) for c in cells if c.get("review")],
                          len(cells) - len(counted), platelets_detected)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> Differential:
        """The differential of a ``summary.json`` (``cytonode analyze``, the worker)."""
        return cls.from_cells(summary.get("cells", []),
                              platelets_detected=summary.get("platelets_detected"))

    # --- Derived numbers ---------------------------------------------------------------------
    @property
    def white_cell_count(self) -> int:
        """White cells counted (the denominator of every percentage)."""
        return sum(c.count for c in self.white_cells)

    @property
    def nrbc_per_100_wbc(self) -> float | None:
        """Nucleated red cells per 100 white cells; ``None`` without white cells."""
        n = self.white_cell_count
        return None if n == 0 else 100.0 * self.nucleated_red_cells / n

    @property
    def platelets(self) -> int:
        """Platelets seen: classified as platelets plus those the cell finder counted."""
        return self.platelets_classified + (self.platelets_detected or 0)

    @property
    def few_white_cells(self) -> bool:
        """True when the differential rests on fewer than :data:`MIN_WHITE_CELLS` white cells."""
        return self.white_cell_count < MIN_WHITE_CELLS

    @property
    def note(self) -> str | None:
        """The caution to print next to the numbers, or ``None`` on 100 white cells or more."""
        if not self.few_white_cells:
            return None
        n = self.white_cell_count
        return (f"differential on {n} white cell{'' if n == 1 else 's'} "
                f"(fewer than {MIN_WHITE_CELLS}): interpret with caution")

    @property
    def flag_text(self) -> str:
        """``"7 flagged for review (2 unlike any training class)"``: the same words everywhere."""
        text = f"{self.flagged} flagged for review"
        if self.unlike_training:
            text += f" ({self.unlike_training} {FLAG_REASON_LABELS[_UNLIKE]})"
        return text

    @property
    def nrbc_text(self) -> str:
        """``"nucleated red cells (erythroblasts): 3, 2.0 per 100 white cells"``."""
        per_100 = self.nrbc_per_100_wbc
        rate = "no white cells to relate them to" if per_100 is None else f"{per_100:.1f} per 100 white cells"
        return f"nucleated red cells (erythroblasts): {self.nucleated_red_cells}, {rate}"

    @property
    def platelet_text(self) -> str:
        """``"platelets: 14 seen (an estimate; not white cells, not in the differential)"``."""
        return f"platelets: {self.platelets} seen (an estimate; not white cells, not in the differential)"

    # --- Output ------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per class of the classifier, in class order, as plain values.

        White-cell rows have ``percentage`` and ``ci95`` (percent, over white cells); the
        erythroblast row has ``per_100_white_cells`` instead, the platelet row only its count.
        Every row has ``label`` (the class value), ``name`` (in words) and ``count``.
        """
        rows = []
        for count in self.white_cells:
            interval = count.confidence_interval
            rows.append({
                "label": count.label.value, "name": class_label(count.label), "count": count.count,
                "white_cell": True,
                "percentage": None if count.percentage is None else round(count.percentage, 3),
                "ci95": None if interval is None else [round(interval[0], 3), round(interval[1], 3)],
                "per_100_white_cells": None,
            })
        per_100 = self.nrbc_per_100_wbc
        rows.append({"label": CellClassValues.ERYTHROBLAST.value,
                     "name": class_label(CellClassValues.ERYTHROBLAST),
                     "count": self.nucleated_red_cells, "white_cell": False, "percentage": None,
                     "ci95": None, "per_100_white_cells": None if per_100 is None else round(per_100, 3)})
        rows.append({"label": CellClassValues.PLATELET.value, "name": class_label(CellClassValues.PLATELET),
                     "count": self.platelets_classified, "white_cell": False, "percentage": None,
                     "ci95": None, "per_100_white_cells": None})
        return rows

    def as_json(self) -> dict[str, Any]:
        """Everything, as JSON values (the job result, the viewer's API)."""
        per_100 = self.nrbc_per_100_wbc
        return {
            "white_cells": self.white_cell_count,
            "rows": self.rows(),
            "nucleated_red_cells": {"count": self.nucleated_red_cells,
                                    "per_100_white_cells": None if per_100 is None else round(per_100, 3)},
            "platelets": {"seen": self.platelets, "classified": self.platelets_classified,
                          "detected": self.platelets_detected},
            "note": self.note,
            "flagged": self.flagged,
            "unlike_training": self.unlike_training,
            "unclassifiable": self.unclassifiable,
            "text": {"flags": self.flag_text, "nrbc": self.nrbc_text, "platelets": self.platelet_text},
        }

    def lines(self) -> list[str]:
        """The differential as plain text lines (the CLI, the demo, the PDF)."""
        lines = [(f"white-cell differential on {self.white_cell_count} white cells "
                  "(percentage of white cells, 95 % Wilson interval):")]
        for count in self.white_cells:
            if count.total:
                low, high = count.confidence_interval or (0.0, 0.0)
                lines.append(f"  {class_label(count.label):<21}{count.count:>5}  {count.percentage:5.1f} %"
                             f"  [{low:5.1f}, {high:5.1f}]")
            else:
                lines.append(f"  {class_label(count.label):<21}{count.count:>5}")
        if self.note:
            lines.append(f"  note: {self.note}")
        lines.append(f"  {self.nrbc_text}")
        lines.append(f"  {self.platelet_text}")
        if self.unclassifiable:
            lines.append(f"  unclassifiable (in no count): {self.unclassifiable}")
        lines.append(f"  {self.flag_text}")
        return lines
