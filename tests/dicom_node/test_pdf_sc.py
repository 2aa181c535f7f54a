"""The report any PACS shows (issue 20, part 3): the Encapsulated PDF report and the Secondary
Capture gallery of the flagged cells, made next to the SR.

A result on the real sample slide (the seven white cells ``cytonode detect`` finds on it, with
chosen classes and flags) goes through the node's own encoding step
(:func:`dicom_node.jobs.encoding.encode_results`, as the worker and ``cytonode analyze`` call it). The
objects are checked with real peers: dciodvfy (dicom3tools), DCMTK's dsr2html, pypdf's text
extraction, Orthanc receiving them from the node's outbox, and the viewer's sign-off issuing the
final PDF.
"""

from __future__ import annotations

import contextlib
import html
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
import pytest
import requests
from sqlalchemy import select

from analysis.classes import CLASS_NAMES
from analysis.results import CellResult, ModelProvenance, SlideResult
from dicom_node.encode.differential import Differential
from dicom_node.encode.pdf import (
    ENCAPSULATED_PDF_STORAGE,
    FINAL_PDF_SERIES_NUMBER,
    PDF_SERIES_NUMBER,
)
from dicom_node.encode.sc import (
    SC_SERIES_NUMBER,
    TILE,
    gallery_cells,
    read_flagged_crops,
    tile_origin,
)
from dicom_node.jobs.encoding import encode_results
from dicom_node.jobs.result import write_summary
from dicom_node.settings import Destination, Settings
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, OutboxItem
from dicom_node.store.outbox import enqueue
from tests.dicom_factory import dciodvfy_errors, ellipse_outline, slide_result
from tests.peers import NodeProcess, OrthancProcess

if TYPE_CHECKING:
    from flask.testing import FlaskClient

pypdf = pytest.importorskip("pypdf")

SLIDE = Path(__file__).resolve().parents[2] / "dicom_node" / "data" / "sample_slide"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PLATELETS_DETECTED = 3

# `cytonode detect dicom_node/data/sample_slide --json`: centre, bbox and area of the sample
# slide's seven white cells (base-level pixels), with the class and review reasons we give them.
CELLS = [
    (381.7, 263.8, (269, 179, 489, 358), 159.04, "neutrophil", ()),
    (994.5, 274.9, (891, 179, 1108, 384), 201.24, "basophil", ("high-uncertainty", "models-disagree")),
    (1816.2, 319.1, (1693, 218, 1922, 418), 160.28, "eosinophil", ()),
    (1087.1, 789.4, (986, 685, 1206, 907), 237.52, "neutrophil", ()),
    (102.8, 996.1, (14, 901, 188, 1123), 153.0, "eosinophil", ("high-uncertainty",)),
    (387.3, 1007.3, (281, 930, 503, 1079), 113.12, "monocyte", ("high-anomaly-score",)),
    (2078.9, 1078.8, (2031, 1027, 2131, 1123), 42.48, "erythroblast", ("significant-class",)),
]
ABNORMAL = 5


def slide_files() -> list[Path]:
    return sorted(SLIDE.glob("*.dcm"))


def make_result(*, flagged: bool = True) -> SlideResult:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in slide_files()]
    base = max(headers, key=lambda ds: int(ds.TotalPixelMatrixColumns))
    cells = []
    for i, (x, y, bbox, area, label, reasons) in enumerate(CELLS):
        reasons = reasons if flagged else ()
        probabilities = {c: 0.02 for c in CLASS_NAMES}
        probabilities[label] = 1.0 - 0.02 * 7
        abnormal = flagged and i == ABNORMAL
        cells.append(CellResult(
            cell_id=i, x=x, y=y, outline=ellipse_outline(bbox), bbox=bbox, area_um2=area, label=label,
            probabilities=probabilities, uncertainty=0.6 if reasons else 0.1,
            anomaly_score=3.0 if abnormal else 0.0, review=bool(reasons), review_reasons=reasons,
            abnormal=abnormal, abnormal_reason="high-anomaly-score" if abnormal else None))
    return slide_result(base, cells, ModelProvenance("cytodiffusion", "0.3.1", "0123456789abcdef" * 4,
                                                     {"field_of_view_um": 26.0, "n_timesteps": 8}))


@pytest.fixture(scope="module")
def result() -> SlideResult:
    return make_result()


