"""The white-cell finder on real BCCD smear fields and on slides made from them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.crops import CropConfig, crop_cell, crop_cell_from_image, crop_side_um
from analysis.detect import (
    DetectorConfig,
    _tile_origins,
    find_cells,
    find_cells_in_image,
    nucleus_score,
)
from analysis.tiles import Slide
from dicom_node.cli import main
from dicom_node.make_slide import make_slide

SPACING = 0.075


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
        ox, oy = (k % 3) * 640, (k // 3) * 480
        boxes += [(b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy) for b in field_boxes(index)]
    for box in boxes:
        assert sum(_inside(c.x, c.y, box) for c in det.cells) == 1


def test_crops_centre_the_cell_and_scale_with_its_size(sample_slide: Path, field_image) -> None:
    config = CropConfig()
    with Slide.open(sample_slide) as slide:
        cells = find_cells(slide).cells
        crops = [crop_cell(slide, c, config) for c in cells]
    for cell, crop in zip(cells, crops):
        assert crop.shape == (160, 160, 3) and crop.dtype == np.uint8
        score = nucleus_score(crop)
        centre = score[60:100, 60:100].mean()
        rim = np.concatenate([score[:15].ravel(), score[-15:].ravel()]).mean()
        assert centre > rim + 0.05, "the chromatin sits in the middle of the frame"
    sides = [crop_side_um(c, config) for c in cells]
    small, large = min(cells, key=lambda c: c.diameter_um), max(cells, key=lambda c: c.diameter_um)
    assert crop_side_um(small, config) <= crop_side_um(large, config)
    assert all(config.min_side_um <= s <= config.max_side_um for s in sides)
    rgb = np.asarray(Image.open(field_image(0)).convert("RGB"))
    cell = find_cells_in_image(rgb, SPACING).cells[0]
    same = crop_cell_from_image(rgb, cell, SPACING, config)
    assert np.abs(same.astype(int) - crops[0].astype(int)).mean() < 12


def test_cli_detect_json_contract(sample_slide: Path, field_image, capsys) -> None:
    assert main(["detect", str(sample_slide), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) == 7
    for cell in doc["cells"]:
        assert set(cell) == {"x", "y", "bbox", "area_um2"}
        x0, y0, x1, y1 = cell["bbox"]
        assert 0 <= x0 < cell["x"] < x1 <= 1920 and 0 <= y0 < cell["y"] < y1 <= 960
        assert cell["area_um2"] > 0
    assert main(["detect", str(field_image(10)), "--pixel-spacing-um", "0.075", "--json"]) == 0
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
