"""Recall and precision of the white-cell finder on the BCCD fields.

A detection is a true positive when its centre lies in a WBC box of the
field's Pascal VOC annotation; each box is matched by at most one detection
(extra detections in the same box are false positives). Prints one JSON
object with the totals, time per megapixel and the fields with errors.

Usage::

    .venv/bin/python bench/detect_accuracy.py [--bccd ../shared/data/bccd/BCCD]
        [--pixel-spacing-um 0.075] [--errors-out errors.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.detect import (
    DEFAULT_FIELD_PIXEL_SPACING_UM,
    DetectorConfig,
    find_cells_in_image,
)


def wbc_boxes(xml_path: Path) -> list[tuple[float, float, float, float]]:
    """Return the WBC boxes ``(x0, y0, x1, y1)`` of one VOC annotation."""
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if obj.findtext("name") != "WBC":
            continue
        b = obj.find("bndbox")
        assert b is not None
        boxes.append(tuple(float(b.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes  # type: ignore[return-value]


def match(centres: list[tuple[float, float]],
          boxes: list[tuple[float, float, float, float]]) -> tuple[int, int, int]:
    """Greedy one-to-one match; return (true positives, false positives, misses)."""
    used = set()
    tp = 0
    for x, y in centres:
        hit = None
        best = None
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            if k in used or not (x0 <= x <= x1 and y0 <= y <= y1):
                continue
            d = (x - (x0 + x1) / 2) ** 2 + (y - (y0 + y1) / 2) ** 2
            if best is None or d < best:
                hit, best = k, d
        if hit is not None:
            used.add(hit)
            tp += 1
    return tp, len(centres) - tp, len(boxes) - tp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd/BCCD"))
    parser.add_argument("--pixel-spacing-um", type=float, default=DEFAULT_FIELD_PIXEL_SPACING_UM)
    parser.add_argument("--errors-out", type=Path)
    parser.add_argument("--set", default="", help="ImageSets/Main list (train, val, test); all if empty")
    parser.add_argument("--param", action="append", default=[],
                        help="DetectorConfig override NAME=VALUE (tuning)")
    args = parser.parse_args()
    overrides = {k: type(getattr(DetectorConfig(), k))(v)
                 for k, v in (p.split("=", 1) for p in args.param)}
    config = DetectorConfig(**overrides)
    images = sorted((args.bccd / "JPEGImages").glob("*.jpg"))
    if args.set:
        keep = set((args.bccd / "ImageSets" / "Main" / f"{args.set}.txt").read_text().split())
        images = [p for p in images if p.stem in keep]
    tp = fp = fn = 0
    errors = []
    seconds = 0.0
    megapixels = 0.0
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        t0 = time.perf_counter()
        det = find_cells_in_image(rgb, args.pixel_spacing_um, config)
        seconds += time.perf_counter() - t0
        megapixels += rgb.shape[0] * rgb.shape[1] / 1e6
        boxes = wbc_boxes(args.bccd / "Annotations" / f"{path.stem}.xml")
        t, f, n = match([(c.x, c.y) for c in det.cells], boxes)
        tp, fp, fn = tp + t, fp + f, fn + n
        if f or n:
            errors.append({"field": path.stem, "false_positives": f, "misses": n,
                           "boxes": [list(b) for b in boxes],
                           "cells": [[round(c.x), round(c.y), round(c.area_um2, 1)] for c in det.cells]})
    result = {
        "fields": len(images), "wbc_boxes": tp + fn, "detections": tp + fp,
        "true_positives": tp, "false_positives": fp, "misses": fn,
        "recall": round(tp / max(1, tp + fn), 4), "precision": round(tp / max(1, tp + fp), 4),
        "seconds_per_megapixel": round(seconds / megapixels, 4),
        "fields_with_errors": len(errors), "pixel_spacing_um": args.pixel_spacing_um,
        "config": overrides,
    }
    if args.errors_out:
        args.errors_out.write_text(json.dumps(errors, indent=1))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
