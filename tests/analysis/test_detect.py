"""The white-cell finder on real BCCD smear fields and on slides made from them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.crops import (
    CropConfig,
    crop_cell,
    crop_cell_from_image,
    crop_side_um,
    slide_scale_check,
)
from analysis.detect import (
    DEFAULT_FIELD_PIXEL_SPACING_UM,
    DetectorConfig,
    _tile_origins,
    find_cells,
    find_cells_in_image,
    nucleus_score,
)
from analysis.framing import FIELD_OF_VIEW_UM, red_cell_diameter_px
from analysis.tiles import Slide
from dicom_node.app.cli import main
from dicom_node.make_slide import make_slide
from tests.analysis.conftest import SAMPLE_GAP_PX, sample_field_origin
from tests.analysis.conftest import bccd_image as _bccd_field

SPACING = DEFAULT_FIELD_PIXEL_SPACING_UM  # BCCD fields, by the red-cell ruler


def _inside(x: float, y: float, box: tuple[float, float, float, float]) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


@pytest.mark.parametrize("index", [0, 8, 9, 10, 15, 20, 40, 100])
def test_each_white_cell_of_a_field_is_found_once(index: int, field_image, field_boxes) -> None:
    rgb = np.asarray(Image.open(field_image(index)).convert("RGB"))
    det = find_cells_in_image(rgb, SPACING)
    boxes = field_boxes(index)
    assert len(det.cells) == len(boxes)
    for box in boxes:
        assert sum(_inside(c.x, c.y, box) for c in det.cells) == 1
    for cell in det.cells:
        x0, y0, x1, y1 = cell.bbox
        assert x0 <= cell.x < x1 and y0 <= cell.y < y1
        assert 25 < cell.area_um2 < 400  # a white cell, not a platelet or a clump of red cells
        assert cell.nucleus_area_um2 < cell.area_um2
        xs = [p[0] for p in cell.outline]
        assert min(xs) >= x0 - 1 and max(xs) <= x1 + 1


def test_platelets_are_counted_apart_from_white_cells(field_image, field_boxes) -> None:
    index = 30  # three annotated platelets, one white cell
    rgb = np.asarray(Image.open(field_image(index)).convert("RGB"))
    det = find_cells_in_image(rgb, SPACING)
    platelet_boxes = field_boxes(index, "Platelets")
    assert platelet_boxes
    found = [b for b in platelet_boxes if any(_inside(x, y, b) for x, y in det.platelets)]
    assert len(found) >= 2, "annotated platelets are counted as platelets"
    assert len(det.cells) == len(field_boxes(index))
    assert not any(_inside(c.x, c.y, b) for c in det.cells for b in platelet_boxes)


def _cell_free_crops(field_image, field_boxes, tmp_path: Path) -> list[Path]:
    """Real smear regions with red cells only: BCCD fields cut beside their white cells."""
    out = []
    for index in (0, 20, 100):
        rgb = np.asarray(Image.open(field_image(index)).convert("RGB"))
        x0, _y0, x1, _y1 = field_boxes(index)[0]
        margin = 40
        if x0 > 320:
            part = rgb[:, : int(x0) - margin]
        else:
            part = rgb[:, int(x1) + margin:]
        path = tmp_path / f"free_{index}.png"
        Image.fromarray(part[:, :200]).save(path)
        out.append(path)
    return out


def test_a_smear_without_white_cells_gives_an_empty_result(
        field_image, field_boxes, tmp_path: Path) -> None:
    crops = _cell_free_crops(field_image, field_boxes, tmp_path)
    for path in crops:
        assert find_cells_in_image(np.asarray(Image.open(path)), SPACING).cells == ()
    files = make_slide(crops, tmp_path / "slide", columns=3)
    with Slide.open(tmp_path / "slide") as slide:
        assert find_cells(slide).cells == ()
    assert len(files) >= 2


def test_tile_cores_cover_the_axis_once() -> None:
    for length, tile, overlap in ((1000, 300, 80), (301, 300, 80), (5000, 1024, 200), (100, 300, 80)):
        spans = list(_tile_origins(length, tile, overlap))
        cores = [(c0, c1) for _, c0, c1 in spans]
        assert cores[0][0] == 0 and cores[-1][1] == length
        assert all(a[1] == b[0] for a, b in itertools.pairwise(cores))
        for start, c0, c1 in spans:  # a core keeps half the overlap away from inner tile edges
            assert start <= c0 and c1 <= start + tile
            assert c0 == 0 or c0 - start >= overlap // 2
            assert c1 == length or start + tile - c1 >= overlap // 2


def test_a_cell_on_a_tile_border_is_found_once(sample_slide: Path) -> None:
    with Slide.open(sample_slide) as slide:
        whole = find_cells(slide, DetectorConfig(tile_size_px=4096))
        tiled = find_cells(slide, DetectorConfig(tile_size_px=300))
        level = slide.level_for_spacing(DetectorConfig().working_spacing_um)
    assert len(whole.cells) == 7  # the seven annotated white cells of the six fields
    # with 300 px tiles at the working level, tile edges cross cells: prove it
    factor = level.pixel_spacing_um / DetectorConfig().working_spacing_um
    tile = max(round(300 / factor),
               2 * int(np.ceil(25.0 * 1.2 / level.pixel_spacing_um)) + 64)
    overlap = int(np.ceil(25.0 * 1.2 / level.pixel_spacing_um))
    edges = sorted({s for s, _, _ in _tile_origins(level.size[0], tile, overlap)}
                   | {s + tile for s, _, _ in _tile_origins(level.size[0], tile, overlap)})
    crossed = [c for c in whole.cells
               if any(c.bbox[0] < e * level.downsample < c.bbox[2] for e in edges)]
    assert crossed, "the tiling must cut through at least one cell"
    assert len(tiled.cells) == len(whole.cells)
    for a, b in zip(sorted(whole.cells, key=lambda c: c.x), sorted(tiled.cells, key=lambda c: c.x)):
        assert abs(a.x - b.x) < 3 and abs(a.y - b.y) < 3


def test_made_slide_finds_the_annotated_cells(sample_slide: Path, field_boxes, sample_fields) -> None:
    with Slide.open(sample_slide) as slide:
        det = find_cells(slide)
    boxes = []
    for k, index in enumerate(sample_fields):
        ox, oy = sample_field_origin(k)
        boxes += [(b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy) for b in field_boxes(index)]
    for box in boxes:
        assert sum(_inside(c.x, c.y, box) for c in det.cells) == 1


def test_crops_centre_the_cell_in_one_field_of_view(sample_slide: Path, field_image) -> None:
    """Every crop is the same 26 um square around its cell (the framing of every training cell),
    at the model's input size, with the chromatin in the middle; a field image framed in memory
    gives the same crop as the slide."""
    config = CropConfig(output_size=96)
    with Slide.open(sample_slide) as slide:
        cells = find_cells(slide).cells
        crops = [crop_cell(slide, c, config) for c in cells]
    for cell, crop in zip(cells, crops):
        assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8
        score = nucleus_score(crop)
        centre = score[36:60, 36:60].mean()
        rim = np.concatenate([score[:9].ravel(), score[-9:].ravel()]).mean()
        assert centre > rim + 0.05, "the chromatin sits in the middle of the frame"
    assert {crop_side_um(c, config) for c in cells} == {FIELD_OF_VIEW_UM}
    rgb = np.asarray(Image.open(field_image(0)).convert("RGB"))
    cell = find_cells_in_image(rgb, SPACING).cells[0]
    same = crop_cell_from_image(rgb, cell, SPACING, config)
    assert np.abs(same.astype(int) - crops[0].astype(int)).mean() < 12


def test_sample_slide_crops_stay_inside_their_own_field(sample_slide: Path) -> None:
    """The sample slide's fields are spaced by empty glass: no crop shows a neighbouring field."""
    with Slide.open(sample_slide) as slide:
        cells = find_cells(slide).cells
        side = FIELD_OF_VIEW_UM / slide.pixel_spacing_um
    for cell in cells:
        k = next(k for k in range(6) if _in_field(cell.x, cell.y, k))
        fx, fy = sample_field_origin(k)
        for x in (cell.x - side / 2, cell.x + side / 2):
            assert _in_field_or_gap(x, fx, 640), (cell, k)
        for y in (cell.y - side / 2, cell.y + side / 2):
            assert _in_field_or_gap(y, fy, 480), (cell, k)


