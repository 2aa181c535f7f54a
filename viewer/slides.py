"""The slide view: OpenSeadragon over a tile endpoint that serves the stored DICOM frames.

Tiles are addressed by ``k``, the power of two the level is downsampled by (OpenSeadragon's
level ``maxLevel - k``), and the tile's column and row. When the stored pyramid holds a level
with that downsample and the viewer's tile size, the stored JPEG frame is sent as it is (no
decoding, no re-encoding); otherwise the tile is rendered from the next finer level.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Response, abort, jsonify, render_template, send_from_directory
from PIL import Image

from dicom_node.encode.ann import CLASS_DISPLAY_COLOURS
from dicom_node.store import queries
from dicom_node.store.files import Store
from viewer import cases, common
from viewer.auth import login_required

bp = Blueprint("slides", __name__)
bp.before_request(common.check_csrf)

TILE_SIZE = 256
JPEG_QUALITY = 90
#: node_modules at the repository root (``npm ci`` by ``make``); only OpenSeadragon's build is served.
OPENSEADRAGON_DIR = (Path(__file__).resolve().parent.parent / "node_modules" / "openseadragon"
                     / "build" / "openseadragon")
#: Colours of the overlays and labels, by class name. The outlines are drawn over red cells, so
#: every colour is dark: at least 3:1 contrast (WCAG 2 non-text contrast) against the red cells
#: (:data:`RED_CELL_RGB`) and the background of a smear, and more against the white page. The
#: table is the bulk annotations' (:data:`dicom_node.encode.ann.CLASS_DISPLAY_COLOURS`), so that a
#: cell has the same colour in every viewer.
CLASS_COLOURS = {label.value: colour for label, colour in CLASS_DISPLAY_COLOURS.items()}
#: The dashed outline of flagged cells (the same 3:1 rule).
FLAG_COLOUR = "#870000"
#: Red cells of the bundled sample smear (May-Gruenwald-Giemsa): the median and the darker
#: quartile of their pixels; the plasma between them is lighter (about #d0d2cf).
RED_CELL_RGB = ((179, 146, 164), (173, 139, 154))
SMEAR_BACKGROUND_RGB = (208, 210, 207)
#: One line per heatmap kind, under its colour scale (low values are transparent).
HEATMAP_LEGEND = {
    "counterfactual-evidence": "where the called class explains the cell better than the runner-up "
                               "(yellow: little, red: most)",
    "anomaly": "where no class the model learned explains the cells (yellow: little, red: most)",
}


def contrast_ratio(a: tuple[int, int, int] | str, b: tuple[int, int, int] | str) -> float:
    """WCAG 2 contrast ratio of two sRGB colours (``"#rrggbb"`` or an RGB tuple), 1 to 21."""
    def luminance(colour: tuple[int, int, int] | str) -> float:
        if isinstance(colour, str):
            colour = (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))
        linear = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4
                  for c in colour]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


class FrameTable:
    """Where each JPEG frame of a TILED_FULL instance lies in its file (one fragment per frame).

    Found once by walking the encapsulated Pixel Data's item headers (PS3.5 A.4); frames are
    then read with ``os.pread``, without a lock and without decoding.
    """

    def __init__(self, path: str) -> None:
        import struct

        import pydicom

        ds = pydicom.dcmread(path, defer_size=256)
        self.columns = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
        self.rows = -(-int(ds.TotalPixelMatrixRows) // int(ds.Rows))
        frames = int(ds.get("NumberOfFrames") or 1)
        if (ds.get("DimensionOrganizationType") != "TILED_FULL"
                or int(ds.get("TotalPixelMatrixFocalPlanes") or 1) != 1
                or int(ds.get("NumberOfOpticalPaths") or 1) != 1
                or frames != self.columns * self.rows):
            raise ValueError("not a single-plane TILED_FULL instance")
        element = ds.get_item("PixelData")
        offset = getattr(element, "value_tell", None) or getattr(element, "file_tell", None)
        if offset is None or not ds.file_meta.TransferSyntaxUID.is_encapsulated:
            raise ValueError("no encapsulated pixel data")
        self.fd = os.open(path, os.O_RDONLY)
        self.frames: list[tuple[int, int]] = []
        position = int(offset)
        first = True
        while True:
            header = os.pread(self.fd, 8, position)
            if len(header) < 8:
                break
            group, elem, length = struct.unpack("<HHI", header)
            if (group, elem) == (0xFFFE, 0xE0DD):  # sequence delimiter
                break
            if (group, elem) != (0xFFFE, 0xE000):
                raise ValueError("unexpected item in encapsulated pixel data")
            if not first:  # the first item is the Basic Offset Table
                self.frames.append((position + 8, length))
            first = False
            position += 8 + length
        if len(self.frames) != frames:
            os.close(self.fd)
            raise ValueError("not one fragment per frame")

    def read(self, col: int, row: int) -> bytes:
        if not (0 <= col < self.columns and 0 <= row < self.rows):
            abort(404)
        position, length = self.frames[row * self.columns + col]
        return os.pread(self.fd, length, position)

    def close(self) -> None:
        os.close(self.fd)


class SlideHandle:
    """One stored slide series opened with wsidicom, shared by the request threads."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        from wsidicom import WsiDicom

        self.paths = paths
        self.lock = threading.Lock()
        self.wsi = WsiDicom.open([Path(p) for p in paths])
        base = self.wsi.levels[0]
        self.width, self.height = base.size.width, base.size.height
        #: downsample exponent k -> (wsidicom level number, level width, height, tile w, tile h)
        self.levels: dict[int, tuple[int, int, int, int, int]] = {}
        for level in self.wsi.levels:
            factor = self.width / level.size.width
            k = round(math.log2(factor)) if factor > 0 else -1
            if k >= 0 and abs(2 ** k - factor) / factor < 0.01:
                self.levels[k] = (level.level, level.size.width, level.size.height,
                                  level.tile_size.width, level.tile_size.height)
        #: k -> the stored frames of that level, read straight from the file
        self.frame_tables: dict[int, FrameTable] = {}
        for path in paths:
            try:
                table = FrameTable(path)
            except (ValueError, AttributeError, TypeError, KeyError):
                continue  # not a plain tiled level: wsidicom reads it
            level_w = table.columns  # tiles across; the level is matched by its size
            for k, stored in self.levels.items():
                if -(-stored[1] // stored[3]) == level_w and -(-stored[2] // stored[4]) == table.rows \
                        and k not in self.frame_tables and self._size_of(path) == stored[1:3]:
                    self.frame_tables[k] = table
                    break
            else:
                table.close()

    @property
    def max_level(self) -> int:
        """OpenSeadragon's highest level: the base image."""
        return max(1, math.ceil(math.log2(max(self.width, self.height))))

    def tile(self, k: int, col: int, row: int) -> tuple[bytes, bool]:
        """The JPEG of one tile and whether it is the stored frame as it is."""
        if k < 0 or k > self.max_level or col < 0 or row < 0:
            abort(404)
        scale = 2 ** k
        level_w = math.ceil(self.width / scale)
        level_h = math.ceil(self.height / scale)
        if col * TILE_SIZE >= level_w or row * TILE_SIZE >= level_h:
            abort(404)
        stored = self.levels.get(k)
        if stored is not None and stored[3] == TILE_SIZE and stored[4] == TILE_SIZE:
            table = self.frame_tables.get(k)
            if table is not None:
                return table.read(col, row), True
            with self.lock:
                return bytes(self.wsi.read_encoded_tile(stored[0], (col, row))), True
        width = min(TILE_SIZE, level_w - col * TILE_SIZE)
        height = min(TILE_SIZE, level_h - row * TILE_SIZE)
        below = [j for j in self.levels if j < k]
        if stored is None and below:
            # Coarser than every stored level: read the coarsest one below and shrink it.
            j = max(below)
            f = 2 ** (k - j)
            _, jw, jh, _, _ = self.levels[j]
            x, y = col * TILE_SIZE * f, row * TILE_SIZE * f
            w, h = min(width * f, jw - x), min(height * f, jh - y)
            with self.lock:
                region = self.wsi.read_region((x, y), self.levels[j][0], (w, h))
            return encode_jpeg(region.resize((width, height), Image.Resampling.BOX)), False
        with self.lock:
            image = self.wsi.read_region((col * TILE_SIZE, row * TILE_SIZE), k, (width, height))
        return encode_jpeg(image), False

    def region(self, x: int, y: int, width: int, height: int) -> Image.Image:
        """A region of the base level (clipped to the image), as RGB."""
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + width), min(self.height, y + height)
        if x1 <= x0 or y1 <= y0:
            abort(404)
        with self.lock:
            image = self.wsi.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
        rgb: Image.Image = image.convert("RGB")
        return rgb

    @staticmethod
    def _size_of(path: str) -> tuple[int, int]:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)

    def close(self) -> None:
        for table in self.frame_tables.values():
            table.close()
        self.wsi.close()


