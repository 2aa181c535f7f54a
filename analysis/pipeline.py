"""The offline analysis of one slide: find and classify every white cell, build a SlideResult.

Stages, each reported through :mod:`logging` and an optional progress callback:

1. **read**: open the VL Whole Slide Microscopy series with :class:`analysis.tiles.Slide`
   (or take the one the caller opened) and check the base level's header (UIDs, size, pixel
   spacing) that the slide read when it was opened.
2. **detect**: :func:`analysis.detect.find_cells`. Platelets found by the detector are
   counted only; they are not classified and do not enter the differential. A white cell
   that the classifier labels ``platelet`` does (see :class:`analysis.results.ClassCount`).
3. **crop**: each cell framed as every training cell was: the square of
   :data:`analysis.framing.FIELD_OF_VIEW_UM` around it at the model's input size
   (:func:`analysis.crops.crop_cell`); the red cells around the crops check the pixel
   spacing (:func:`analysis.crops.slide_scale_check`).
4. **classify**: the shipped diffusion classifier, in batches of cells, with one seeded CPU
   generator: the same two steps as :meth:`analysis.classifier.DiffusionClassifier.predict`
   (:func:`analysis.classify.score_cells`, then
   :func:`analysis.classifier.diffusion_predictions`) with the budget of
   :class:`PipelineConfig`.
5. **heatmap**: per cell the counterfactual heatmap of :mod:`analysis.heatmap` (predicted
   class against the runner-up) and the cell's anomaly score, painted on a coarse grid
   aligned with the base level (:class:`analysis.results.HeatmapGrid`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analysis.classes import CLASS_NAMES, CellClassValues
from analysis.crops import CropConfig, ScaleCheck, crop_cell, crop_footprint, slide_scale_check
from analysis.detect import DetectedCell, DetectorConfig, find_cells
from analysis.domain import DomainCheck, check_domain, slide_threshold
from analysis.errors import SlideUnreadableError
from analysis.results import (
    CellResult,
    FlagReasonValues,
    HeatmapGrid,
    HeatmapKindValues,
    ModelProvenance,
    SlideResult,
    weights_sha256,
)
from analysis.review import diffusion_reasons
from analysis.tiles import Slide, has_dicm_preamble

logger = logging.getLogger(__name__)

#: Name of the model in every result's provenance.
MODEL_NAME = "cytodiffusion"

#: Slope of the logistic that maps an anomaly z-score to [0, 1] in the anomaly heatmap:
#: 0.5 at the calibrated abnormal threshold, about 0.95 at 1.5 above it, about 0.03 at z = 0.
ANOMALY_SLOPE = 2.0


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How one slide is analysed.

    Parameters
    ----------
    weights_dir:
        Folder with the diffusion weights and ``calibration.json``; ``None``: the shipped ones.
    device:
        ``cpu`` (default) or ``cuda``; never changed behind the caller's back.
    seed:
        Seed of the CPU generator that draws the classifier's noise and timestep orders
        (the heatmaps use ``seed + 1``), so a slide always gives the same result.
    n_timesteps:
        Timestep grid per class (the classifier's budget); ``None``: the calibrated one.
        With another value the thresholds stay those calibrated for the calibrated budget
        (a warning says so; the anomaly reference is interpolated onto the new grid, see
        :func:`analysis.classifier.anomaly_reference`).
    cell_batch:
        Cells classified together (one progress step).
    heatmaps:
        Whether to compute the heatmap grids.
    heatmap_timesteps:
        Timesteps averaged by each counterfactual heatmap.
    heatmap_grid_um:
        Wanted side of one heatmap grid pixel in micrometres.
    heatmap_max_side:
        Largest number of grid pixels along either side; a large slide gets coarser pixels.
    default_pixel_spacing_um:
        Spacing used when the slide has no Pixel Measures; ``None`` makes that an error.
    detector, crops:
        Parameters of the white-cell finder and of the cell framing.
    site:
        The lab's :class:`analysis.site.SiteCalibration` (``cytonode calibrate-site``), or
        ``None``: the shipped review thresholds. Named in the result's provenance.
    """

    weights_dir: Path | None = None
    device: str = "cpu"
    seed: int = 0
    n_timesteps: int | None = None
    cell_batch: int = 32
    heatmaps: bool = True
    heatmap_timesteps: int = 8
    heatmap_grid_um: float = 1.0
    heatmap_max_side: int = 4096
    default_pixel_spacing_um: float | None = None
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    crops: CropConfig = dataclasses.field(default_factory=CropConfig)
    site: Any = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, not {self.seed!r}")
        if self.n_timesteps is not None and self.n_timesteps < 2:
            raise ValueError(f"n_timesteps must be at least 2, not {self.n_timesteps}")
        if self.cell_batch < 1:
            raise ValueError(f"cell_batch must be at least 1, not {self.cell_batch}")
        if self.heatmap_timesteps < 2:
            raise ValueError(f"heatmap_timesteps must be at least 2, not {self.heatmap_timesteps}")
        if not self.heatmap_grid_um > 0:
            raise ValueError(f"heatmap_grid_um must be > 0, not {self.heatmap_grid_um}")
        if self.heatmap_max_side < 16:
            raise ValueError(f"heatmap_max_side must be at least 16, not {self.heatmap_max_side}")
        if self.default_pixel_spacing_um is not None and not self.default_pixel_spacing_um > 0:
            raise ValueError("default_pixel_spacing_um must be > 0 or None")


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """Where the analysis of a slide stands, passed to the progress callback.

    Parameters
    ----------
    stage:
        ``read``, ``detect``, ``crop``, ``classify`` or ``heatmap``.
    done, total:
        Units (cells, or 1 for a stage without units) done so far, of ``total``.
        ``done == total`` marks the end of the stage.
    elapsed_s:
        Seconds since the stage started (at its end: how long the stage took).
    eta_s:
        Estimated seconds left in the stage; ``None`` when there is no estimate yet.
    counts:
        Extra numbers of the stage (``detect``: ``white_cells`` and ``platelets``).
    """

    stage: str
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None = None
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True for the last event of a stage."""
        return self.done >= self.total


ProgressCallback = Callable[[ProgressEvent], None]


class _Stage:
    """Times one stage and reports its progress to the log and the callback."""

    def __init__(self, name: str, total: int, callback: ProgressCallback | None) -> None:
        self.name, self.total, self.callback = name, total, callback
        self.start = time.perf_counter()
        self.report(0)

    def report(self, done: int, counts: Mapping[str, int] | None = None) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if 0 < done < self.total else None
        if done >= self.total:
            logger.info("%s: done (%d), %.2f s", self.name, self.total, elapsed)
        elif done > 0:
            logger.info("%s: %d/%d, %.1f s, ETA %.0f s", self.name, done, self.total, elapsed,
                        eta or 0.0)
        if self.callback is not None:
            self.callback(ProgressEvent(self.name, done, self.total, elapsed, eta,
                                        dict(counts or {})))


# --- Reading -------------------------------------------------------------------------------
def series_files(slide_paths: Path | str | Sequence[Path | str]) -> list[Path]:
    """The DICOM files of one slide given a file, a folder or a list of files.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    SlideUnreadableError
        If no DICOM file is found.
    """
    items = [Path(slide_paths)] if isinstance(slide_paths, (str, os.PathLike)) else \
        [Path(p) for p in slide_paths]
    if not items:
        raise SlideUnreadableError("no slide files given")
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and has_dicm_preamble(p))
            if not found:
                raise SlideUnreadableError(f"{item}: folder holds no DICOM files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def _pixel_spacing_mm(ds: Any, default_um: float | None) -> tuple[float, float]:
    """Pixel Spacing (row, column) of a tiled image in mm (PS3.3 C.7.6.16.2.1)."""
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError):
        if default_um is None:
            raise SlideUnreadableError("no pixel spacing (Pixel Measures) and no default") from None
        return default_um / 1000.0, default_um / 1000.0


# --- Geometry ------------------------------------------------------------------------------
def _open_outline(cell: DetectedCell, width: int, height: int) -> tuple[tuple[float, float], ...]:
    """The detector's closed outline as an open polygon inside the total pixel matrix."""
    points: list[tuple[float, float]] = []
    for x, y in cell.outline:
        p = (min(max(float(x), 0.0), float(width)), min(max(float(y), 0.0), float(height)))
        if not points or p != points[-1]:
            points.append(p)
    while len(points) > 1 and points[-1] == points[0]:
        points.pop()
    if len(set(points)) < 3:  # degenerate outline: fall back to the bounding box
        x0, y0, x1, y1 = cell.bbox
        points = [(float(x0), float(y0)), (float(x1), float(y0)), (float(x1), float(y1)),
                  (float(x0), float(y1))]
    return tuple(points)