@pytest.fixture(scope="module")
def made(result: SlideResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pdf_sc")
    objects = encode_results(result, slide_files(), platelets_detected=PLATELETS_DETECTED)
    paths = {}
    for kind, ds in objects.items():
        paths[kind] = out / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return paths


def pdf_text(path: Path) -> str:
    """The text of an Encapsulated PDF instance's document, whitespace collapsed."""
    ds = pydicom.dcmread(path)
    document = bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF-") and b"%%EOF" in document[-32:]
    from io import BytesIO

    reader = pypdf.PdfReader(BytesIO(document))
    return " ".join(" ".join(page.extract_text() for page in reader.pages).split())


def _html_text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


# --- What is made, where ---------------------------------------------------------------------
def test_pdf_and_gallery_are_made_next_to_the_sr_in_the_slide_study(made: dict[str, Path],
                                                                    result: SlideResult) -> None:
    assert set(made) == {"sr", "ann", "pdf", "sc"}  # no heatmaps: no SEG
    objects = {kind: pydicom.dcmread(path, stop_before_pixels=True) for kind, path in made.items()}
    base = next(ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in slide_files())
                if ds.SOPInstanceUID == result.sop_instance_uids[0])
    for kind, ds in objects.items():
        assert ds.StudyInstanceUID == result.study_instance_uid, kind
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyID"):
            assert ds.get(keyword) == base.get(keyword), (kind, keyword)
    series = [str(ds.SeriesInstanceUID) for ds in objects.values()]
    assert len(set(series)) == len(series) and result.series_instance_uid not in series
    pdf, sc = objects["pdf"], objects["sc"]
    assert (pdf.SOPClassUID, pdf.Modality, int(pdf.SeriesNumber)) == (
        ENCAPSULATED_PDF_STORAGE, "DOC", PDF_SERIES_NUMBER)
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert "preliminary" in pdf.DocumentTitle.lower()
    assert [str(i.ReferencedSOPInstanceUID) for i in pdf.SourceInstanceSequence] == [
        result.sop_instance_uids[0]]
    assert (sc.SOPClassUID, sc.Modality, int(sc.SeriesNumber)) == (SC_IMAGE_STORAGE, "OT", SC_SERIES_NUMBER)
    assert sc.ContainerIdentifier == base.ContainerIdentifier


def test_dciodvfy_reports_no_errors_on_pdf_and_gallery(made: dict[str, Path]) -> None:
    assert dciodvfy_errors(made["pdf"]) == []
    assert dciodvfy_errors(made["sc"]) == []


# --- The PDF ---------------------------------------------------------------------------------
def test_pdf_holds_identity_differential_flags_and_provenance(made: dict[str, Path],
                                                              result: SlideResult) -> None:
    text = pdf_text(made["pdf"])
    ds = pydicom.dcmread(made["pdf"], stop_before_pixels=True)
    assert "Report status: PRELIMINARY, UNVERIFIED" in text and "Not verified" in text
    assert f"Patient ID {ds.PatientID}" in text and f"Accession number {ds.AccessionNumber}" in text
    assert str(ds.PatientName).split("^")[0] in text and result.study_instance_uid in text
    expected = Differential.from_result(result, platelets_detected=PLATELETS_DETECTED)
    assert f"{expected.white_cell_count} white cells counted" in text
    for count in expected.white_cells:  # the table row: class, count, percentage, interval
        name = {"ig": "Immature granulocyte"}.get(count.label.value, count.label.value.capitalize())
        low, high = count.confidence_interval
        assert f"{name} {count.count} {count.percentage:.1f} {low:.1f} - {high:.1f}" in text, name
    assert expected.nrbc_text in text and expected.platelet_text in text
    assert expected.note is not None and expected.note in text
    assert expected.flag_text in text  # "4 flagged for review (1 unlike any training class)"
    assert "#1 Basophil 0.86 uncertain; models disagree" in text
    assert "#5 Monocyte 0.86 suspected abnormal; unlike any training class" in text
    assert "#6 Erythroblast 0.86 significant class" in text
    assert "#0 " not in text  # an unflagged cell is not listed
    assert "cytodiffusion version 0.3.1" in text and "0123456789abcdef" * 4 in text


