"""White-cell finder for Romanowsky-stained peripheral blood smears.

Classic image processing, chosen over a trained detector because it meets the
recall/precision targets on BCCD (see ``docs/detection.md``) with no weights,
no training data from the evaluation set and a few milliseconds per field.

How it works, on an RGB image resampled to a working pixel spacing:

1. **Stain separation.** In Wright, Giemsa and May-Grunwald-Giemsa stains the
   azure/methylene-blue dyes bind chromatin, so nuclei absorb red light much
   more than blue light; eosin-stained red cells absorb green and blue. The
   nucleus score is the optical-density difference ``OD_red - OD_blue``
   (``= ln(B / R)``): high in nuclei and platelets, near zero in background,
   negative in red cells.
2. **Threshold and grouping.** Pixels above ``nucleus_threshold`` are chromatin.
   Lobes of one segmented nucleus are grouped by a closing of radius
   ``group_distance_um``. A group with at least ``min_nucleus_area_um2`` of
   chromatin is a white cell; a smaller isolated blob in the platelet size
   range is counted as a platelet.
3. **Touching cells.** A group much larger than one nucleus is split by a
   watershed on its distance transform.
4. **Cell body.** Each nucleus grows into the surrounding non-background,
   non-red-cell pixels (its cytoplasm) up to ``max_cell_diameter_um``; a
   watershed with the nuclei as markers splits the cytoplasm of touching
   cells; two bodies that together form one round cell of normal size (the
   lobes of one nucleus) are joined. The result gives the outline, bounding
   box and area. Platelets are counted from paler, smaller blobs.

Large slides are read region by region with an overlap wider than a cell; a
cell belongs to the region whose *core* (the region minus half the overlap on
each inner side) contains its centre, so a cell on a tile border is reported
exactly once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage import measure, segmentation

from analysis.errors import NotABloodSmearError
from analysis.tiles import Slide

logger = logging.getLogger(__name__)

#: Pixel spacing assumed for a plain field image when none is given: that of BCCD fields
#: (640 x 480), whose red cells measure 91 px across by the node's red-cell ruler
#: (:func:`analysis.framing.red_cell_diameter_px`, median of 360 fields), i.e. 7.5 / 91 um/px.
#: (The VOC red-cell boxes, median 105 px, are drawn loosely around overlapping cells.)
DEFAULT_FIELD_PIXEL_SPACING_UM = 0.0823


@dataclass(frozen=True)
class DetectorConfig:
    """Parameters of the white-cell finder; lengths in micrometres.

    Parameters
    ----------
    working_spacing_um:
        Pixel spacing the image is resampled to before detection. Coarser is
        faster; nuclei lobes must stay a few pixels wide.
    nucleus_threshold:
        Threshold on ``ln(B / R)`` above which a pixel is chromatin.
    cytoplasm_threshold:
        Threshold on ``ln(B / R)`` above which a non-background pixel may be
        white-cell cytoplasm (red cells are below it).
    background_od:
        Optical density above the glass's that a cytoplasm pixel must have.
    default_glass_od:
        Optical density of bare glass when an image shows too little of it.
    cytoplasm_reach_um:
        How far cytoplasm may extend beyond the nucleus.
    group_distance_um:
        Closing radius that joins lobes of one nucleus.
    min_nucleus_area_um2:
        Chromatin area of the smallest white-cell nucleus.
    platelet_max_area_um2:
        Largest chromatin blob still counted as a platelet.
    platelet_min_area_um2:
        Smallest blob counted as a platelet (smaller ones are noise).
    platelet_threshold:
        Threshold on ``ln(B / R)`` for platelets, which stain paler than nuclei.
    split_area_um2:
        A nucleus group larger than this is tested for touching cells.
    neck_ratio:
        A split is kept only where the neck between the parts is shorter than
        this fraction of the smaller part's diameter.
    lobe_merge_max_area_um2, lobe_merge_neck_ratio, lobe_merge_solidity:
        Two neighbouring cell bodies are joined into one (the lobes of one
        cell) when together they are at most this large, share a boundary
        longer than this fraction of the smaller one's diameter, and their union
        is at least this convex.
    max_cell_diameter_um:
        Upper bound of a white cell's diameter; also the minimum tile overlap.
    tile_size_px:
        Side of the regions read from a slide, in working-resolution pixels.
    edge_margin_um:
        A cell whose centre is closer than this to the edge of the image
        (not of a tile) is cut off by it and is not reported: most of it lies
        outside, so neither its class nor its outline can be trusted.
    max_cells_per_mm2, density_check_mm2:
        A slide on which, once this much area has been searched, more nucleated
        objects than this per mm² were found is not a blood smear and detection
        stops (:class:`analysis.errors.NotABloodSmearError`). In a smear's monolayer
        there are about 20,000 red cells per mm²; even extreme leukocytosis puts
        fewer than 1 white cell among 10 red cells, about 2,000/mm² (the densest
        BCCD field, chosen around its white cells: 960/mm²). A tissue section's
        nuclei are 5,000-20,000/mm². ``0`` switches the check off.
    """

    working_spacing_um: float = 0.2
    nucleus_threshold: float = 0.2
    cytoplasm_threshold: float = 0.0
    background_od: float = 0.08
    default_glass_od: float = 0.16
    cytoplasm_reach_um: float = 5.0
    group_distance_um: float = 1.8
    min_nucleus_area_um2: float = 10.0
    platelet_max_area_um2: float = 6.0
    platelet_threshold: float = 0.12
    platelet_min_area_um2: float = 0.5
    split_area_um2: float = 120.0
    neck_ratio: float = 0.35
    max_cell_diameter_um: float = 25.0
    lobe_merge_max_area_um2: float = 200.0
    lobe_merge_neck_ratio: float = 0.6
    lobe_merge_solidity: float = 0.9
    tile_size_px: int = 1024
    edge_margin_um: float = 2.3
    max_cells_per_mm2: float = 4000.0
    density_check_mm2: float = 0.04

    def __post_init__(self) -> None:
        for name in ("working_spacing_um", "group_distance_um", "min_nucleus_area_um2",
                     "platelet_max_area_um2", "split_area_um2", "max_cell_diameter_um"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.tile_size_px < 64:
            raise ValueError(f"tile_size_px must be >= 64, got {self.tile_size_px}")
        if self.platelet_min_area_um2 >= self.platelet_max_area_um2:
            raise ValueError("platelet_min_area_um2 must be below platelet_max_area_um2")


@dataclass(frozen=True)
class DetectedCell:
    """One white cell, geometry in base-level pixel coordinates.

    Parameters
    ----------
    x, y:
        Centre (centroid of the cell body), base-level pixels.
    bbox:
        ``(x0, y0, x1, y1)``, x1/y1 exclusive, base-level pixels.
    outline:
        Closed polygon ``((x, y), ...)`` around the cell body.
    area_um2:
        Area of the cell body (nucleus and cytoplasm).
    nucleus_area_um2:
        Area of the chromatin.
    diameter_um:
        Equivalent-circle diameter of the cell body.
    """

    x: float
    y: float
    bbox: tuple[int, int, int, int]
    outline: tuple[tuple[float, float], ...]
    area_um2: float
    nucleus_area_um2: float
    diameter_um: float


@dataclass(frozen=True)
class Detections:
    """White cells and platelets found on a slide or field image."""

    cells: tuple[DetectedCell, ...]
    platelets: tuple[tuple[float, float], ...]
    pixel_spacing_um: float
    image_size: tuple[int, int]
    config: DetectorConfig = field(default_factory=DetectorConfig)

    def to_json(self) -> dict[str, object]:
        """Return the ``cytonode detect --json`` document."""
        return {
            "cells": [
                {"x": round(c.x, 1), "y": round(c.y, 1), "bbox": list(c.bbox),
                 "area_um2": round(c.area_um2, 2)}
                for c in self.cells
            ],
            "platelet_count": len(self.platelets),
            "pixel_spacing_um": self.pixel_spacing_um,
            "image_size": list(self.image_size),
        }


@dataclass(frozen=True)
class _RawCell:
    """A cell in working-resolution pixel coordinates of one image."""

    x: float
    y: float
    bbox: tuple[int, int, int, int]
    outline: NDArray[np.float64]
    area_px: int
    nucleus_area_px: int


def nucleus_score(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Return ``ln(B / R)``, the chromatin score of a Romanowsky stain.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 image.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 score.
    """
    r = rgb[..., 0].astype(np.float32) + 1.0
    b = rgb[..., 2].astype(np.float32) + 1.0
    return np.log(b / r)


