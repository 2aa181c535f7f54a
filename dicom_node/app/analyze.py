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
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

# The worker's encoding and hand-over, which this command shares (OUTPUT_FILES: the files it
# writes into ``--out``; stale ones of an earlier run are removed).
from dicom_node.jobs.encoding import encode_results
from dicom_node.jobs.result import (
    OUTPUT_FILES,
    stage_recorder,
    write_summary,
)

log = logging.getLogger(__name__)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``cytonode analyze``; return the exit status (0, 2 for bad input)."""

    from analysis.errors import CheckpointError, NotABloodSmearError, SlideUnreadableError
    from analysis.pipeline import PipelineConfig, classify_slide, series_files
    from analysis.tiles import Slide

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
    with contextlib.ExitStack() as stack:
        try:
            files = series_files(args.slide)
            slide = stack.enter_context(
                Slide.open(files, default_pixel_spacing_um=args.pixel_spacing_um))
            opened_s = time.perf_counter() - started
            result = classify_slide(slide, config, progress=record)
        except (SlideUnreadableError, NotABloodSmearError) as exc:
            sys.stderr.write(f"cytonode analyze: {_one_line(exc)}\n")
            return 2
        except CheckpointError as exc:
            sys.stderr.write(f"cytonode analyze: {_one_line(exc)}\n")
            return 1
        timings["read"] = round(timings.get("read", 0.0) + opened_s, 3)  # opening is reading

        encode_start = time.perf_counter()
        objects = encode_results(result, slide, platelets_detected=counts.get("platelets"))
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _print_differential(result: Any, timings: dict[str, float], out: Path, *,
                        platelets_detected: int | None = None) -> None:
    """A short human-readable report on stdout: the differential, the flagged cells with their
    numbers (as the SR and the viewer name them) and reasons in words."""
    from analysis.domain import headline
    from dicom_node.encode.differential import Differential, class_label, result_reason_labels

    lines = [f"{len(result.cells)} cells classified; written to {out}"]
    params = result.provenance.parameters
    line = headline(params)
    if line is not None:
        lines.append(f"{line} (site calibration: {params.get('site_calibration', 'none')})")
    if params.get("site_calibration_warning"):
        lines.append(f"site calibration warning: {params['site_calibration_warning']}")
    lines += Differential.from_result(result, platelets_detected=platelets_detected).lines()
    for cell in result.review_cells:
        lines.append(f"    Cell {cell.cell_id}: {class_label(cell.label)}"
                     f" ({', '.join(result_reason_labels(cell))})")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    sys.stdout.write("\n".join(lines) + "\n")
