"""Slide reader: one VL Whole Slide Microscopy series, read region by region.

:class:`Slide` wraps :class:`wsidicom.WsiDicom` (all instances and pyramid
levels of one series; TILED_FULL and TILED_SPARSE; JPEG baseline, JPEG 2000,
JPEG-LS and uncompressed frames in RGB, YBR_FULL_422, YBR_ICT or YBR_RCT).
Regions come back as ``(H, W, 3)`` uint8 RGB arrays; grayscale slides are
expanded to three channels. Only the requested region is decoded, so a large
slide is never held in memory whole.

A slide is read once: :meth:`Slide.open` parses each file's header (pydicom, without
pixel data) and keeps it (:attr:`Slide.headers`, :attr:`Slide.base_headers`, and
:meth:`Slide.metadata` for the job's record), and wsidicom opens the files once for the
pixels. The node's job opens its slide this way and hands the open slide to the
classifier, the encoders and the gallery.

Tolerant reading (STYLE.md: strict when writing, tolerant when reading):

- Pixel spacing comes from the Pixel Measures functional group
  (PS3.3 C.7.6.16.2.1). When it is absent the caller's default is used and a
  warning is logged.
- JPEG frames are decoded from their codestream (JFIF/Adobe markers decide the
  colour transform), so a header that says RGB over YCbCr JPEG frames, a
  known vendor quirk, still reads correctly.
- A frame that cannot be decoded raises :class:`SlideUnreadableError` naming
  the level, the tile and the frame number.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analysis.errors import SlideUnreadableError

logger = logging.getLogger(__name__)

#: SOP Class UID of VL Whole Slide Microscopy Image Storage (PS3.4 B.5).
VL_WSM_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"


@dataclass(frozen=True)
class Level:
    """One pyramid level of a slide.

    Parameters
    ----------
    index:
        Position in :attr:`Slide.levels` (0 is the base level).
    size:
        ``(width, height)`` of the total pixel matrix.
    tile_size:
        ``(width, height)`` of one frame.
    pixel_spacing_um:
        Micrometres per pixel (mean of row and column spacing).
    downsample:
        Base-level pixels per pixel of this level.
    """

    index: int
    size: tuple[int, int]
    tile_size: tuple[int, int]
    pixel_spacing_um: float
    downsample: float


def has_dicm_preamble(path: Path) -> bool:
    """True when the file has the DICOM preamble ("DICM" at byte 128, PS3.10 7.1)."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_files(path: Path) -> list[Path]:
    """Return the files of one WSI series given a file or a folder."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and has_dicm_preamble(p))
        if files:
            return files
        raise SlideUnreadableError(f"{path}: folder holds no DICOM files")
    raise FileNotFoundError(f"{path}: no such file or folder")


class Slide:
    """A whole-slide image opened for region reads.

    Use :meth:`open`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, wsi: object, levels: Sequence[Level], pixel_spacing_um: float,
                 wsi_levels: Sequence[object], source: Path) -> None:
        if not levels:
            raise ValueError("levels must not be empty")
        if not pixel_spacing_um > 0:
            raise ValueError(f"pixel_spacing_um must be > 0, got {pixel_spacing_um}")
        self._wsi = wsi
        self._wsi_levels = list(wsi_levels)
        self.levels: tuple[Level, ...] = tuple(levels)
        self.pixel_spacing_um = pixel_spacing_um
        self.source = source
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        #: The files the slide was opened from (as given, before any header patch).
        self.files: tuple[Path, ...] = ()
        #: The header of every DICOM file (pydicom, without pixel data), read once by :meth:`open`.
        self.headers: tuple[Any, ...] = ()
        #: The spacing :meth:`open` was told to assume when Pixel Measures are absent.
        self.default_pixel_spacing_um: float | None = None

    @classmethod
    def open(cls, path: Path | str | Sequence[Path | str],
             default_pixel_spacing_um: float | None = None) -> Slide:
        """Open a WSI DICOM file, a folder holding one series, or the list of a series' files.

        Each file's header is read once (pydicom, ``stop_before_pixels``) and kept
        (:attr:`headers`, :attr:`base_headers`); the pixels are read by wsidicom, which
        opens the files once. A job opens its slide with this and hands the open slide on.

        Parameters
        ----------
        path:
            A DICOM file, a folder with the instances of one series, or the files of one series.
        default_pixel_spacing_um:
            Spacing to use when the Pixel Measures are absent (a warning is
            logged). ``None`` makes a missing spacing an error.

        Returns
        -------
        Slide
            The opened slide.

        Raises
        ------
        FileNotFoundError
            If ``path`` (or one of the files) does not exist.
        SlideUnreadableError
            If no VL Whole Slide Microscopy pyramid can be read from ``path``.
        """
        from wsidicom import WsiDicom

        if isinstance(path, (str, Path)):
            path = Path(path)
            files = _dicom_files(path)
            source = path
        else:
            files = [Path(p) for p in path]
            if not files:
                raise SlideUnreadableError("no slide files given")
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: no such file")
            parents = {f.parent for f in files}
            source = files[0].parent if len(parents) == 1 else files[0]
        headers = _read_headers(files)
        opened = [f for f, _, _ in headers]
        scratch: tempfile.TemporaryDirectory[str] | None = None
        if _lacks_pixel_measures(headers):
            if default_pixel_spacing_um is None:
                raise SlideUnreadableError(f"{source}: no pixel spacing (Pixel Measures) and no default")
            logger.warning("%s: no Pixel Measures; assuming %.4f um/px", source,
                           default_pixel_spacing_um)
            scratch = tempfile.TemporaryDirectory(prefix="cytonode-spacing-")
            opened = _with_pixel_spacing(headers, default_pixel_spacing_um, Path(scratch.name))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wsi = WsiDicom.open(opened or files)
        except Exception as exc:  # wsidicom raises many types; translate at our edge
            if scratch is not None:
                scratch.cleanup()
            raise SlideUnreadableError(f"{source}: not a readable WSI DICOM series ({exc})") from exc
        try:
            wsi_levels = list(wsi.levels)
        except Exception as exc:
            wsi.close()
            raise SlideUnreadableError(f"{source}: no image pyramid ({exc})") from exc
        if not wsi_levels:
            wsi.close()
            raise SlideUnreadableError(f"{source}: no image pyramid")
        base = wsi_levels[0]
        base_spacing = _spacing_um(base) or default_pixel_spacing_um
        if base_spacing is None:
            wsi.close()
            raise SlideUnreadableError(f"{source}: no pixel spacing (Pixel Measures) and no default")
        levels = []
        for i, lvl in enumerate(wsi_levels):
            size = (int(lvl.size.width), int(lvl.size.height))
            downsample = base.size.width / size[0]
            spacing = _spacing_um(lvl) or base_spacing * downsample
            levels.append(Level(index=i, size=size,
                                tile_size=(int(lvl.tile_size.width), int(lvl.tile_size.height)),
                                pixel_spacing_um=spacing, downsample=downsample))
        slide = cls(wsi, levels, base_spacing, wsi_levels, source)
        slide._scratch = scratch
        slide.files = tuple(files)
        slide.headers = tuple(ds for _, ds, _ in headers)
        slide.default_pixel_spacing_um = default_pixel_spacing_um
        return slide

    @property
    def base_headers(self) -> list[Any]:
        """Headers of the base-level VOLUME instances (largest total pixel matrix), as read.

        Raises
        ------
        SlideUnreadableError
            If the files hold no VOLUME image, or VOLUME images of more than one series.
        """
        volumes = [ds for ds in self.headers if _is_volume(ds)]
        if not volumes:
            raise SlideUnreadableError("no VOLUME image of a VL Whole Slide Microscopy series")
        if len({ds.SeriesInstanceUID for ds in volumes}) > 1:
            raise SlideUnreadableError("the files hold more than one series; give one slide")
        columns = max(int(ds.TotalPixelMatrixColumns) for ds in volumes)
        return [ds for ds in volumes if int(ds.TotalPixelMatrixColumns) == columns]

    def metadata(self) -> dict[str, Any]:
        """Levels, sizes, tile sizes and pixel spacing as JSON-ready values (the job's record).

        ``pixel_spacing_mm`` of a level (column, row spacing) and ``pixel_spacing_um`` of the
        slide are ``None`` when the slide has no Pixel Measures.
        """
        levels = []
        for wsi_level in self._wsi_levels:
            spacing = _wsi_spacing(wsi_level)
            levels.append({
                "level": wsi_level.level,  # type: ignore[attr-defined]
                "width": wsi_level.size.width,  # type: ignore[attr-defined]
                "height": wsi_level.size.height,  # type: ignore[attr-defined]
                "tile_width": wsi_level.tile_size.width,  # type: ignore[attr-defined]
                "tile_height": wsi_level.tile_size.height,  # type: ignore[attr-defined]
                "pixel_spacing_mm": [spacing.width, spacing.height] if spacing else None,
            })
        base = levels[0]
        base_mm = base["pixel_spacing_mm"]
        return {
            "levels": levels,
            "width": base["width"],
            "height": base["height"],
            "pixel_spacing_um": [base_mm[0] * 1000.0, base_mm[1] * 1000.0] if base_mm else None,
        }

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the base level."""
        return self.levels[0].size

    def level_for_spacing(self, spacing_um: float) -> Level:
        """Return the coarsest level whose spacing is not coarser than ``spacing_um``.

        Falls back to the base level when every level is coarser.
        """
        best = self.levels[0]
        for level in self.levels:
            if level.pixel_spacing_um <= spacing_um * 1.01 and level.pixel_spacing_um > best.pixel_spacing_um:
                best = level
        return best

    def read_region(self, level_index: int, location: tuple[int, int],
                    size: tuple[int, int]) -> NDArray[np.uint8]:
        """Read one region of one level.

        Parameters
        ----------
        level_index:
            Index into :attr:`levels`.
        location:
            ``(x, y)`` of the upper-left corner in that level's pixels.
        size:
            ``(width, height)`` in that level's pixels.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB.

        Raises
        ------
        ValueError
            If the region lies outside the level.
        SlideUnreadableError
            If a frame in the region cannot be decoded.
        """
        level = self.levels[level_index]
        x, y = location
        w, h = size
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > level.size[0] or y + h > level.size[1]:
            raise ValueError(f"region {location} {size} outside level {level_index} of size {level.size}")
        wsi_level = self._wsi_levels[level_index]
        try:
            image = self._wsi.read_region(location, wsi_level.level, size)  # type: ignore[attr-defined]
        except Exception as exc:  # decoder errors come in many types
            raise self._locate_bad_frame(level, location, size, exc) from exc
        return _as_rgb(np.asarray(image))

    def _locate_bad_frame(self, level: Level, location: tuple[int, int], size: tuple[int, int],
                          exc: Exception) -> SlideUnreadableError:
        """Decode the region's tiles one by one to name the frame that fails."""
        tw, th = level.tile_size
        cols = math.ceil(level.size[0] / tw)
        wsi_level = self._wsi_levels[level.index]
        for ty in range(location[1] // th, (location[1] + size[1] - 1) // th + 1):
            for tx in range(location[0] // tw, (location[0] + size[0] - 1) // tw + 1):
                try:
                    self._wsi.read_tile(wsi_level.level, (tx, ty))  # type: ignore[attr-defined]
                except Exception as tile_exc:
                    frame = ty * cols + tx + 1
                    return SlideUnreadableError(
                        f"{self.source}: level {level.index}, tile ({tx}, {ty}), frame {frame} "
                        f"cannot be decoded: {tile_exc}")
        return SlideUnreadableError(f"{self.source}: level {level.index}, region {location} {size} "
                                    f"cannot be read: {exc}")

    def close(self) -> None:
        """Close the underlying files."""
        self._wsi.close()  # type: ignore[attr-defined]
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _read_headers(files: Sequence[Path]) -> list[tuple[Path, Any, int]]:
    """``(path, header, offset of the pixel data)`` of every DICOM file among ``files``, each
    read once without its pixel data; a file that is not DICOM is left out (wsidicom ignores
    it too)."""
    import pydicom

    headers: list[tuple[Path, Any, int]] = []
    for f in files:
        try:
            with f.open("rb") as src:
                ds = pydicom.dcmread(src, stop_before_pixels=True)
                headers.append((f, ds, src.tell()))
        except Exception:  # not DICOM: wsidicom ignores it too
            logger.debug("%s: not a DICOM file, ignored", f)
            continue
    return headers


def _is_volume(ds: Any) -> bool:
    return bool(ds.get("SOPClassUID") == VL_WSM_SOP_CLASS_UID and "VOLUME" in ds.get("ImageType", []))


def _shared_pixel_spacing(ds: Any) -> Any:
    try:
        return ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError):
        return None


def _lacks_pixel_measures(headers: Sequence[tuple[Path, Any, int]]) -> bool:
    """True when a VOLUME image has no Pixel Spacing in its shared functional groups."""
    volumes = [ds for _, ds, _ in headers if _is_volume(ds)]
    return bool(volumes) and any(_shared_pixel_spacing(ds) is None for ds in volumes)


def _with_pixel_spacing(headers: Sequence[tuple[Path, Any, int]], spacing_um: float,
                        scratch: Path) -> list[Path]:
    """Copy the series into ``scratch`` with Pixel Measures added to the VOLUME images.

    wsidicom needs the Pixel Measures to place a level; a slide without them (a scanner's
    omission) is read at the caller's default spacing this way. Only the header is rewritten
    (a copy of the one already read; the kept header stays as the file has it); the pixel data
    is streamed across unchanged, so no frame is decoded or held in memory. Each level gets
    ``spacing_um`` scaled by its size relative to the largest level.
    """
    import copy

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    volumes = [ds for _, ds, _ in headers if _is_volume(ds)]
    base_columns = max(int(ds.TotalPixelMatrixColumns) for ds in volumes)
    out = []
    for i, (f, header, pixel_data_at) in enumerate(headers):
        if not _is_volume(header) or _shared_pixel_spacing(header) is not None:
            out.append(f)
            continue
        ds = copy.deepcopy(header)
        scale = base_columns / int(ds.TotalPixelMatrixColumns)
        spacing = f"{spacing_um * scale / 1000.0:.10g}"
        shared = ds.setdefault("SharedFunctionalGroupsSequence", DicomSequence([Dataset()])).value
        if not shared:
            shared.append(Dataset())
        measures = shared[0].setdefault("PixelMeasuresSequence", DicomSequence([Dataset()])).value
        if not measures:
            measures.append(Dataset())
        measures[0].PixelSpacing = [spacing, spacing]
        target = scratch / f"{i:05d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        with f.open("rb") as src, target.open("ab") as dst:
            src.seek(pixel_data_at)
            shutil.copyfileobj(src, dst, 1 << 20)
        out.append(target)
    return out


def _wsi_spacing(wsi_level: object) -> Any:
    """wsidicom's pixel spacing of a level (mm), or ``None`` when absent."""
    try:
        return wsi_level.pixel_spacing  # type: ignore[attr-defined]
    except Exception:  # wsidicom raises when Pixel Measures are missing
        return None


def _spacing_um(wsi_level: object) -> float | None:
    """Pixel spacing of a wsidicom level in um, or ``None`` when absent."""
    try:
        spacing = wsi_level.pixel_spacing  # type: ignore[attr-defined]
    except Exception:  # wsidicom raises when Pixel Measures are missing
        return None
    if spacing is None or not spacing.width or not spacing.height:
        return None
    return float(spacing.width + spacing.height) * 500.0  # mm -> um, mean of both


def _as_rgb(array: NDArray[np.generic]) -> NDArray[np.uint8]:
    """Return ``(H, W, 3)`` uint8 from a decoded region (RGB, RGBA or grayscale)."""
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.integer) and array.size and array.max() > 255:
            array = array / (array.max() / 255.0)
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        return np.ascontiguousarray(array[..., :3])
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)