def _optical_density(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    mean = rgb.astype(np.float32).mean(axis=2) + 1.0
    return np.asarray(np.log(256.0 / mean), dtype=np.float32)


def _ellipse(radius_px: float) -> NDArray[np.uint8]:
    r = max(1, round(radius_px))
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)),
                      dtype=np.uint8)


def _closing(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Binary closing with a disk; the image border does not erode."""
    r = max(1, round(radius_px))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), r, r, r, r, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _ellipse(r))
    return closed[r:-r, r:-r].astype(bool)


def _opening(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Binary opening with a disk."""
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _ellipse(radius_px),
                              borderType=cv2.BORDER_REPLICATE)
    return opened.astype(bool)


def _blur(image: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT),
                      dtype=np.float32)


def detect_array(rgb: NDArray[np.uint8], spacing_um: float,
                 config: DetectorConfig) -> tuple[list[_RawCell], list[tuple[float, float]]]:
    """Find white cells and platelets in an image already at working resolution.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 image.
    spacing_um:
        Its pixel spacing.
    config:
        Detector parameters.

    Returns
    -------
    tuple
        Raw cells (working pixel coordinates) and platelet centres ``(x, y)``.
    """
    px_area = spacing_um * spacing_um
    score = _blur(nucleus_score(rgb), max(0.5, 0.3 / spacing_um))
    chromatin = score > config.nucleus_threshold
    grouped = ndi.binary_fill_holes(_closing(chromatin, config.group_distance_um / spacing_um))
    labels, n = ndi.label(grouped)
    chroma_area = ndi.sum_labels(chromatin, labels, index=np.arange(1, n + 1))
    min_nuc_px = config.min_nucleus_area_um2 / px_area
    nuclei = np.zeros_like(labels)
    next_label = 1
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or chroma_area[i - 1] < min_nuc_px:
            continue
        mask = labels[sl] == i
        if chroma_area[i - 1] * px_area > config.split_area_um2:
            parts = _split_touching(mask, spacing_um, config)
        else:
            parts = mask.astype(np.int32)
        for j in range(1, int(parts.max()) + 1):
            part = parts == j
            if chromatin[sl][part].sum() < min_nuc_px:
                continue
            nuclei[sl][part] = next_label
            next_label += 1
    platelets = _find_platelets(score, nuclei > 0, spacing_um, config)
    if next_label == 1:
        return [], platelets
    cells = _grow_cells(rgb, score, nuclei, chromatin, spacing_um, config)
    return cells, platelets


