"""Building VL Whole Slide Microscopy series from BCCD fields and from a tiled TIFF."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from analysis.tiles import Slide
from dicom_node.app.cli import main
from dicom_node.make_slide import SlideDescription, convert_slide, make_slide

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BCCD_IMAGES = DATA / "bccd" / "BCCD" / "JPEGImages"
SAMPLE_SLIDE = Path(__file__).resolve().parents[2] / "dicom_node" / "data" / "sample_slide"
VL_WSM = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _fields(*indices: int) -> list[Path]:
    if not BCCD_IMAGES.is_dir():
        pytest.skip("BCCD data not present")
    return [BCCD_IMAGES / f"BloodImage_{i:05d}.jpg" for i in indices]


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _headers(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("made") / "slide"
    description = SlideDescription(patient_id="P-42", slide_identifier="SLIDE-42")
    return make_slide(_fields(0, 8, 9, 10), out, columns=2, description=description)


def test_made_slide_is_a_valid_pyramidal_jpeg_series(made: list[Path]) -> None:
    headers = _headers(made)
    assert len(made) >= 2
    assert len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == len(made)
    sizes = [(int(h.TotalPixelMatrixColumns), int(h.TotalPixelMatrixRows)) for h in headers]
    assert sizes[0] == (1280, 960)  # 2 x 2 fields of 640 x 480, base level first
    assert sizes == sorted(sizes, reverse=True)
    for h in headers:
        assert h.SOPClassUID == VL_WSM
        assert h.file_meta.TransferSyntaxUID == JPEG_BASELINE
        assert h.DimensionOrganizationType == "TILED_FULL"
        assert (h.Rows, h.Columns) == (256, 256)
        assert h.PatientID == "P-42"
        assert h.ContainerIdentifier == "SLIDE-42"
        assert h.BarcodeValue == "SLIDE-42"
        assert h.ContainerTypeCodeSequence[0].CodeValue == "433466003"  # microscope slide
        steps = h.SpecimenDescriptionSequence[0].SpecimenPreparationSequence[0]
        meanings = [item.ConceptCodeSequence[0].CodeMeaning
                    for item in steps.SpecimenPreparationStepContentItemSequence
                    if "ConceptCodeSequence" in item]
        assert "wright stain" in [m.lower() for m in meanings]
        assert h.OpticalPathSequence[0].IlluminationTypeCodeSequence[0].CodeMeaning == \
            "Brightfield illumination"
        assert "DimensionOrganizationUID" in h.DimensionOrganizationSequence[0]
    spacing = [float(h.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
               for h in headers]
    assert spacing[0] == pytest.approx(0.0823e-3)  # BCCD, by the red-cell ruler
    assert spacing[1] == pytest.approx(0.1646e-3)
    assert int(headers[0].NumberOfFrames) == 5 * 4  # ceil(1280/256) x ceil(960/256)


def test_made_slide_passes_dciodvfy(made: list[Path]) -> None:
    for path in made:
        assert _dciodvfy_errors(path) == [], path.name


def test_committed_sample_slide_passes_dciodvfy_and_is_multiframe_pyramid() -> None:
    files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
    assert len(files) >= 2
    assert (SAMPLE_SLIDE / "README.md").is_file()
    headers = _headers(files)
    assert max(int(h.NumberOfFrames) for h in headers) > 1
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert sum(f.stat().st_size for f in files) < 5_000_000
    for path in files:
        assert _dciodvfy_errors(path) == [], path.name


def test_repeat_builds_larger_slides(tmp_path: Path) -> None:
    files = make_slide(_fields(0, 8), tmp_path / "big", repeat=3, columns=3, tile_size=512,
                       jpeg_quality=70)
    base = _headers(files)[0]
    assert (int(base.TotalPixelMatrixColumns), int(base.TotalPixelMatrixRows)) == (1920, 960)
    assert base.Rows == 512
    with Slide.open(tmp_path / "big") as slide:  # fields repeat in order: 0, 8, 0 / 8, 0, 8
        first = slide.read_region(0, (0, 0), (640, 480))
        again = slide.read_region(0, (1280, 0), (640, 480))
    assert np.abs(first.astype(int) - again.astype(int)).mean() < 2.0


def test_tiled_tiff_converts_with_pixels_and_spacing_kept(tmp_path: Path) -> None:
    import tifffile

    field = np.asarray(Image.open(_fields(9)[0]).convert("RGB"))
    image = np.concatenate([field, field[::-1]], axis=0)  # 640 x 960, a real smear
    tiff = tmp_path / "scanner.tif"
    tifffile.imwrite(tiff, image, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    files = convert_slide(tiff, tmp_path / "dicom")
    assert len(files) >= 2  # missing pyramid levels are added
    for path in files:
        assert _dciodvfy_errors(path) == [], path.name
    with Slide.open(tmp_path / "dicom") as slide:
        assert slide.size == (640, 960)
        assert slide.pixel_spacing_um == pytest.approx(0.25)
        region = slide.read_region(0, (0, 0), (640, 960))
    assert np.abs(region.astype(int) - image.astype(int)).mean() < 3.0


def test_ome_tiff_tiles_are_copied_without_reencoding(tmp_path: Path) -> None:
    import tifffile

    field = np.asarray(Image.open(_fields(15)[0]).convert("RGB"))
    tiff = tmp_path / "scanner.ome.tiff"
    with tifffile.TiffWriter(tiff, ome=True) as tif:
        tif.write(field, tile=(256, 256), compression="jpeg", photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.075, "PhysicalSizeY": 0.075})
    with tifffile.TiffFile(tiff) as tif:
        page = tif.pages[0]
        tif.filehandle.seek(page.dataoffsets[1])
        tile_1 = tif.filehandle.read(page.databytecounts[1])
    files = convert_slide(tiff, tmp_path / "dicom")
    ds = pydicom.dcmread(files[0])
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    # the scan data of tile 1 appears unchanged in frame 2 (headers may be merged with tables)
    scan = tile_1[tile_1.index(b"\xff\xda"):]
    assert scan[:-2] in frames[1]


def test_cli_make_slide_then_detect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = [str(p) for p in _fields(0, 10)]
    assert main(["make-slide", *images, "--out", str(tmp_path / "s"), "--slide-id", "CLI-1"]) == 0
    written = json.loads(capsys.readouterr().out)["files"]
    assert len(written) >= 2 and all(Path(f).is_file() for f in written)
    assert main(["detect", str(tmp_path / "s"), "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert len(cells) == 3  # one white cell in field 0, two in field 10


def test_cli_make_slide_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-slide", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["make-slide", str(notes), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "no reader supports" in err and len(err.strip().splitlines()) == 1
    images = [str(p) for p in _fields(0)]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["make-slide", *images, "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_gap_spaces_the_fields_with_glass(tmp_path: Path) -> None:
    """``gap_um`` puts empty glass between fields: the slide grows by the gap, the second field
    starts after it unchanged, and the gap is one flat, light colour (no seam a crop could show)."""
    files = make_slide(_fields(0, 8), tmp_path / "gap", columns=2, gap_um=16.0)
    base = _headers(files)[0]
    gap = round(16.0 / 0.0823)
    assert (int(base.TotalPixelMatrixColumns), int(base.TotalPixelMatrixRows)) == (1280 + gap, 480)
    original = np.asarray(Image.open(_fields(8)[0]).convert("RGB")).astype(int)
    with Slide.open(tmp_path / "gap") as slide:
        second = slide.read_region(0, (640 + gap, 0), (640, 480)).astype(int)
        glass = slide.read_region(0, (640 + 16, 16), (gap - 32, 448)).astype(int)
    assert np.abs(second - original).mean() < 3.0
    assert glass.std(axis=(0, 1)).max() < 3.0 and glass.mean() > 150
    with pytest.raises(ValueError, match="gap_um"):
        make_slide(_fields(0), tmp_path / "bad", gap_um=-1.0)
