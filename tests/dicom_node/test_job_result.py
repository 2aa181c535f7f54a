"""The typed hand-over of a job (``dicom_node.jobs.result``) and the job's one read of its slide.

The documents are written and read back as JSON, and the readers refuse what they do not know.
"Once" is counted on the libraries: every ``WsiDicom.open`` and every ``pydicom.dcmread`` of one
of the slide's files while a job's slide is opened and its results are encoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from wsidicom import WsiDicom

from analysis.tiles import Slide
from dicom_node.jobs.encoding import encode_results
from dicom_node.jobs.result import (
    SCHEMA_VERSION,
    JobResult,
    ResultSchemaError,
    SlideSummary,
    read_summary,
    write_summary,
)
from tests.dicom_node.test_pdf_sc import SLIDE, make_result, slide_files


def job_result(**changes: Any) -> JobResult:
    values: dict[str, Any] = {
        "levels": [{"level": 0, "width": 2308, "height": 1154, "tile_width": 256, "tile_height": 256,
                    "pixel_spacing_mm": [8.23e-05, 8.23e-05]}],
        "width": 2308, "height": 1154, "pixel_spacing_um": [0.0823, 0.0823], "instances": 5,
        "frames": 20, "results_dir": "/data/results/1.2.3", "timings_s": {"read": 0.1, "encode": 0.3},
        "cell_count": 7, "differential": [{"label": "neutrophil", "count": 2}],
        "report": {"white_cells": 6, "text": {"flags": "4 flagged for review"}}, "review": 4,
        "abnormal": 1, "validated_domain": "inside the validated domain", "site_calibration": "none",
        "objects": {"sr": "1.2.3.4", "pdf": "1.2.3.5"},
    }
    values.update(changes)
    return JobResult(**values)


# --- The documents ---------------------------------------------------------------------------
def test_job_result_round_trips_and_names_its_schema() -> None:
    result = job_result()
    text = result.to_json()
    document = json.loads(text)
    assert document["schema"] == f"cytonode.job-result/{SCHEMA_VERSION}" == "cytonode.job-result/1"
    assert JobResult.from_json(text) == result
    # the content of the row is a superset of what the worker wrote before the schema field
    assert set(document) - {"schema"} == {
        "levels", "width", "height", "pixel_spacing_um", "instances", "frames", "results_dir",
        "timings_s", "cell_count", "differential", "report", "review", "abnormal",
        "validated_domain", "site_calibration", "objects"}


def test_a_document_from_before_the_schema_field_reads_as_version_1() -> None:
    document = job_result().as_dict()
    del document["schema"]
    assert JobResult.from_json(json.dumps(document)) == job_result()


@pytest.mark.parametrize("schema", ["cytonode.job-result/2", "cytonode.job-result/0",
                                    "cytonode.slide-summary/1", "", None])
def test_an_unknown_schema_is_refused(schema: str | None) -> None:
    document = {**job_result().as_dict(), "schema": schema}
    with pytest.raises(ResultSchemaError, match="unknown schema"):
        JobResult.from_json(json.dumps(document))


def test_missing_fields_wrong_types_and_non_json_are_refused() -> None:
    document = job_result().as_dict()
    del document["objects"], document["cell_count"]
    with pytest.raises(ResultSchemaError, match="missing field.*cell_count, objects"):
        JobResult.from_json(json.dumps(document))
    with pytest.raises(ResultSchemaError, match="'cell_count' must be int"):
        JobResult.from_json(json.dumps({**job_result().as_dict(), "cell_count": "7"}))
    with pytest.raises(ResultSchemaError, match="'review' must be int"):
        job_result(review=True)
    with pytest.raises(ResultSchemaError, match="not JSON"):
        JobResult.from_json("{not json")
    with pytest.raises(ResultSchemaError, match="JSON object"):
        JobResult.from_json("[]")
    assert issubclass(ResultSchemaError, ValueError)  # readers that caught ValueError still do


# --- A real slide: opened once, encoded, summarised ------------------------------------------
# The sample slide's seven white cells with chosen classes and flags (cells 1, 4, 5 and 6 flagged),
# as the PDF and gallery tests build them.


class Reads:
    """Counts, through the libraries, how often the slide's files are opened and parsed."""

    def __init__(self, files: list[Path]) -> None:
        self.names = {str(f.resolve()) for f in files}
        self.wsidicom_opens = 0
        self.dcmreads: dict[str, int] = {}

    def count_dcmread(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def dcmread(fp: Any, *args: Any, **kwargs: Any) -> Any:
            path = fp if isinstance(fp, (str, os.PathLike)) else getattr(fp, "name", "")
            name = str(Path(path).resolve())
            if name in self.names:
                self.dcmreads[name] = self.dcmreads.get(name, 0) + 1
            return real(fp, *args, **kwargs)
        return dcmread

    def count_open(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def open_(*args: Any, **kwargs: Any) -> Any:
            self.wsidicom_opens += 1
            return real(*args, **kwargs)
        return open_



@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    counter = Reads(slide_files())
    monkeypatch.setattr(pydicom, "dcmread", counter.count_dcmread(pydicom.dcmread))
    monkeypatch.setattr(WsiDicom, "open", staticmethod(counter.count_open(WsiDicom.open)))
    yield counter


def test_a_job_reads_its_slide_once_to_open_and_encode(reads: Reads, tmp_path: Path) -> None:
    result = make_result()  # the analysis' stand-in reads the headers itself: not counted
    reads.dcmreads.clear()
    with Slide.open(slide_files()) as slide:
        assert reads.wsidicom_opens == 1
        assert reads.dcmreads == {n: 1 for n in reads.names}
        assert [str(ds.SOPInstanceUID) for ds in slide.base_headers] == list(result.sop_instance_uids)
        objects = encode_results(result, slide, platelets_detected=2)
        metadata = slide.metadata()
    assert set(objects) == {"sr", "ann", "pdf", "sc"}  # the gallery's crops came from the open slide
    assert reads.wsidicom_opens == 1, "encoding opened the slide again"
    assert reads.dcmreads == {n: 1 for n in reads.names}, "encoding read a header again"
    assert (metadata["width"], metadata["height"]) == (result.total_pixel_matrix_columns,
                                                       result.total_pixel_matrix_rows)

    out = tmp_path / "results"
    write_summary(out, result, SLIDE, objects, {"read": 0.1}, {"platelets": 2})
    summary = read_summary(out)
    assert json.loads((out / "summary.json").read_text())["schema"] == "cytonode.slide-summary/1"
    assert summary.cell_count == 7 and [c["cell_id"] for c in summary.flagged] == [1, 4, 5, 6]
    assert summary.files["sc"]["sop_instance_uid"] == str(objects["sc"].SOPInstanceUID)
    assert SlideSummary.from_json(summary.to_json()) == summary


def test_a_summary_of_an_unknown_version_or_without_its_cells_is_refused(tmp_path: Path) -> None:
    result = make_result()
    write_summary(tmp_path, result, SLIDE, {}, {}, {})
    document = json.loads((tmp_path / "summary.json").read_text())
    with pytest.raises(ResultSchemaError, match="unknown schema 'cytonode.slide-summary/9'"):
        SlideSummary.from_json(json.dumps({**document, "schema": "cytonode.slide-summary/9"}))
    del document["cells"]
    with pytest.raises(ResultSchemaError, match="missing field.*cells"):
        SlideSummary.from_json(json.dumps(document))