def _find_platelets(score: NDArray[np.float32], nuclei: NDArray[np.bool_], spacing_um: float,
                    config: DetectorConfig) -> list[tuple[float, float]]:
    """Centres of small isolated purple blobs (platelets), away from white-cell nuclei."""
    px_area = spacing_um * spacing_um
    blobs, n = ndi.label(score > config.platelet_threshold)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones_like(blobs), blobs, index=index) * px_area
    near = _closing(nuclei, 0.5 / spacing_um) if nuclei.any() else nuclei
    touches = ndi.maximum(near, blobs, index=index).astype(bool) if nuclei.any() else \
        np.zeros(n, bool)
    keep = (areas >= config.platelet_min_area_um2) & (areas <= config.platelet_max_area_um2) & ~touches
    if not keep.any():
        return []
    centres = ndi.center_of_mass(np.ones_like(blobs), blobs, index=index[keep])
    return [(float(cx), float(cy)) for cy, cx in centres]


def _split_touching(mask: NDArray[np.bool_], spacing_um: float,
                    config: DetectorConfig) -> NDArray[np.int32]:
    """Split a nucleus group that holds several touching nuclei (distance watershed)."""
    dist = ndi.distance_transform_edt(mask)
    min_sep = max(2, round(3.0 / spacing_um))
    footprint = np.ones((2 * min_sep + 1, 2 * min_sep + 1), bool)
    peaks = (dist == ndi.maximum_filter(dist, footprint=footprint)) & (dist > 1.5 / spacing_um)
    markers, n = ndi.label(peaks)
    if n <= 1:
        return mask.astype(np.int32)
    parts = np.asarray(segmentation.watershed(  # type: ignore[no-untyped-call]
        -dist, markers, mask=mask), dtype=np.int32)
    return _merge_wide_necks(parts, config.neck_ratio)