# --- The gallery -----------------------------------------------------------------------------
def test_gallery_shows_each_flagged_cell_as_cropped_from_the_slide(made: dict[str, Path],
                                                                  result: SlideResult) -> None:
    cells = gallery_cells(result)
    assert [c.cell_id for c in cells] == [5, 1, 4, 6]  # suspected abnormal first
    pixels = pydicom.dcmread(made["sc"]).pixel_array
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    crops = read_flagged_crops(result, slide_files())
    assert sorted(crops) == sorted(c.cell_id for c in cells)
    for index, cell in enumerate(cells):
        x, y = tile_origin(index, len(cells))
        tile = pixels[y:y + TILE, x:x + TILE]
        np.testing.assert_array_equal(tile, crops[cell.cell_id])
        # a stained white cell at the centre: its nucleus is far bluer than the glass
        centre = tile[TILE // 3:2 * TILE // 3, TILE // 3:2 * TILE // 3].astype(int)
        assert (centre[..., 2] - centre[..., 0]).max() > 30, cell.cell_id
        label_strip = pixels[y + TILE + 2:y + TILE + 34, x:x + TILE]
        assert (label_strip < 128).any(), f"cell {cell.cell_id} has no label"


# --- The SR in a PACS-independent renderer ---------------------------------------------------
def test_dsr2html_renders_the_differential_of_the_sr(made: dict[str, Path], result: SlideResult,
                                                     tmp_path: Path) -> None:
    dsr2html = shutil.which("dsr2html")
    if dsr2html is None:
        pytest.skip("dsr2html (DCMTK) not installed")
    out = subprocess.run([dsr2html, str(made["sr"]), str(tmp_path / "sr.html")], capture_output=True,
                         text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    text = _html_text((tmp_path / "sr.html").read_text(errors="replace"))
    assert "PRELIMINARY" in text and "UNVERIFIED" in text
    expected = Differential.from_result(result, platelets_detected=PLATELETS_DETECTED)
    # each white-cell class's group: its name, then its count and percentage
    names = ["Neutrophil", "Eosinophil", "Basophil", "Lymphocyte", "Monocyte", "Immature granulocyte"]
    for name, count in zip(names, expected.white_cells, strict=True):
        group = re.search(rf"\b{name}\b(.*?)(?:Measurement Group|$)", text)
        assert group is not None, f"{name} not in the rendered SR"
        numbers = re.search(r"([0-9.]+) \{cells\} ([0-9.]+) %", group.group(1))
        assert numbers is not None, f"{name}: no count and percentage rendered"
        assert float(numbers.group(1)) == count.count, name
        assert float(numbers.group(2)) == pytest.approx(count.percentage, abs=1e-6), name


# --- Sign-off issues the final PDF with the final SR -------------------------------------------
@contextlib.contextmanager
def _signer_on_case(settings: Settings, result: SlideResult, objects: dict[str, Any],
                    ) -> Iterator[tuple[Store, FlaskClient, str]]:
    """The slide and its analysis objects stored as the worker stores them, the summary written,
    a pathologist logged in: the store, the client and its CSRF token (the store closes after)."""
    from dicom_node.app.web import make_web_app
    from tests.viewer.conftest import PASSWORD, login
    from viewer.auth import add_user

    store = Store(settings)
    try:
        for path in slide_files():
            store.ingest_file(path)
        for ds in objects.values():
            store.add_dataset(ds)  # as the worker stores them
        write_summary(settings.results_dir / result.series_instance_uid, result, SLIDE, objects, {},
                      {"platelets": PLATELETS_DETECTED})
        add_user(store, "signer", "pathologist", PASSWORD, person_name="Curie^Marie",
                 organization="Haematology Lab")
        client = make_web_app(settings, store).test_client()
        yield store, client, login(client, "signer")
    finally:
        store.close()


def test_signoff_issues_a_final_pdf_with_the_final_sr(tmp_path: Path) -> None:
    from tests.viewer.conftest import PASSWORD

    result = make_result(flagged=False)  # no flagged cell: no gallery, nothing unreviewed
    objects = encode_results(result, slide_files(), platelets_detected=PLATELETS_DETECTED)
    assert set(objects) == {"sr", "ann", "pdf"}
    settings = Settings(data_dir=tmp_path / "node",
                        destinations=(Destination("PACS", "127.0.0.1", 11112),))
    uid = result.series_instance_uid
    with _signer_on_case(settings, result, objects) as (store, client, token):
        rsp = client.post(f"/api/cases/{uid}/cells/0", json={"label": "lymphocyte"},
                          headers={"X-CSRF-Token": token})
        assert rsp.status_code == 200, rsp.get_data(as_text=True)
        rsp = client.post(f"/cases/{uid}/signoff", data={"password": PASSWORD, "csrf_token": token},
                          headers={"Accept": "application/json"})
        assert rsp.status_code == 200, rsp.get_data(as_text=True)
        signed = rsp.get_json()
        with store.session() as db:
            queued = set(db.scalars(select(OutboxItem.sop_instance_uid)).all())
            path = store.path_of(db.get(Instance, signed["pdf_sop_instance_uid"]))
        assert {signed["sop_instance_uid"], signed["pdf_sop_instance_uid"]} <= queued
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert (ds.SOPClassUID, int(ds.SeriesNumber), int(ds.InstanceNumber)) == (
        ENCAPSULATED_PDF_STORAGE, FINAL_PDF_SERIES_NUMBER, signed["version"])
    assert ds.StudyInstanceUID == result.study_instance_uid and "final" in ds.DocumentTitle.lower()
    assert signed["sop_instance_uid"] in {str(i.ReferencedSOPInstanceUID) for i in ds.SourceInstanceSequence}
    assert dciodvfy_errors(path) == []
    text = pdf_text(path)
    assert "Report status: FINAL, VERIFIED" in text
    assert "Verified by Curie, Marie (Haematology Lab)" in text and "report version 1" in text
    assert "Cells changed by the reviewer: 1" in text
    assert "#0 Neutrophil Lymphocyte changed by the reviewer" in text
    # the reviewed differential: 2 lymphocytes now (cell 0 and cell 6 is an erythroblast)
    reviewed = [c[4] for c in CELLS]
    reviewed[0] = "lymphocyte"
    white = [r for r in reviewed if r not in ("erythroblast", "platelet")]
    n = len(white)
    share = 100.0 * white.count("lymphocyte") / n
    assert f"Lymphocyte {white.count('lymphocyte')} {share:.1f}" in text


def test_the_final_pdf_names_flagged_cells_signed_without_review(tmp_path: Path) -> None:
    from tests.viewer.conftest import PASSWORD

    result = make_result(flagged=True)
    flagged = [c.cell_id for c in result.cells if c.review]
    assert flagged
    objects = encode_results(result, slide_files(), platelets_detected=PLATELETS_DETECTED)
    uid = result.series_instance_uid
    with _signer_on_case(Settings(data_dir=tmp_path / "node"), result, objects) as (store, client, token):
        form = {"password": PASSWORD, "csrf_token": token}
        rsp = client.post(f"/cases/{uid}/signoff", data=form, headers={"Accept": "application/json"})
        assert rsp.status_code == 409, rsp.get_data(as_text=True)  # nobody looked at them
        rsp = client.post(f"/cases/{uid}/signoff", data={**form, "confirm_unreviewed": "yes"},
                          headers={"Accept": "application/json"})
        assert rsp.status_code == 200, rsp.get_data(as_text=True)
        with store.session() as db:
            path = store.path_of(db.get(Instance, rsp.get_json()["pdf_sop_instance_uid"]))
    text = pdf_text(path)
    n = len(flagged)
    assert (f"Signed with {n} flagged cell{'s' if n != 1 else ''} not reviewed (confirmed by the signer): "
            + ", ".join(f"#{c}" for c in flagged)) in text


# --- Orthanc receives them with the SR ---------------------------------------------------------
def test_pdf_and_gallery_arrive_in_orthanc_with_the_sr(made: dict[str, Path], result: SlideResult,
                                                       tmp_path: Path) -> None:
    orthanc = OrthancProcess(tmp_path / "orthanc", {})
    node = NodeProcess(tmp_path / "node", destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                       outbox_retry_initial_s=0.5, outbox_retry_max_s=2)
    orthanc.start()
    try:
        for path in slide_files():  # the PACS holds the slide
            orthanc.upload(path)
        node.start()
        store = Store(Settings.from_env(node.env))
        try:
            sent = {}
            for kind in ("sr", "pdf", "sc"):  # stored and queued as the worker does
                stored = store.add_dataset(pydicom.dcmread(made[kind]))
                assert enqueue(store, stored.sop_instance_uid) == 1
                sent[kind] = stored.sop_instance_uid
        finally:
            store.close()
        node.wait_for(lambda s: s["outbox"]["sent"] == 3, what="outbox delivery of SR, PDF and SC")
        found = {kind: orthanc.find_instance(uid) for kind, uid in sent.items()}
        assert all(len(ids) == 1 for ids in found.values()), found
        studies = {requests.get(f"{orthanc.url}/instances/{ids[0]}/study", timeout=30).json()["ID"]
                   for ids in found.values()}
        assert len(studies) == 1  # one study in the PACS: the slide's
        study = requests.get(f"{orthanc.url}/studies/{studies.pop()}", timeout=30).json()
        assert study["MainDicomTags"]["StudyInstanceUID"] == result.study_instance_uid
        assert len(study["Series"]) == 4  # the slide, the SR, the PDF and the gallery
        # Orthanc knows the PDF as a PDF and renders the gallery
        pdf = requests.get(f"{orthanc.url}/instances/{found['pdf'][0]}/pdf", timeout=30)
        assert pdf.ok and pdf.content.startswith(b"%PDF-")
        ds = pydicom.dcmread(made["pdf"], stop_before_pixels=True)
        assert pdf.content[:int(ds.EncapsulatedDocumentLength)] == bytes(
            ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)]
        preview = requests.get(f"{orthanc.url}/instances/{found['sc'][0]}/preview", timeout=30)
        assert preview.ok and preview.content.startswith(b"\x89PNG")
    finally:
        node.cleanup()
        orthanc.stop()
