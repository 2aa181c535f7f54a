"""``cytonode calibrate-site``: fit, list and show site calibrations (:mod:`analysis.site`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _default_data_dir() -> Path:
    from dicom_node.errors import SettingsError
    from dicom_node.settings import Settings

    try:
        return Settings.from_env().data_dir
    except SettingsError:
        return Settings().data_dir


def add_calibrate_site(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "calibrate-site",
        help="fit the review rule's site-dependent parts on unlabelled cells of a new lab's "
             "normal smears",
        description="Reads single-cell images (PNG/JPEG/BMP files or folders) of normal smears "
                    "of one lab, fits where its cells sit in the reference network's feature "
                    "space and the matching 'unlike any training class' threshold, and stores "
                    "the calibration in DATA_DIR/sites/ID.json. Jobs use the newest one (or the "
                    "one CYTONODE_SITE_CALIBRATION names) and every report names it.")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--id", dest="site_id", help="name of the calibration (letters, digits, _.-)")
    p.add_argument("--pixel-spacing", type=float, default=None,
                   help="micrometres per pixel of the images (default: the median red-cell "
                        "estimate over all images)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the node's data folder (default: CYTONODE_DATA_DIR or ./var)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: shipped)")
    p.add_argument("--list", action="store_true", help="list the stored calibrations and exit")
    p.add_argument("--json", action="store_true", help="print the calibration's summary as JSON")
    p.set_defaults(func=run_calibrate_site)


def run_calibrate_site(args: argparse.Namespace) -> int:
    from analysis.errors import CheckpointError, DatasetError
    from analysis.framing import collect_image_paths
    from analysis.site import check_site_id, list_sites

    data_dir = args.data_dir or _default_data_dir()
    if args.list:
        for site in list_sites(data_dir):
            sys.stdout.write(f"{site.label}\tsource {site.source}\tflagged {site.flag_rate_before:.1%}"
                             f" -> {site.flag_rate_after:.1%}\n")
        return 0
    if not args.paths or not args.site_id:
        sys.stderr.write("cytonode calibrate-site: give image folders and --id NAME (or --list)\n")
        return 2
    try:
        check_site_id(args.site_id)
        paths = collect_image_paths(list(args.paths))
    except (ValueError, DatasetError) as exc:
        sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
        return 2
    if args.pixel_spacing is not None and not 0.01 <= args.pixel_spacing <= 10.0:
        sys.stderr.write("cytonode calibrate-site: --pixel-spacing must lie in [0.01, 10] um\n")
        return 2
    try:
        summary = calibrate_site(paths, args.site_id, data_dir, weights_dir=args.weights,
                                 pixel_spacing_um=args.pixel_spacing,
                                 source=", ".join(p.name for p in args.paths)[:200])
    except (DatasetError, ValueError) as exc:
        sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
        return 2
    except CheckpointError as exc:
        sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(f"site calibration {summary['label']} written to {summary['path']}\n"
                         f"  'unlike any training class' on these cells: "
                         f"{summary['flag_rate_before']:.1%} with the shipped threshold, "
                         f"{summary['flag_rate_after']:.1%} with the site's\n")
    return 0


def calibrate_site(paths: list[Path], site_id: str, data_dir: Path, *, weights_dir: Path | None,
                   pixel_spacing_um: float | None, source: str) -> dict[str, object]:
    """Frame the images, fit the calibration, store it; a summary for the command line."""
    import numpy as np

    from analysis.classifier import WEIGHTS_DIR, read_calibration
    from analysis.framing import folder_spacing_um, read_framed
    from analysis.reference import reference_logits
    from analysis.review import ReviewModel
    from analysis.site import fit_site, save_site

    weights = weights_dir or WEIGHTS_DIR
    model = ReviewModel.load(weights, read_calibration(weights))
    if model is None:
        raise ValueError(f"{weights} has no review rule to calibrate (calibration.json)")
    spacing = pixel_spacing_um or folder_spacing_um(paths)
    images = np.stack([read_framed(p, model.image_size, spacing) for p in paths])
    _, features = reference_logits(model.reference.model, images, features=True)
    assert features is not None  # asked for
    val_rate = float(model.rule.val_normal_flag_rate)
    site = fit_site(site_id, features, density=model.density,
                    shipped_threshold=model.rule.feature_threshold,
                    val_normal_flag_rate=val_rate, source=source)
    path = save_site(data_dir, site)
    return {"id": site.site_id, "label": site.label, "path": str(path), "cells": site.cells,
            "pixel_spacing_um": round(spacing, 5), "feature_threshold": site.feature_threshold,
            "flag_rate_before": site.flag_rate_before, "flag_rate_after": site.flag_rate_after}
