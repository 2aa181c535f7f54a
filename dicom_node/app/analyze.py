"""The ``cytonode analyze`` sub-command: the whole pipeline on one slide, offline.

Runs :func:`analysis.pipeline.classify_slide`, encodes the result with
:mod:`dicom_node.encode` and writes into the output folder:

- ``sr.dcm``: the TID 1500 measurement report (always, also for a slide without cells);
- ``ann.dcm``: the bulk annotations of every white cell (only when there are cells);
- ``seg.dcm``: the heatmap segmentation (only when there are heatmaps);
- ``pdf.dcm``: the report as Encapsulated PDF (always), ``sc.dcm``: the gallery of the flagged
  cells as Secondary Capture (only when cells are flagged): the report any PACS shows;
- ``summary.json``: differential (counts, percentages, 95 % Wilson intervals), every
  cell with its flags, seconds per stage and the model's provenance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Files this command writes into ``--out``; stale ones of an earlier run are removed.
OUTPUT_FILES = {"sr": "sr.dcm", "ann": "ann.dcm", "seg": "seg.dcm", "pdf": "pdf.dcm", "sc": "sc.dcm"}
SUMMARY = "summary.json"


def add_analyze(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``analyze`` on the ``cytonode`` sub-command parser."""
    p = sub.add_parser("analyze",
                       help="offline: analyse one slide, write SR, ANN, SEG and summary.json")
    p.add_argument("slide", type=Path, help="WSI DICOM file or folder of one series")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's noise draws")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder with the weights and calibration.json (default: the shipped ones)")
    p.add_argument("--n-timesteps", type=int, default=None,
                   help="classifier budget: timesteps per class (default: the calibrated one)")
    p.add_argument("--cell-batch", type=int, default=32, help="cells classified together")
    p.add_argument("--heatmap-timesteps", type=int, default=8,
                   help="timesteps averaged per counterfactual heatmap")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmaps (and the SEG)")
    p.add_argument("--pixel-spacing-um", type=float, default=None,
                   help="um per pixel, used only when the slide has no Pixel Measures")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``cytonode analyze``; return the exit status (0, 2 for bad input)."""

    from analysis.errors import CheckpointError, NotABloodSmearError, SlideUnreadableError
    from analysis.pipeline import PipelineConfig, classify_slide, series_files

    config = PipelineConfig(weights_dir=args.weights, device=args.device, seed=args.seed,
                            n_timesteps=args.n_timesteps, cell_batch=args.cell_batch,
                            heatmaps=not args.no_heatmaps, heatmap_timesteps=args.heatmap_timesteps,
                            default_pixel_spacing_um=args.pixel_spacing_um)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    if not getattr(args, "verbose", False):
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # one line per copied module
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    record = stage_recorder(timings, counts)
    started = time.perf_counter()
    try:
        files = series_files(args.slide)
        result = classify_slide(files, config, progress=record)
    except (SlideUnreadableError, NotABloodSmearError) as exc:
        sys.stderr.write(f"cytonode analyze: {_one_line(exc)}\n")
        return 2
    except CheckpointError as exc:
        sys.stderr.write(f"cytonode analyze: {_one_line(exc)}\n")
        return 1

    encode_start = time.perf_counter()
    objects = encode_results(result, files, platelets_detected=counts.get("platelets"))
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, name in OUTPUT_FILES.items():
        path = args.out / name
        if kind in objects:
            objects[kind].save_as(path, enforce_file_format=True)
        elif path.exists():
            path.unlink()  # a stale object of an earlier run would contradict this one
    timings["encode"] = round(time.perf_counter() - encode_start, 3)
    timings["total"] = round(time.perf_counter() - started, 3)

    write_summary(args.out, result, args.slide, objects, timings, counts)
    _print_differential(result, timings, args.out, platelets_detected=counts.get("platelets"))
    return 0


def stage_recorder(timings: dict[str, float], counts: dict[str, int],
                   then: Any = None) -> Any:
    """A pipeline progress callback that keeps each finished stage's time in ``timings`` and its
    counts in ``counts``, then passes the event on to ``then`` (if given)."""
    def record(event: Any) -> None:
        if event.finished:
            timings[event.stage] = round(event.elapsed_s, 3)
            counts.update(event.counts)
        if then is not None:
            then(event)

    return record


def write_summary(out: Path, result: Any, slide: Path, objects: dict[str, Any],
                  timings: dict[str, float], counts: dict[str, int]) -> Path:
    """Write ``summary.json`` and, when there are heatmaps, ``heatmaps.npz`` (one float32 array per
    kind on the grid ``summary["heatmaps"]`` describes) into ``out``; return the summary's path."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    if result.heatmaps:
        tmp = out / "heatmaps.tmp.npz"
        np.savez_compressed(tmp, **{h.kind.value: h.values.astype(np.float32) for h in result.heatmaps})
        os.replace(tmp, out / "heatmaps.npz")
    path = out / SUMMARY
    tmp_json = out / (SUMMARY + ".tmp")
    tmp_json.write_text(json.dumps(_summary(result, slide, objects, timings, counts), indent=1) + "\n")
    os.replace(tmp_json, path)
    return path


