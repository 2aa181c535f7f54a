"""The slide reader on real WSI DICOM files: highdicom's test objects and our made slides."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from analysis.errors import SlideUnreadableError
from analysis.tiles import Slide
from tests.analysis.conftest import sample_field_origin


@pytest.mark.parametrize("name", ["sm_image.dcm", "sm_image_jpegls.dcm", "sm_image_jpegls_nobot.dcm",
                                  "sm_image_grayscale.dcm", "sm_image_dots.dcm"])
def test_reads_highdicom_objects_like_pydicom(highdicom_files: Path, name: str) -> None:
    path = highdicom_files / name
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array  # (frames, rows, cols[, 3]) decoded by pydicom
    with Slide.open(path) as slide:
        assert slide.size == (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert slide.pixel_spacing_um == pytest.approx(float(spacing[0]) * 1000)
        region = slide.read_region(0, (0, 0), slide.size)
    assert region.shape == (ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns, 3)
    assert region.dtype == np.uint8
    # TILED_FULL: frame 1 is the top-left tile, frame 2 the one to its right
    first = frames[0] if frames.ndim == 4 or ds.SamplesPerPixel == 1 else frames
    tile = first if first.ndim == 3 else np.repeat(first[..., None], 3, axis=2)
    assert np.array_equal(region[: ds.Rows, : ds.Columns], tile.astype(np.uint8))
    second = frames[1]
    second = second if second.ndim == 3 else np.repeat(second[..., None], 3, axis=2)
    assert np.array_equal(region[: ds.Rows, ds.Columns: 2 * ds.Columns], second.astype(np.uint8))


def test_sample_slide_is_a_pyramid_matching_its_fields(sample_slide: Path, field_image, sample_fields) -> None:
    with Slide.open(sample_slide) as slide:  # the folder also holds README.md
        assert len(slide.levels) >= 2
        assert slide.pixel_spacing_um == pytest.approx(0.0823)
        assert slide.levels[1].pixel_spacing_um == pytest.approx(0.1646)
        assert slide.levels[1].downsample == pytest.approx(2.0)
        # field 2 of the mosaic (third column, first row)
        ox, oy = sample_field_origin(2)
        region = slide.read_region(0, (ox, oy), (640, 480))
        coarse = slide.read_region(1, (ox // 2, oy // 2), (320, 240))
    original = np.asarray(Image.open(field_image(sample_fields[2])).convert("RGB"))
    assert np.abs(region.astype(int) - original).mean() < 3.0  # JPEG q90 twice
    shrunk = np.asarray(Image.fromarray(original).resize((320, 240), Image.Resampling.BOX))
    assert np.abs(coarse.astype(int) - shrunk).mean() < 3.0


def test_level_for_spacing_picks_the_coarsest_fine_enough_level(sample_slide: Path) -> None:
    with Slide.open(sample_slide) as slide:
        assert slide.level_for_spacing(0.2).pixel_spacing_um == pytest.approx(0.1646)
        assert slide.level_for_spacing(0.33).pixel_spacing_um == pytest.approx(0.3292)
        assert slide.level_for_spacing(0.01).index == 0


def test_region_outside_the_level_is_refused(sample_slide: Path) -> None:
    with Slide.open(sample_slide) as slide, pytest.raises(ValueError, match="outside"):
        slide.read_region(0, (2290, 0), (64, 64))


def _base_instance(folder: Path) -> Path:
    return max(folder.glob("*.dcm"), key=lambda p: int(
        pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns))


def test_corrupt_frame_names_the_frame(sample_slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    shutil.copytree(sample_slide, folder)
    base = _base_instance(folder)
    ds = pydicom.dcmread(base)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    columns = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    bad = 1 * columns + 2  # tile (2, 1), 0-based -> frame number 1 + 2 + 1 * columns
    data = base.read_bytes()
    start = data.index(frames[bad])
    garbage = b"\x00" * len(frames[bad])
    base.write_bytes(data[:start] + garbage + data[start + len(garbage):])
    with Slide.open(folder) as slide:
        slide.read_region(0, (0, 0), (256, 256))  # other frames still read
        with pytest.raises(SlideUnreadableError, match=rf"tile \(2, 1\), frame {bad + 1}\b"):
            slide.read_region(0, (512, 256), (256, 256))


def test_missing_pixel_measures_uses_default_with_warning(
        sample_slide: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "slide"
    folder.mkdir()
    for path in sample_slide.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        ds.save_as(folder / path.name)
    with pytest.raises(SlideUnreadableError, match="pixel spacing"):
        Slide.open(folder)
    with caplog.at_level(logging.WARNING, logger="analysis.tiles"):
        with Slide.open(folder, default_pixel_spacing_um=0.1) as slide:
            assert slide.pixel_spacing_um == pytest.approx(0.1)
            assert slide.levels[1].pixel_spacing_um == pytest.approx(0.2)
    assert "no Pixel Measures" in caplog.text
    with Slide.open(sorted(folder.glob("*.dcm")), default_pixel_spacing_um=0.1) as slide:
        # the kept headers are the files' own (the encoders' sources); only wsidicom saw the patch
        assert all("PixelSpacing" not in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                   for ds in slide.base_headers)
        assert slide.metadata()["pixel_spacing_um"] == pytest.approx([0.1, 0.1])


def test_a_list_of_files_opens_with_its_headers_and_metadata(sample_slide: Path) -> None:
    from wsidicom import WsiDicom

    files = sorted(sample_slide.glob("*.dcm"))
    with Slide.open(files) as slide, WsiDicom.open(files) as wsi:
        assert slide.files == tuple(files) and slide.source == sample_slide
        assert [ds.SOPInstanceUID for ds in slide.headers] == [
            pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
        assert "PixelData" not in slide.headers[0]
        base = slide.base_headers
        assert len(base) == 1 and int(base[0].TotalPixelMatrixColumns) == slide.size[0]
        metadata = slide.metadata()
        assert (metadata["width"], metadata["height"]) == slide.size
        assert metadata["pixel_spacing_um"] == pytest.approx([0.0823, 0.0823])
        assert [(lv["level"], lv["width"], lv["height"], lv["tile_width"]) for lv in metadata["levels"]] == [
            (lv.level, lv.size.width, lv.size.height, lv.tile_size.width) for lv in wsi.levels]
    with pytest.raises(FileNotFoundError):
        Slide.open([*files, sample_slide / "missing.dcm"])


def test_not_a_slide_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(SlideUnreadableError, match="no DICOM files"):
        Slide.open(tmp_path)
    with pytest.raises(FileNotFoundError):
        Slide.open(tmp_path / "missing")


def test_header_saying_rgb_over_ycbcr_jpeg_frames_reads_the_same(
        sample_slide: Path, tmp_path: Path) -> None:
    """A known vendor quirk: PhotometricInterpretation RGB while the JPEG frames are YCbCr."""
    folder = tmp_path / "quirk"
    folder.mkdir()
    for path in sample_slide.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        ds.PhotometricInterpretation = "RGB"
        ds.save_as(folder / path.name)
    with Slide.open(sample_slide) as good, Slide.open(folder) as quirky:
        expected = good.read_region(0, (600, 400), (300, 200))
        got = quirky.read_region(0, (600, 400), (300, 200))
    assert np.array_equal(expected, got)
    assert expected[..., 0].mean() > expected[..., 2].mean() - 40  # not swapped into blue/green


def _as_tiled_sparse(source: Path, target: Path) -> None:
    """Rewrite a TILED_FULL instance as TILED_SPARSE: per-frame plane positions (PS3.3 C.8.12.6.1)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = pydicom.dcmread(source)
    columns = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    per_frame = []
    for frame in range(int(ds.NumberOfFrames)):
        row, col = divmod(frame, columns)
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = col * int(ds.Columns) + 1
        position.RowPositionInTotalImagePixelMatrix = row * int(ds.Rows) + 1
        position.XOffsetInSlideCoordinateSystem = 0.0
        position.YOffsetInSlideCoordinateSystem = 0.0
        position.ZOffsetInSlideCoordinateSystem = 0.0
        item = Dataset()
        item.PlanePositionSlideSequence = DicomSequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.save_as(target)


def test_reads_tiled_sparse(sample_slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sparse"
    folder.mkdir()
    for path in sample_slide.glob("*.dcm"):
        _as_tiled_sparse(path, folder / path.name)
    assert pydicom.dcmread(next(folder.glob("*.dcm")),
                           stop_before_pixels=True).DimensionOrganizationType == "TILED_SPARSE"
    with Slide.open(sample_slide) as full, Slide.open(folder) as sparse:
        assert sparse.size == full.size and len(sparse.levels) == len(full.levels)
        expected = full.read_region(0, (500, 300), (700, 400))
        got = sparse.read_region(0, (500, 300), (700, 400))
    assert np.array_equal(expected, got)