def _merge_wide_necks(parts: NDArray[np.int32], neck_ratio: float) -> NDArray[np.int32]:
    """Undo watershed cuts whose neck is wide compared with the smaller part.

    Two touching round nuclei meet in a narrow neck; a kidney-shaped monocyte
    nucleus cut in two has a wide one. A cut is undone when the length of the
    shared boundary exceeds ``neck_ratio`` times the smaller part's
    equivalent diameter.
    """
    changed = True
    while changed and parts.max() > 1:
        changed = False
        right = (parts[:, :-1] != parts[:, 1:]) & (parts[:, :-1] > 0) & (parts[:, 1:] > 0)
        down = (parts[:-1, :] != parts[1:, :]) & (parts[:-1, :] > 0) & (parts[1:, :] > 0)
        pairs: dict[tuple[int, int], int] = {}
        for a, b in zip(np.concatenate([parts[:, :-1][right], parts[:-1, :][down]]),
                        np.concatenate([parts[:, 1:][right], parts[1:, :][down]])):
            key = (int(min(a, b)), int(max(a, b)))
            pairs[key] = pairs.get(key, 0) + 1
        areas = np.bincount(parts.ravel())
        for (a, b), neck in sorted(pairs.items(), key=lambda kv: -kv[1]):
            diameter = 2.0 * math.sqrt(min(areas[a], areas[b]) / math.pi)
            if neck > neck_ratio * diameter:
                parts[parts == b] = a
                changed = True
                break
    # relabel 1..n
    _, inverse = np.unique(parts, return_inverse=True)
    return inverse.reshape(parts.shape).astype(np.int32)


def _merge_lobes(bodies: NDArray[np.int32], nuclei: NDArray[np.int32], spacing_um: float,
                 config: DetectorConfig) -> NDArray[np.int32]:
    """Join two cell bodies that are the lobes of one cell.

    A bilobed nucleus (eosinophil) whose lobes lie further apart than the
    grouping closing gives two nuclei; their watershed bodies then share a long
    boundary and together form one compact, round cell of normal size. Two
    touching cells together are larger or less convex.
    """
    if bodies.max() < 2:
        return bodies
    px_area = spacing_um * spacing_um
    changed = True
    while changed:
        changed = False
        right = (bodies[:, :-1] != bodies[:, 1:]) & (bodies[:, :-1] > 0) & (bodies[:, 1:] > 0)
        down = (bodies[:-1, :] != bodies[1:, :]) & (bodies[:-1, :] > 0) & (bodies[1:, :] > 0)
        a = np.concatenate([bodies[:, :-1][right], bodies[:-1, :][down]])
        b = np.concatenate([bodies[:, 1:][right], bodies[1:, :][down]])
        if a.size == 0:
            break
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        pairs, counts = np.unique(np.stack([lo, hi], axis=1), axis=0, return_counts=True)
        areas = np.bincount(bodies.ravel())
        for (p, q), shared in sorted(zip(map(tuple, pairs), counts), key=lambda t: -t[1]):
            union_area = (areas[p] + areas[q]) * px_area
            if union_area > config.lobe_merge_max_area_um2:
                continue
            diameter = 2.0 * math.sqrt(min(areas[p], areas[q]) / math.pi)
            if shared < config.lobe_merge_neck_ratio * diameter:
                continue
            ys, xs = np.nonzero((bodies == p) | (bodies == q))
            union = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), bool)
            union[ys - ys.min(), xs - xs.min()] = True
            solidity = measure.regionprops(union.astype(np.uint8))[0].solidity  # type: ignore[no-untyped-call]
            if solidity < config.lobe_merge_solidity:
                continue
            bodies[bodies == q] = p
            nuclei[nuclei == q] = p
            changed = True
            break
    return bodies