def encode_results(result: Any, files: list[Path], *, platelets_detected: int | None = None,
                   ) -> dict[str, Any]:
    """The DICOM objects of one slide's result: ``sr`` always, ``ann`` when there are cells,
    ``seg`` when there are heatmaps (an annotation group cannot be empty, PS3.3 C.37.1.2),
    ``pdf`` always and ``sc`` when cells are flagged (released with the SR: same outbox path)."""
    import pydicom

    from dicom_node.encode.ann import encode_bulk_annotations
    from dicom_node.encode.common import EncoderParams
    from dicom_node.encode.seg import encode_heatmaps
    from dicom_node.encode.sr import encode_report

    source_datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    params = EncoderParams()
    objects: dict[str, Any] = {"sr": encode_report(result, source_datasets, params,
                                                   platelets_detected=platelets_detected)}
    if result.cells:
        objects["ann"] = encode_bulk_annotations(result, source_datasets, params)
    if result.heatmaps:
        objects["seg"] = encode_heatmaps(result, source_datasets, params)
    # --- issue 20 (3): the report any PACS shows, next to the SR ---
    from dicom_node.encode.pdf import encode_pdf_report
    from dicom_node.encode.sc import encode_flagged_gallery, read_flagged_crops

    objects["pdf"] = encode_pdf_report(result, source_datasets, params,
                                       platelets_detected=platelets_detected)
    crops = read_flagged_crops(result, files)
    if crops:
        objects["sc"] = encode_flagged_gallery(result, source_datasets, crops, params)
    # --- end issue 20 (3) ---
    return objects


def differential(result: Any) -> list[dict[str, Any]]:
    """One row per class (:meth:`dicom_node.encode.differential.Differential.rows`): white cells
    with percentage of white cells and 95 % Wilson interval, erythroblasts per 100 white cells,
    platelets counted only."""
    from dicom_node.encode.differential import Differential

    return Differential.from_result(result).rows()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _summary(result: Any, slide: Path, objects: dict[str, Any], timings: dict[str, float],
             counts: dict[str, int]) -> dict[str, Any]:
    """The ``summary.json`` document."""
    from dicom_node.encode.differential import Differential

    cells = [_cell_json(c) for c in result.cells]
    return {
        "slide": {
            "path": str(slide),
            "study_instance_uid": result.study_instance_uid,
            "series_instance_uid": result.series_instance_uid,
            "sop_instance_uids": list(result.sop_instance_uids),
            "total_pixel_matrix": [result.total_pixel_matrix_columns,
                                   result.total_pixel_matrix_rows],
            "pixel_spacing_mm": list(result.pixel_spacing_mm),
        },
        "cell_count": len(result.cells),
        "platelets_detected": counts.get("platelets"),
        "differential": differential(result),
        "report": Differential.from_result(
            result, platelets_detected=counts.get("platelets")).as_json(),
        "interval": "95 % Wilson score interval of the percentage of white cells",
        "flagged": [c for c in cells if c["review"]],
        "cells": cells,
        "heatmaps": [{"kind": h.kind.value, "shape": list(h.shape), "cell_size_px": h.cell_size_px}
                     for h in result.heatmaps],
        "timings_s": timings,
        "provenance": {
            "name": result.provenance.name, "version": result.provenance.version,
            "weights_sha256": result.provenance.weights_sha256,
            "parameters": dict(result.provenance.parameters),
        },
        "files": {kind: {"path": OUTPUT_FILES[kind], "sop_instance_uid": str(ds.SOPInstanceUID),
                         "series_instance_uid": str(ds.SeriesInstanceUID)}
                  for kind, ds in objects.items()},
    }


def _cell_json(cell: Any) -> dict[str, Any]:
    return {
        "cell_id": cell.cell_id, "x": round(cell.x, 1), "y": round(cell.y, 1),
        "bbox": list(cell.bbox), "area_um2": round(cell.area_um2, 2),
        "label": cell.label.value, "probability": round(cell.probability, 6),
        "probabilities": {k: round(float(v), 6) for k, v in cell.probabilities.items()},
        "uncertainty": round(cell.uncertainty, 6), "anomaly_score": round(cell.anomaly_score, 6),
        "review": cell.review,
        "review_reason": cell.review_reason.value if cell.review_reason else None,
        "review_reasons": [r.value for r in cell.review_reasons],
        "abnormal": cell.abnormal,
        "abnormal_reason": cell.abnormal_reason.value if cell.abnormal_reason else None,
    }


def _print_differential(result: Any, timings: dict[str, float], out: Path, *,
                        platelets_detected: int | None = None) -> None:
    """A short human-readable report on stdout: the differential, the flagged cells with their
    numbers (as the SR and the viewer name them) and reasons in words."""
    from analysis.domain import headline
    from dicom_node.encode.differential import Differential, class_label

    lines = [f"{len(result.cells)} cells classified; written to {out}"]
    params = result.provenance.parameters
    line = headline(params)
    if line is not None:
        lines.append(f"{line} (site calibration: {params.get('site_calibration', 'none')})")
    lines += Differential.from_result(result, platelets_detected=platelets_detected).lines()
    for cell in result.review_cells:
        lines.append(f"    Cell {cell.cell_id}: {class_label(cell.label)}"
                     f" ({', '.join(cell.review_labels)})")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    sys.stdout.write("\n".join(lines) + "\n")
