"""The ``cytonode detect`` sub-command: find white cells on a slide or field image."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: Suffixes read as plain field images rather than DICOM.
FIELD_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: Sides, in pixels, of a field image ``detect`` reads whole: smaller holds no white cell (one is
#: about 150 px across at the default 0.0823 um/px); larger is a slide (``cytonode make-slide``).
FIELD_IMAGE_MIN_SIDE = 32
FIELD_IMAGE_MAX_SIDE = 8192


def add_detect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``detect`` on the ``cytonode`` sub-command parser."""
    p = sub.add_parser("detect", help="find white cells in a WSI DICOM series or a field image")
    p.add_argument("path", type=Path, help="WSI DICOM file, folder of one series, or PNG/JPEG/BMP")
    p.add_argument("--pixel-spacing-um", type=float, default=None,
                   help="um per pixel: required scale of a field image (default 0.0823, BCCD); "
                        "for a WSI used only when it has no Pixel Measures")
    p.add_argument("--json", action="store_true", help="write the cells as one JSON object")
    p.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    """Run ``cytonode detect``; return the exit status."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from analysis.detect import DEFAULT_FIELD_PIXEL_SPACING_UM, find_cells, find_cells_in_image
    from analysis.errors import DatasetError, SlideUnreadableError
    from analysis.framing import check_image_size
    from analysis.tiles import Slide

    path: Path = args.path
    if args.pixel_spacing_um is not None and not args.pixel_spacing_um > 0:
        raise ValueError(f"--pixel-spacing-um must be > 0, got {args.pixel_spacing_um}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        if path.is_file() and path.suffix.lower() in FIELD_IMAGE_SUFFIXES:
            try:  # from the header, before anything is decoded
                check_image_size(path, FIELD_IMAGE_MIN_SIDE, FIELD_IMAGE_MAX_SIDE,
                                 "a field image (convert larger ones with cytonode make-slide)")
            except DatasetError as exc:
                raise SlideUnreadableError(str(exc)) from None
            spacing = args.pixel_spacing_um
            if spacing is None:
                spacing = DEFAULT_FIELD_PIXEL_SPACING_UM
                logger.info("no --pixel-spacing-um; assuming %.3f um/px", spacing)
            try:
                with Image.open(path) as im:
                    rgb = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise SlideUnreadableError(f"{path}: cannot decode image ({exc})") from exc
            detections = find_cells_in_image(rgb, spacing)
        else:
            with Slide.open(path, default_pixel_spacing_um=args.pixel_spacing_um) as slide:
                detections = find_cells(slide)
    except SlideUnreadableError as exc:
        sys.stderr.write(f"cytonode detect: {str(exc).splitlines()[0] if str(exc) else exc}\n")
        return 2
    if args.json:
        json.dump(detections.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"{len(detections.cells)} white cells, {len(detections.platelets)} "
                         f"platelets in {detections.image_size[0]} x {detections.image_size[1]} px "
                         f"at {detections.pixel_spacing_um:.4f} um/px\n")
    return 0