def _in_field(x: float, y: float, k: int) -> bool:
    fx, fy = sample_field_origin(k)
    return fx <= x < fx + 640 and fy <= y < fy + 480


def _in_field_or_gap(v: float, start: int, length: int) -> bool:
    """``v`` lies in the field ``[start, start + length)`` or the glass on either side of it."""
    return start - SAMPLE_GAP_PX < v < start + length + SAMPLE_GAP_PX


def test_red_cell_ruler_reads_the_sample_slide_scale(sample_slide: Path) -> None:
    """The red cells around the sample slide's cells measure about 7.5 um: its spacing passes the
    scale check; told a spacing 30 % too large (as a mis-set scanner would), the check fails."""
    with Slide.open(sample_slide) as slide:
        cells = find_cells(slide).cells
        check = slide_scale_check(slide, cells)
    assert check.ok is True and abs(check.ratio - 1.0) < 0.1, check
    assert check.crops_measured >= 5
    rgb = np.asarray(Image.open(_bccd_field(0)).convert("RGB"))
    found = red_cell_diameter_px(rgb)
    assert found is not None
    assert abs(found[0] * SPACING / 7.5 - 1.0) < 0.15
    assert abs(found[0] * SPACING * 1.3 / 7.5 - 1.0) > 0.15


def test_cli_detect_json_contract(sample_slide: Path, field_image, capsys) -> None:
    assert main(["detect", str(sample_slide), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) == 7
    for cell in doc["cells"]:
        assert set(cell) == {"x", "y", "bbox", "area_um2"}
        x0, y0, x1, y1 = cell["bbox"]
        assert 0 <= x0 < cell["x"] < x1 <= 2308 and 0 <= y0 < cell["y"] < y1 <= 1154
        assert cell["area_um2"] > 0
    assert main(["detect", str(field_image(10)), "--pixel-spacing-um", str(SPACING), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) == 2


def test_cli_detect_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["detect", str(tmp_path / "missing.dcm"), "--json"]) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["detect", str(broken), "--json"]) == 2
    err = capsys.readouterr().err
    assert "cannot decode" in err and len(err.strip().splitlines()) == 1
    assert main(["detect", str(tmp_path), "--json"]) == 2


def test_a_slide_far_denser_in_nuclei_than_any_smear_is_stopped_early(sample_slide: Path) -> None:
    """The early stop that keeps a tissue section from being classified nucleus by nucleus: the
    real sample slide passes the shipped limit (4,000 nucleated objects per mm²), and a limit
    below its own density stops detection after the first area searched, with the numbers."""
    import dataclasses

    from analysis.errors import NotABloodSmearError

    with Slide.open(sample_slide) as slide:
        cells = find_cells(slide).cells
        area_mm2 = slide.size[0] * slide.size[1] * (slide.pixel_spacing_um / 1000) ** 2
        assert len(cells) / area_mm2 < DetectorConfig().max_cells_per_mm2 / 4
        strict = dataclasses.replace(DetectorConfig(), max_cells_per_mm2=len(cells) / area_mm2 / 10,
                                     density_check_mm2=0.001, tile_size_px=256)
        with pytest.raises(NotABloodSmearError, match=r"not a blood smear: [\d,]+ nucleated objects"):
            find_cells(slide, strict)