def _grow_cells(rgb: NDArray[np.uint8], score: NDArray[np.float32], nuclei: NDArray[np.int32],
                chromatin: NDArray[np.bool_], spacing_um: float,
                config: DetectorConfig) -> list[_RawCell]:
    """Grow each nucleus into its cytoplasm and measure the cell bodies."""
    od = _blur(_optical_density(rgb), 1.0)
    glass = _glass_od(od, score, config)
    cytoplasm = (score > config.cytoplasm_threshold) & (od > glass + config.background_od)
    cytoplasm = _opening(cytoplasm, 0.5 / spacing_um)
    reach = ndi.distance_transform_edt(nuclei == 0) <= config.cytoplasm_reach_um / spacing_um
    body_mask = (cytoplasm & reach) | (nuclei > 0)
    bodies = segmentation.watershed(  # type: ignore[no-untyped-call]
        -score, nuclei, mask=body_mask)
    bodies = _merge_lobes(np.asarray(bodies, dtype=np.int32), nuclei, spacing_um, config)
    cells: list[_RawCell] = []
    for region in measure.regionprops(  # type: ignore[no-untyped-call]
            np.asarray(bodies, dtype=np.int32)):
        # keep the part connected to the nucleus, fill holes (vacuoles, granules)
        body = ndi.binary_fill_holes(region.image)
        nucleus = nuclei[region.slice] == region.label
        body_lab, _ = ndi.label(body)
        keep = np.unique(body_lab[nucleus])
        body = np.isin(body_lab, keep[keep > 0])
        body = _opening(body, 1.2 / spacing_um) | nucleus
        body = ndi.binary_fill_holes(body)
        y0, x0 = region.slice[0].start, region.slice[1].start
        ys, xs = np.nonzero(body)
        contours = measure.find_contours(  # type: ignore[no-untyped-call]
            np.pad(body, 1).astype(np.uint8), 0.5)
        outline = max(contours, key=len)[:, ::-1] - 1 + (x0, y0)
        step = max(1, len(outline) // 64)
        cells.append(_RawCell(
            x=float(xs.mean() + x0), y=float(ys.mean() + y0),
            bbox=(int(xs.min() + x0), int(ys.min() + y0), int(xs.max() + x0 + 1),
                  int(ys.max() + y0 + 1)),
            outline=np.asarray(outline[::step], dtype=np.float64),
            area_px=int(body.sum()), nucleus_area_px=int((chromatin[region.slice] & nucleus).sum()),
        ))
    return cells


def _glass_od(od: NDArray[np.float32], score: NDArray[np.float32],
              config: DetectorConfig) -> float:
    """Optical density of the bare glass: the 5th percentile of non-chromatin pixels.

    Falls back to ``default_glass_od`` when the image has too few pixels.
    """
    sample = od[score < config.nucleus_threshold]
    if sample.size < 1000:
        return config.default_glass_od
    glass = float(np.percentile(sample[:: max(1, sample.size // 200000)], 5))
    return min(glass, config.default_glass_od + 0.15)


def _resample(rgb: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    """Resample by ``factor`` (< 1 shrinks) with area averaging."""
    if abs(factor - 1.0) < 1e-3:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(np.ascontiguousarray(rgb), size, interpolation=interpolation),
                      dtype=np.uint8)


def _to_cell(raw: _RawCell, scale: float, ox: float, oy: float, spacing_um: float,
             work_spacing_um: float) -> DetectedCell:
    """Convert a working-resolution cell into base-level coordinates."""
    area_um2 = raw.area_px * work_spacing_um ** 2
    x0, y0, x1, y1 = raw.bbox
    return DetectedCell(
        x=(raw.x + 0.5) * scale - 0.5 + ox, y=(raw.y + 0.5) * scale - 0.5 + oy,
        bbox=(math.floor(x0 * scale + ox), math.floor(y0 * scale + oy),
              math.ceil(x1 * scale + ox), math.ceil(y1 * scale + oy)),
        outline=tuple((float((px + 0.5) * scale - 0.5 + ox), float((py + 0.5) * scale - 0.5 + oy))
                      for px, py in raw.outline),
        area_um2=area_um2,
        nucleus_area_um2=raw.nucleus_area_px * work_spacing_um ** 2,
        diameter_um=2.0 * math.sqrt(area_um2 / math.pi),
    )


def _inside(cells: tuple[DetectedCell, ...] | list[DetectedCell], size: tuple[int, int],
            margin_px: float) -> tuple[DetectedCell, ...]:
    """Drop cells whose centre lies within ``margin_px`` of the image edge."""
    w, h = size
    return tuple(c for c in cells
                 if margin_px <= c.x <= w - 1 - margin_px and margin_px <= c.y <= h - 1 - margin_px)


def find_cells_in_image(rgb: NDArray[np.uint8], pixel_spacing_um: float,
                        config: DetectorConfig | None = None) -> Detections:
    """Find white cells in one in-memory field image.

    Parameters
    ----------
    rgb:
        ``(H, W, 3)`` uint8 RGB image.
    pixel_spacing_um:
        Its pixel spacing in micrometres.
    config:
        Detector parameters (defaults if ``None``).

    Returns
    -------
    Detections
        Cells in the image's pixel coordinates.

    Raises
    ------
    ValueError
        If the image is not ``(H, W, 3)`` uint8 or the spacing is not positive.
    """
    config = config or DetectorConfig()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if not pixel_spacing_um > 0:
        raise ValueError(f"pixel_spacing_um must be > 0, got {pixel_spacing_um}")
    factor = pixel_spacing_um / config.working_spacing_um
    work = _resample(rgb, min(1.0, factor))
    work_spacing = pixel_spacing_um / min(1.0, factor)
    scale = rgb.shape[1] / work.shape[1]
    raw, platelets = detect_array(work, work_spacing, config)
    cells = tuple(_to_cell(c, scale, 0.0, 0.0, pixel_spacing_um, work_spacing) for c in raw)
    cells = _inside(cells, (rgb.shape[1], rgb.shape[0]), config.edge_margin_um / pixel_spacing_um)
    return Detections(
        cells=tuple(sorted(cells, key=lambda c: (c.y, c.x))),
        platelets=tuple(((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in platelets),
        pixel_spacing_um=pixel_spacing_um, image_size=(rgb.shape[1], rgb.shape[0]), config=config,
    )


def _tile_origins(length: int, tile: int, overlap: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(start, core_start, core_end)`` of overlapping tiles along one axis.

    Cores tile the axis without gaps or overlap; each core boundary lies in the
    middle of the overlap of two neighbouring tiles.
    """
    if length <= tile:
        yield 0, 0, length
        return
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    bounds = [0] + [(starts[k + 1] + starts[k] + tile) // 2 for k in range(len(starts) - 1)]
    bounds.append(length)
    for k, s in enumerate(starts):
        yield s, bounds[k], bounds[k + 1]


def _check_density(found: int, searched_um2: float, config: DetectorConfig) -> None:
    """Stop early on a slide that is not a blood smear (see :class:`DetectorConfig`)."""
    if config.max_cells_per_mm2 <= 0 or searched_um2 < config.density_check_mm2 * 1e6:
        return
    density = found / searched_um2 * 1e6
    if density > config.max_cells_per_mm2:
        raise NotABloodSmearError(
            f"not a blood smear: {density:,.0f} nucleated objects per mm² in the first "
            f"{searched_um2 / 1e6:.3f} mm² searched (a blood smear has at most about "
            f"{config.max_cells_per_mm2:,.0f}); is this a tissue section?")


def find_cells(slide: Slide, config: DetectorConfig | None = None) -> Detections:
    """Find white cells on a whole slide, region by region.

    The pyramid level whose spacing is closest to (but not coarser than)
    ``config.working_spacing_um`` is read in overlapping tiles; only one tile is
    in memory at a time.

    Parameters
    ----------
    slide:
        An opened slide.
    config:
        Detector parameters (defaults if ``None``).

    Returns
    -------
    Detections
        Cells in base-level pixel coordinates.

    Raises
    ------
    analysis.errors.SlideUnreadableError
        If a frame cannot be decoded.
    analysis.errors.NotABloodSmearError
        If, once ``config.density_check_mm2`` was searched, nucleated objects are far denser
        than in any blood smear.
    """
    config = config or DetectorConfig()
    level = slide.level_for_spacing(config.working_spacing_um)
    factor = level.pixel_spacing_um / config.working_spacing_um  # <= 1 => shrink further
    factor = min(1.0, factor)
    work_spacing = level.pixel_spacing_um / factor
    tile = max(64, round(config.tile_size_px / factor))
    overlap = math.ceil(config.max_cell_diameter_um * 1.2 / level.pixel_spacing_um)
    tile = max(tile, 2 * overlap + 64)
    width, height = level.size
    cells: list[DetectedCell] = []
    platelets: list[tuple[float, float]] = []
    base_scale = level.downsample
    searched_um2 = 0.0
    for ty, cy0, cy1 in _tile_origins(height, tile, overlap):
        for tx, cx0, cx1 in _tile_origins(width, tile, overlap):
            w, h = min(tile, width - tx), min(tile, height - ty)
            region = slide.read_region(level.index, (tx, ty), (w, h))
            work = _resample(region, factor)
            scale = w / work.shape[1]
            raw, plts = detect_array(work, work_spacing, config)
            for c in raw:
                lx, ly = (c.x + 0.5) * scale - 0.5 + tx, (c.y + 0.5) * scale - 0.5 + ty
                if cx0 <= lx < cx1 and cy0 <= ly < cy1:
                    cells.append(_to_cell(c, scale * base_scale, tx * base_scale,
                                          ty * base_scale, slide.pixel_spacing_um, work_spacing))
            for px, py in plts:
                lx, ly = (px + 0.5) * scale - 0.5 + tx, (py + 0.5) * scale - 0.5 + ty
                if cx0 <= lx < cx1 and cy0 <= ly < cy1:
                    platelets.append((lx * base_scale, ly * base_scale))
            searched_um2 += (cx1 - cx0) * (cy1 - cy0) * level.pixel_spacing_um ** 2
            _check_density(len(cells), searched_um2, config)
    cells = list(_inside(cells, slide.size, config.edge_margin_um / slide.pixel_spacing_um))
    logger.debug("%d cells, %d platelets", len(cells), len(platelets))
    return Detections(
        cells=tuple(sorted(cells, key=lambda c: (c.y, c.x))), platelets=tuple(platelets),
        pixel_spacing_um=slide.pixel_spacing_um, image_size=slide.size, config=config,
    )
