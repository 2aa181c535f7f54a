"""The differential a haematologist expects (dicom_node.encode.differential), as people read it:
the lines `cytonode analyze` and the demo print, and the numbers the viewer and the SR show."""

from __future__ import annotations

import math
import re

import pytest

from analysis.classes import CLASS_NAMES
from analysis.results import CellResult, ModelProvenance, SlideResult, wilson_interval
from dicom_node.app.analyze import _print_differential
from dicom_node.encode.differential import (
    MIN_WHITE_CELLS,
    Differential,
    cell_reason_labels,
    class_label,
    result_reason_labels,
)

UID = "1.2.826.0.1.3680043.8.498.1"


def _result(labels: list[str], reasons: dict[int, tuple[str, ...]] | None = None) -> SlideResult:
    reasons = reasons or {}
    cells = []
    for i, label in enumerate(labels):
        x0, y0 = 10 + 30 * (i % 50), 10 + 30 * (i // 50)
        probabilities = {c: 0.0 for c in CLASS_NAMES}
        probabilities[label] = 1.0
        cells.append(CellResult(
            cell_id=i, x=x0 + 10.0, y=y0 + 10.0, outline=((x0, y0), (x0 + 20, y0), (x0 + 20, y0 + 20)),
            bbox=(x0, y0, x0 + 20, y0 + 20), area_um2=50.0, label=label, probabilities=probabilities,
            uncertainty=0.1, anomaly_score=0.0, review=i in reasons, review_reasons=reasons.get(i, ())))
    return SlideResult(UID + ".1", UID + ".2", (UID + ".3",), UID + ".4", 2000, 2000, (0.0005, 0.0005),
                       tuple(cells), ModelProvenance("cytodiffusion", "1", "0" * 64))


def _labels(**counts: int) -> list[str]:
    return [name for name, n in counts.items() for _ in range(n)]


def test_white_cells_only_nrbc_per_100_and_platelets_apart(capsys) -> None:
    labels = _labels(neutrophil=55, eosinophil=3, basophil=1, lymphocyte=30, monocyte=8, ig=3,
                     erythroblast=5, platelet=4)
    reasons = {0: ("high-uncertainty", "high-anomaly-score"), 95: ("significant-class",),
               100: ("significant-class",), 101: ("models-disagree",)}
    result = _result(labels, reasons)
    diff = Differential.from_result(result, platelets_detected=20)
    assert diff.white_cell_count == 100 and not diff.few_white_cells and diff.note is None
    by_class = {c.label.value: c for c in diff.white_cells}
    assert [c.label.value for c in diff.white_cells] == list(CLASS_NAMES[:6])
    assert by_class["neutrophil"].percentage == pytest.approx(55.0)  # of 100 white cells, not of 109
    assert by_class["ig"].confidence_interval == pytest.approx(
        tuple(100 * v for v in wilson_interval(3, 100)))
    assert diff.nrbc_per_100_wbc == pytest.approx(5.0)
    assert diff.platelets == 24 and diff.flagged == 4 and diff.unlike_training == 1
    # what `cytonode analyze` prints
    _print_differential(result, {"total": 1.0}, "out", platelets_detected=20)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "white-cell differential on 100 white cells" in out
    assert re.search(r"^  neutrophil +55 +55\.0 %", out, re.MULTILINE)
    assert re.search(r"^  immature granulocyte +3 +3\.0 %", out, re.MULTILINE) and " ig " not in out
    assert "nucleated red cells (erythroblasts): 5, 5.0 per 100 white cells" in out
    assert "platelets: 24 seen (an estimate; not white cells, not in the differential)" in out
    assert "4 flagged for review (1 unlike any training class)" in out
    assert "    Cell 0: neutrophil (uncertain, unlike any training class)" in out
    assert "    Cell 100: erythroblast (significant class)" in out
    assert "interpret with caution" not in out
    # rows: the erythroblast and platelet rows carry no percentage
    rows = {r["label"]: r for r in diff.rows()}
    assert rows["erythroblast"]["percentage"] is None and rows["erythroblast"]["per_100_white_cells"] == 5.0
    assert rows["platelet"]["percentage"] is None and rows["platelet"]["count"] == 4
    assert sum(r["percentage"] for r in diff.rows() if r["white_cell"]) == pytest.approx(100.0)


def test_fewer_than_100_white_cells_says_so() -> None:
    diff = Differential.from_result(_result(_labels(neutrophil=40, lymphocyte=19, erythroblast=2)))
    assert diff.white_cell_count == 59 < MIN_WHITE_CELLS
    assert diff.note == "differential on 59 white cells (fewer than 100): interpret with caution"
    lines = diff.lines()
    assert lines[0].startswith("white-cell differential on 59 white cells")
    assert "  note: " + diff.note in lines
    assert diff.nrbc_per_100_wbc == pytest.approx(200 / 59)
    assert diff.flag_text == "0 flagged for review"
    empty = Differential.from_result(_result([]))
    assert empty.nrbc_per_100_wbc is None and empty.note.startswith("differential on 0 white cells")
    assert "no white cells to relate them to" in empty.nrbc_text


def test_json_cells_after_review_and_older_summaries() -> None:
    cells = [
        {"label": "ig", "review": True, "review_reasons": ["significant-class"]},
        {"label": "neutrophil", "review": True, "review_reason": "high-anomaly-score"},  # older
        {"label": "monocyte", "review": False, "unclassifiable": True},  # leaves every count
        {"label": "platelet", "review": False},
    ]
    diff = Differential.from_cells(cells, platelets_detected=None)
    assert diff.white_cell_count == 2 and diff.unclassifiable == 1
    assert diff.flagged == 2 and diff.unlike_training == 1
    assert diff.platelets == 1 and diff.platelets_detected is None
    assert diff.flag_text == "2 flagged for review (1 unlike any training class)"
    summary = {"cells": cells, "platelets_detected": 3}
    assert Differential.from_summary(summary).platelets == 4
    as_json = diff.as_json()
    assert as_json["white_cells"] == 2 and as_json["text"]["flags"] == diff.flag_text
    assert [r["name"] for r in as_json["rows"]][5] == "immature granulocyte" == class_label("ig")
    assert not math.isnan(as_json["rows"][0]["percentage"])


def test_invalid_differentials_raise_value_error() -> None:
    good = Differential.from_cells([{"label": "neutrophil"}])
    with pytest.raises(ValueError, match="one count per white-cell class"):
        Differential(white_cells=good.white_cells[:5])
    with pytest.raises(ValueError, match="unlike_training"):
        Differential(white_cells=good.white_cells, flagged=0, unlike_training=1)
    with pytest.raises(ValueError, match="platelets_detected"):
        Differential(white_cells=good.white_cells, platelets_detected=-1)


def test_the_reasons_name_what_each_model_called() -> None:
    """A reviewer reads which model called what behind "models disagree", and which model
    called a significant class the reported class is not; older cells without the models'
    own calls keep the plain words."""
    cell = {"label": "basophil", "review": True, "diffusion_label": "ig",
            "reference_label": "basophil",
            "review_reasons": ["high-uncertainty", "significant-class", "models-disagree"]}
    assert cell_reason_labels(cell) == [
        "uncertain", "significant class (diffusion model: immature granulocyte)",
        "models disagree (diffusion model: immature granulocyte, second model: basophil)"]
    # reported as the significant class itself: nothing to explain
    assert cell_reason_labels({**cell, "label": "ig", "review_reasons": ["significant-class"]}) \
        == ["significant class"]
    # after review the reasons still refer to what the algorithm reported
    assert cell_reason_labels({**cell, "label": "monocyte", "original_label": "basophil"})[1] \
        == "significant class (diffusion model: immature granulocyte)"
    older = {"label": "basophil", "review": True, "review_reasons": ["models-disagree"]}
    assert cell_reason_labels(older) == ["models disagree"]
    # what `cytonode analyze` and the PDF say for a CellResult
    probabilities = {c: 0.0 for c in CLASS_NAMES}
    probabilities["erythroblast"] = 1.0
    result = CellResult(cell_id=7, x=10.0, y=10.0, outline=((0, 0), (20, 0), (20, 20)),
                        bbox=(0, 0, 20, 20), area_um2=50.0, label="erythroblast",
                        probabilities=probabilities, uncertainty=0.1, anomaly_score=0.0,
                        review=True, review_reasons=("significant-class", "models-disagree"),
                        diffusion_label="erythroblast", reference_label="lymphocyte")
    assert result_reason_labels(result) == [
        "significant class", "models disagree (diffusion model: erythroblast, second model: lymphocyte)"]
    with pytest.raises(ValueError, match="reference_label must be one of"):
        CellResult(**{**{f: getattr(result, f) for f in ("cell_id", "x", "y", "outline", "bbox",
                                                         "area_um2", "label", "probabilities",
                                                         "uncertainty", "anomaly_score")},
                      "reference_label": "blast"})
