"""The ``cytonode make-slide`` sub-command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_make_slide(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``make-slide`` on the ``cytonode`` sub-command parser."""
    p = sub.add_parser("make-slide",
                       help="build a VL Whole Slide Microscopy series from field images "
                            "or convert a vendor slide file")
    p.add_argument("images", type=Path, nargs="+",
                   help="field images (PNG/JPEG/BMP), or one vendor slide (SVS, NDPI, MRXS, TIFF)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--columns", type=int, help="mosaic columns (fields)")
    p.add_argument("--rows", type=int, help="mosaic rows (fields)")
    p.add_argument("--repeat", type=int, default=1, help="use the image list this many times")
    p.add_argument("--pixel-spacing-um", type=float,
                   help="um per pixel of the fields (default 0.0823, BCCD, by its red cells) or "
                        "override for a vendor file")
    p.add_argument("--gap-um", type=float, default=0.0,
                   help="empty glass between fields in um (0: fields touch; 16 keeps every "
                        "cell's crop inside its own field)")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--patient-id", default="BCCD-0001")
    p.add_argument("--patient-name", default="BCCD^Anonymous")
    p.add_argument("--slide-id", default="CYTO-BCCD-0001", help="container identifier and barcode")
    p.set_defaults(func=run_make_slide)


def run_make_slide(args: argparse.Namespace) -> int:
    """Run ``cytonode make-slide``; print the written files as JSON; return the exit status."""
    from dicom_node.make_slide import (
        BCCD_PIXEL_SPACING_UM,
        FIELD_IMAGE_SUFFIXES,
        SlideDescription,
        convert_slide,
        make_slide,
    )

    description = SlideDescription(patient_id=args.patient_id, patient_name=args.patient_name,
                                   slide_identifier=args.slide_id)
    images: list[Path] = args.images
    fields = [p for p in images if p.suffix.lower() in FIELD_IMAGE_SUFFIXES]
    if fields and len(fields) != len(images):
        raise ValueError("give either field images or one vendor slide file, not both")
    if not fields:
        if len(images) != 1:
            raise ValueError("a vendor slide is converted one file at a time")
        files = convert_slide(images[0], args.out, description=description,
                              pixel_spacing_um=args.pixel_spacing_um)
    else:
        files = make_slide(fields, args.out, columns=args.columns, rows=args.rows,
                           repeat=args.repeat,
                           pixel_spacing_um=args.pixel_spacing_um or BCCD_PIXEL_SPACING_UM,
                           tile_size=args.tile_size, jpeg_quality=args.jpeg_quality,
                           description=description, gap_um=args.gap_um)
    json.dump({"files": [str(f) for f in files]}, sys.stdout)
    sys.stdout.write("\n")
    return 0