def _clipped_bbox(cell: DetectedCell, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = cell.bbox
    x0, y0 = max(0, min(x0, width - 1)), max(0, min(y0, height - 1))
    return x0, y0, max(x0 + 1, min(x1, width)), max(y0 + 1, min(y1, height))


def heatmap_cell_size(slide_size: tuple[int, int], pixel_spacing_um: float,
                      config: PipelineConfig) -> int:
    """Side of one heatmap grid pixel in base-level pixels."""
    wanted = max(1, round(config.heatmap_grid_um / pixel_spacing_um))
    return max(wanted, math.ceil(max(slide_size) / config.heatmap_max_side))


def _paint_evidence(grid: NDArray[np.float32], heat: NDArray[np.float32], slide: Slide,
                    cell: DetectedCell, crops: CropConfig, size: int) -> None:
    """Put the positive part of one cell's heatmap on the grid where its crop lies (maximum)."""
    from scipy import ndimage as ndi

    # The footprint of the crop exactly as analysis.crops.crop_cell reads it.
    level, x0, y0, side = crop_footprint(slide, cell, crops)
    s = heat.shape[0]
    base_x0, base_y0 = x0 * level.downsample, y0 * level.downsample
    base_side = side * level.downsample
    rows, cols = grid.shape
    j0, j1 = max(0, int(base_x0 // size)), min(cols, int((base_x0 + base_side) // size) + 1)
    i0, i1 = max(0, int(base_y0 // size)), min(rows, int((base_y0 + base_side) // size) + 1)
    if j0 >= j1 or i0 >= i1:
        return
    ii, jj = np.mgrid[i0:i1, j0:j1]
    u = (((jj + 0.5) * size - base_x0) / base_side) * s - 0.5  # heat column
    v = (((ii + 0.5) * size - base_y0) / base_side) * s - 0.5  # heat row
    inside = (u >= -0.5) & (u <= s - 0.5) & (v >= -0.5) & (v <= s - 0.5)
    values = ndi.map_coordinates(np.maximum(heat, 0.0), [v.ravel(), u.ravel()], order=1,
                                 mode="nearest").reshape(u.shape)
    block = grid[i0:i1, j0:j1]
    np.maximum(block, np.where(inside, values, 0.0).astype(np.float32), out=block)


def _paint_anomaly(grid: NDArray[np.float32], outline: Sequence[tuple[float, float]],
                   centre: tuple[float, float], value: float, size: int) -> None:
    """Fill the cell's outline on the grid with ``value`` (maximum with what is there)."""
    from skimage.draw import polygon

    xs = np.array([p[0] for p in outline]) / size - 0.5
    ys = np.array([p[1] for p in outline]) / size - 0.5
    rr, cc = polygon(ys, xs, shape=grid.shape)  # type: ignore[no-untyped-call]
    rows, cols = grid.shape
    ci = min(rows - 1, int(centre[1] // size))
    cj = min(cols - 1, int(centre[0] // size))
    rr, cc = np.append(rr, ci), np.append(cc, cj)  # a cell smaller than a grid pixel
    grid[rr, cc] = np.maximum(grid[rr, cc], np.float32(value))


# --- The pipeline --------------------------------------------------------------------------
def classify_slide(slide: Slide | Path | str | Sequence[Path | str],
                   config: PipelineConfig | None = None, *,
                   progress: ProgressCallback | None = None) -> SlideResult:
    """Find and classify every white cell of one slide.

    Parameters
    ----------
    slide:
        One VL Whole Slide Microscopy series: a :class:`analysis.tiles.Slide` already open
        (a job opens its slide once and hands it on; it stays open), or a DICOM file, a
        folder holding the series or the list of its files (opened and closed here, at
        ``config.default_pixel_spacing_um``).
    config:
        Budgets, device, seed and the detector and crop parameters (defaults if ``None``).
    progress:
        Called with a :class:`ProgressEvent` at the start of each stage, after each
        batch of cells and at the end of each stage (``done == total``; its
        ``elapsed_s`` is the time the stage took).

    Returns
    -------
    SlideResult
        Every white cell (base-level total-pixel-matrix coordinates) with its class,
        posterior, uncertainty, anomaly score and flags; heatmaps when asked for; the
        model's provenance.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    analysis.errors.SlideUnreadableError
        If the paths are not one readable WSI series.
    analysis.errors.CheckpointError
        If the weights or the calibration cannot be read.
    """
    config = config or PipelineConfig()
    if isinstance(slide, Slide):
        return _classify_open_slide(slide, config, progress, _Stage("read", 1, progress))
    files = series_files(slide)
    stage = _Stage("read", 1, progress)
    with Slide.open(files, default_pixel_spacing_um=config.default_pixel_spacing_um) as opened:
        return _classify_open_slide(opened, config, progress, stage)


def _classify_open_slide(slide: Slide, config: PipelineConfig, progress: ProgressCallback | None,
                         stage: _Stage) -> SlideResult:
    """:func:`classify_slide` on an open slide; ``stage`` is the running ``read`` stage."""
    base = slide.base_headers
    ds = base[0]
    default_um = (config.default_pixel_spacing_um if config.default_pixel_spacing_um is not None
                  else slide.default_pixel_spacing_um)
    spacing_mm = _pixel_spacing_mm(ds, default_um)
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    if (width, height) != slide.size:
        raise SlideUnreadableError(f"base level is {slide.size} px, its header says "
                                   f"{(width, height)}")
    stage.report(1)

    stage = _Stage("detect", 1, progress)
    detections = find_cells(slide, config.detector)
    cells = detections.cells
    stage.report(1, {"white_cells": len(cells), "platelets": len(detections.platelets)})
    logger.info("%d white cells (classified), %d platelets (counted only)", len(cells),
                len(detections.platelets))

    stage = _Stage("crop", max(1, len(cells)), progress)
    classifier, classifier_config = _load_classifier(config)
    review_model = _load_review_model(config, classifier)
    site, site_notes = (None, ()) if review_model is None else review_model.usable_site(config.site)
    for note in site_notes:
        logger.warning("%s", note)
    # a site fine-tuned on its named cells has its own diffusion classifier
    classifier = classifier.for_network(None if site is None else site.network)
    crop_config = dataclasses.replace(config.crops, output_size=classifier.image_size)
    framed = _framed([crop_cell(slide, cell, crop_config) for cell in cells],
                     classifier.image_size)
    reference_framed = None
    if review_model is not None:  # the same field of view, at the reference's size
        reference_crops = dataclasses.replace(config.crops, output_size=review_model.image_size)
        reference_framed = _framed([crop_cell(slide, cell, reference_crops) for cell in cells],
                                   review_model.image_size)
    scale = slide_scale_check(slide, cells)
    if scale.ok is False:
        logger.warning("scale check failed: red cells measure %.2f um at the slide's "
                       "pixel spacing (expected about 7.5 um)", scale.red_cell_diameter_um)
    stage.report(max(1, len(cells)))

    stage = _Stage("classify", max(1, len(cells)), progress)
    predictions = _classify(classifier, classifier_config, framed, config, stage)
    flags, predictions = _review(review_model, predictions, reference_framed, scale=scale,
                                 site=site)
    heatmaps: tuple[HeatmapGrid, ...] = ()
    if config.heatmaps and cells:
        heatmaps = _heatmaps(classifier, classifier_config, framed, predictions, slide,
                             cells, config, progress)

    cell_results = []
    for i, cell in enumerate(cells):
        reasons, abnormal = flags.reasons[i], bool(flags.abnormal[i])
        anomaly = float(flags.anomaly_score[i])
        if not math.isfinite(anomaly):
            raise ValueError(f"cell {i}: the classifier gave a non-finite anomaly score")
        probabilities = {name: float(predictions["probabilities"][i, c])
                         for c, name in enumerate(CLASS_NAMES)}
        cell_results.append(CellResult(
            cell_id=i, x=min(max(cell.x, 0.0), width), y=min(max(cell.y, 0.0), height),
            outline=_open_outline(cell, width, height), bbox=_clipped_bbox(cell, width, height),
            area_um2=cell.area_um2,
            label=CellClassValues(CLASS_NAMES[int(predictions["label"][i])]),
            probabilities=probabilities,
            uncertainty=min(1.0, max(0.0, float(predictions["uncertainty"][i]))),
            anomaly_score=anomaly,
            review=bool(reasons), review_reasons=reasons, abnormal=abnormal,
            abnormal_reason=FlagReasonValues.HIGH_ANOMALY_SCORE if abnormal else None,
            **{key: CellClassValues(CLASS_NAMES[int(predictions[key][i])])
               for key in ("diffusion_label", "reference_label") if key in predictions},
        ))
    return SlideResult(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in base),
        frame_of_reference_uid=str(ds.FrameOfReferenceUID),
        total_pixel_matrix_columns=width,
        total_pixel_matrix_rows=height,
        pixel_spacing_mm=spacing_mm,
        cells=tuple(cell_results),
        provenance=_provenance(classifier, classifier_config, config,
                               heatmaps[0].cell_size_px if heatmaps else 0, scale, review_model,
                               flags.domain, site, site_notes),
        heatmaps=heatmaps,
    )


def _load_classifier(config: PipelineConfig) -> tuple[Any, Any]:
    """The shipped classifier (with its calibration) and its budget (``n_timesteps`` may override it)."""
    from analysis.classifier import WEIGHTS_DIR, DiffusionClassifier

    classifier = DiffusionClassifier(config.weights_dir or WEIGHTS_DIR, device=config.device)
    calibrated = classifier.config
    budget = dataclasses.replace(calibrated, cell_batch=config.cell_batch, device=config.device)
    if config.n_timesteps is not None and config.n_timesteps != calibrated.n_timesteps:
        n = config.n_timesteps
        budget = dataclasses.replace(budget, n_timesteps=n, round_size=min(budget.round_size, n),
                                     min_samples=min(budget.min_samples, n))
        logger.warning("classifier budget %d timesteps instead of the calibrated %d: the review "
                       "and abnormal thresholds were calibrated for %d", n, calibrated.n_timesteps,
                       calibrated.n_timesteps)
    return classifier, budget


def _load_review_model(config: PipelineConfig, classifier: Any) -> Any:
    """The review rule of the calibration (``None`` for one written before it existed)."""
    from analysis.classifier import WEIGHTS_DIR
    from analysis.review import ReviewModel

    return ReviewModel.load(config.weights_dir or WEIGHTS_DIR, classifier.calibration)


@dataclasses.dataclass(frozen=True)
class _Flags:
    reasons: tuple[tuple[FlagReasonValues, ...], ...]
    abnormal: np.ndarray
    anomaly_score: np.ndarray
    domain: DomainCheck


def _review(review_model: Any, predictions: dict[str, np.ndarray],
            reference_framed: NDArray[np.uint8] | None, *, scale: ScaleCheck,
            site: Any = None) -> tuple[_Flags, dict[str, np.ndarray]]:
    """Flags and reasons of every cell, and the predictions reported: the review rule
    (:mod:`analysis.review`, with the combined posterior) when the calibration has one, else
    the diffusion classifier's own predictions and thresholds; every cell of a slide outside
    the validated domain (:mod:`analysis.domain`) is flagged too. A suspected abnormal cell
    always goes to review, so "flagged" means the same everywhere."""
    if review_model is None:
        domain = check_domain(scale.ok, scale.red_cell_diameter_um, None, None)
        reasons = diffusion_reasons(predictions["review"], predictions["abnormal"],
                                    outside_domain=not domain.inside)
        return _Flags(reasons, np.asarray(predictions["abnormal"], bool),
                      np.asarray(predictions["anomaly_score"], np.float64), domain), predictions
    measured = review_model.measure(reference_framed, site)
    distance = measured[2]
    domain = check_domain(scale.ok, scale.red_cell_diameter_um, distance,
                          slide_threshold(review_model.rule.slide_feature_threshold, site), site)
    if not domain.inside:
        logger.warning("slide %s", domain.summary)
    a = review_model.conclude(predictions["probabilities"], predictions["uncertainty"], measured,
                              outside_domain=not domain.inside, site=site)
    reported = {**predictions, "probabilities": a.probabilities, "label": a.label,
                "uncertainty": a.uncertainty,
                "diffusion_label": a.diffusion_label, "reference_label": a.reference_label}
    return _Flags(a.decision.reasons, a.decision.abnormal, distance, domain), reported


def _framed(crops: Sequence[NDArray[np.uint8]], image_size: int) -> NDArray[np.uint8]:
    """``(N, S, S, 3)`` uint8: the framed crops as one array."""
    if not crops:
        return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    return np.stack(crops)


def _classify(classifier: Any, budget: Any, images: NDArray[np.uint8], config: PipelineConfig,
              stage: _Stage) -> dict[str, np.ndarray]:
    """Classify the framed cells in batches; one generator for the whole slide."""
    import torch

    from analysis.classifier import diffusion_predictions
    from analysis.classify import images_to_tensor, score_cells

    n = len(images)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    parts: list[Any] = []
    for start in range(0, n, config.cell_batch):
        batch = images[start:start + config.cell_batch]
        scores = score_cells(classifier.unet, classifier.model_config, images_to_tensor(batch),
                             budget, generator)
        parts.append(diffusion_predictions(scores, classifier.calibration))
        if start + len(batch) < n:
            stage.report(start + len(batch))
    stage.report(max(1, n))
    fields = ("probabilities", "label", "uncertainty", "anomaly_score", "review", "abnormal")
    if not parts:
        return {"probabilities": np.zeros((0, len(CLASS_NAMES))),
                **{f: np.zeros(0) for f in fields[1:]}}
    return {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}


def _heatmaps(classifier: Any, budget: Any, images: NDArray[np.uint8],
              predictions: dict[str, np.ndarray], slide: Slide,
              cells: Sequence[DetectedCell], config: PipelineConfig,
              progress: ProgressCallback | None) -> tuple[HeatmapGrid, ...]:
    """Counterfactual evidence and anomaly, each rescaled to [0, 1], on one coarse grid."""
    import torch

    from analysis.classify import images_to_tensor
    from analysis.heatmap import counterfactual_heatmaps

    size = heatmap_cell_size(slide.size, slide.pixel_spacing_um, config)
    crops = dataclasses.replace(config.crops, output_size=classifier.image_size)
    width, height = slide.size
    shape = (-(-height // size), -(-width // size))
    evidence = np.zeros(shape, dtype=np.float32)
    anomaly = np.zeros(shape, dtype=np.float32)
    n = len(cells)
    stage = _Stage("heatmap", n, progress)
    heat_budget = dataclasses.replace(
        budget, n_timesteps=config.heatmap_timesteps,
        round_size=min(budget.round_size, config.heatmap_timesteps),
        min_samples=min(budget.min_samples, max(2, config.heatmap_timesteps)))
    generator = torch.Generator("cpu").manual_seed(config.seed + 1)
    tensors = images_to_tensor(images)
    threshold = float(classifier.calibration["abnormal_threshold"])
    predicted = predictions["label"].astype(int)
    runner_up = np.array([int(next(c for c in np.argsort(-p, kind="stable") if int(c) != int(k)))
                          for p, k in zip(predictions["probabilities"], predicted)], dtype=int)
    chunk = max(1, config.cell_batch)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        heats = counterfactual_heatmaps(classifier.unet, classifier.model_config, tensors[start:stop],
                                        predicted[start:stop], runner_up[start:stop], heat_budget,
                                        generator)
        for i in range(start, stop):
            cell = cells[i]
            _paint_evidence(evidence, heats[i - start], slide, cell, crops, size)
            z = float(predictions["anomaly_score"][i])
            value = 1.0 / (1.0 + math.exp(-ANOMALY_SLOPE * (z - threshold)))
            _paint_anomaly(anomaly, _open_outline(cell, width, height), (cell.x, cell.y), value, size)
        if stop < n:
            stage.report(stop)
    peak = float(evidence.max())
    if peak > 0:
        evidence = np.clip(evidence / peak, 0.0, 1.0).astype(np.float32)  # 1: the strongest
    stage.report(n)
    return (HeatmapGrid(HeatmapKindValues.COUNTERFACTUAL_EVIDENCE, evidence, size),
            HeatmapGrid(HeatmapKindValues.ANOMALY, anomaly, size))


def _provenance(classifier: Any, budget: Any, config: PipelineConfig,
                heatmap_cell_size_px: int, scale: ScaleCheck | None = None,
                review_model: Any = None, domain: DomainCheck | None = None, site: Any = None,
                site_notes: Sequence[str] = ()) -> ModelProvenance:
    from analysis.classifier import DIFFUSION_WEIGHTS, WEIGHTS_DIR

    weights = (config.weights_dir or WEIGHTS_DIR) / DIFFUSION_WEIGHTS
    calibration = classifier.calibration
    parameters: dict[str, str | int | float | bool] = {
        "n_timesteps": int(budget.n_timesteps), "t_min": int(budget.t_min),
        "t_max": int(budget.t_max), "round_size": int(budget.round_size),
        "min_samples": int(budget.min_samples), "alpha": float(budget.alpha),
        "views": int(budget.views), "device": str(budget.device), "seed": config.seed,
        "beta": float(calibration["beta"]),
        "review_threshold": float(calibration["review_threshold"]),
        "abnormal_threshold": float(calibration["abnormal_threshold"]),
        "field_of_view_um": float(config.crops.field_of_view_um),
        "image_size": int(classifier.image_size),
    }
    if review_model is not None:
        rule = review_model.rule_for(site)
        parameters["review_rule"] = "significant class, unlike any training class, models disagree, uncertain"
        for key, value in (("review_uncertainty_threshold", rule.uncertainty_threshold),
                           ("review_feature_threshold", rule.feature_threshold)):
            parameters[key] = float(value) if math.isfinite(value) else "off"
        parameters["review_models_disagree"] = bool(rule.disagreement)
        parameters["review_uncertainty_of"] = rule.uncertainty_of
        w = float(rule.diffusion_weight)
        parameters["reported_posterior"] = (
            "diffusion classifier alone" if w == 1.0 else
            f"diffusion^{w:g} x reference^{1 - w:g}, normalised (weight chosen on val)")
        parameters["reference_views"] = int(rule.reference_views)
        parameters["review_significant_classes"] = ", ".join(rule.significant_classes)
        parameters["anomaly_score"] = "reference feature distance (Mahalanobis, nearest class)"
        parameters["site_calibration"] = site.label if site is not None else "none"
        if site is not None and site.network is not None:
            from analysis.site_adapt import reference_state

            named = (f"{site.labelled_cells} labelled cells "
                     f"({', '.join(f'{c} {n}' for c, n in site.labelled)})")
            own = bool(reference_state(site.network))
            parameters["site_reference_network"] = (
                "shipped reference (the site's own did not beat it on the labelled cells)"
                if not own else
                f"shipped reference adapted to the site and fine-tuned whole on {named}"
                if site.finetuned else
                f"shipped reference adapted to the site and refitted on {named}"
            ) + (f"; sha256 {site.network_sha256}" if own else "")
            if site.finetuned:
                parameters["site_diffusion_classifier"] = (
                    f"shipped diffusion classifier fine-tuned on {named}; in the same file")
        if site is not None and site.verified_balanced_accuracy is not None:
            parameters["site_verified"] = (
                f"reported class right on {site.verified_text} of the site's "
                f"{site.verified_cells} labelled cells, none read by a network fitted on it")
        if site is not None and site.unsure_measured:
            parameters["site_unsure"] = (
                f"{site.unsure_text} of the site's unlabelled cells read at its calibration "
                f"(validated labs: at most {site.unsure_expected:.1%})")
        if site_notes:
            parameters["site_calibration_warning"] = "; ".join(site_notes)
        parameters["reference_weights_sha256"] = review_model.reference_sha256
    if domain is not None:
        parameters["validated_domain"] = domain.summary
        if domain.median_feature_distance is not None:
            parameters["median_feature_distance"] = round(domain.median_feature_distance, 3)
    if scale is not None:
        parameters["scale_check"] = ("not measured (fewer than 3 crops with red cells)"
                                     if scale.ok is None else "ok" if scale.ok else "failed")
        if scale.red_cell_diameter_um is not None:
            parameters["red_cell_diameter_um"] = scale.red_cell_diameter_um
    if heatmap_cell_size_px:
        parameters["heatmap_timesteps"] = config.heatmap_timesteps
        parameters["heatmap_cell_size_px"] = heatmap_cell_size_px
    step = str(classifier.metadata.get("step", "0"))
    return ModelProvenance(name=MODEL_NAME, version=f"train-step-{step}",
                           weights_sha256=weights_sha256(weights), parameters=parameters)