_slides: dict[str, tuple[SlideHandle, float]] = {}
_slides_lock = threading.Lock()
#: Seconds an opened slide is used before its instance list is checked again in the index.
RECHECK_S = 2.0


def open_slide(store: Store, series_instance_uid: str) -> SlideHandle:
    """The opened slide of a series (cached; reopened when its instances change); 404 if none."""
    cases.checked_uid(series_instance_uid)
    now = time.monotonic()
    with _slides_lock:
        cached = _slides.get(series_instance_uid)
    if cached is not None and now - cached[1] < RECHECK_S:
        return cached[0]
    paths = tuple(str(p) for p in queries.slide_files(store, series_instance_uid).paths)
    if not paths:
        abort(404)
    with _slides_lock:
        cached = _slides.get(series_instance_uid)
        if cached is not None and cached[0].paths == paths:
            _slides[series_instance_uid] = (cached[0], now)
            return cached[0]
        fresh = SlideHandle(paths)
        _slides[series_instance_uid] = (fresh, now)
    if cached is not None:
        cached[0].close()
    return fresh


def encode_jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def encode_png(rgba: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(out, format="PNG")
    return out.getvalue()


def colourize(values: np.ndarray) -> np.ndarray:
    """A heatmap (values in [0, 1]) as RGBA: transparent where low, yellow to red and opaque where high."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)
    rgba = np.zeros(v.shape + (4,), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (255 * (1.0 - v)).astype(np.uint8)
    rgba[..., 3] = (255 * np.clip(1.7 * (v - 0.1), 0.0, 1.0)).astype(np.uint8)  # clear below 0.1
    return rgba


@bp.get("/vendor/openseadragon/<path:filename>")
def openseadragon(filename: str) -> Any:
    """OpenSeadragon's build (script and button images), from npm; send_from_directory stays inside."""
    return send_from_directory(OPENSEADRAGON_DIR, filename, max_age=3600)


@bp.get("/slides/<series_instance_uid>")
@login_required
def view(series_instance_uid: str) -> Any:
    state = cases.case_state(common.store(), series_instance_uid)
    common.record("view", series_instance_uid, "slide")
    return render_template("slide.html", case=state, summary=state.summary,
                           colours=CLASS_COLOURS, flag_colour=FLAG_COLOUR,
                           heatmap_legend=HEATMAP_LEGEND)


@bp.get("/api/slides/<series_instance_uid>/info")
@login_required
def info(series_instance_uid: str) -> Any:
    slide = open_slide(common.store(), series_instance_uid)
    stored = sorted(slide.levels)
    return jsonify(width=slide.width, height=slide.height, tile_size=TILE_SIZE,
                   max_level=slide.max_level,
                   # the coarsest stored level: OpenSeadragon asks for nothing coarser
                   min_level=slide.max_level - max(stored) if stored else 0,
                   stored_levels=stored)


@bp.get("/api/slides/<series_instance_uid>/tiles/<int:k>/<int:col>_<int:row>.jpg")
@login_required
def tile(series_instance_uid: str, k: int, col: int, row: int) -> Any:
    slide = open_slide(common.store(), series_instance_uid)
    data, passed_through = slide.tile(k, col, row)
    response = Response(data, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=3600"
    response.headers["X-Tile-Source"] = "stored-frame" if passed_through else "rendered"
    return response


@bp.get("/api/slides/<series_instance_uid>/heatmaps/<kind>.png")
@login_required
def heatmap(series_instance_uid: str, kind: str) -> Any:
    arrays = cases.load_heatmaps(common.store().settings, series_instance_uid)
    if kind not in arrays:  # only names the analysis wrote; never a path
        abort(404)
    response = Response(encode_png(colourize(arrays[kind])), mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=600"
    return response
