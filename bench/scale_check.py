"""The slide scale check against wrong pixel spacings: BCCD fields made into slides that claim
the true spacing (0.0823 um/px) and wrong ones, each checked as the node's job checks it.

For every set of fields and every claimed spacing, ``cytonode make-slide``'s :func:`make_slide`
writes a small VL Whole Slide Microscopy series whose Pixel Measures claim that spacing (the
pixels are the same BCCD fields every time: the red cells really measure 7.5 um x claim /
0.0823). The slide is opened as a job opens it (:meth:`analysis.tiles.Slide.open`), its white
cells found (:func:`analysis.detect.find_cells`) and :func:`analysis.crops.slide_scale_check`
run on them, as :func:`analysis.pipeline.classify_slide` does. A wrong claim off by more than
:data:`analysis.framing.SCALE_TOLERANCE` should fail, the truth should pass. ``--old`` adds
the check as it was before it measured in native pixels (Hough circles in squares of 40 um at
the CLAIMED spacing, resized to 192 px) for comparison. The bundled sample slide is checked too.

    nice -n 10 .venv/bin/python bench/scale_check.py [--old] [--sets 3] [--fields 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.crops import CropConfig, ScaleCheck, crop_cell, slide_scale_check
from analysis.detect import DEFAULT_FIELD_PIXEL_SPACING_UM as TRUTH_UM
from analysis.detect import DetectedCell, find_cells
from analysis.framing import RED_CELL_DIAMETER_UM, SCALE_TOLERANCE, red_cell_diameter_px
from analysis.tiles import Slide
from analysis.training.labs import SAMPLE_SLIDE_FIELDS, bccd_fields
from dicom_node.app.demo import SAMPLE_SLIDE
from dicom_node.make_slide import make_slide

CLAIMS = (0.06, 0.065, 0.07, TRUTH_UM, 0.095, 0.10, 0.11, 0.16)


def old_scale_check(slide: Slide, cells: list[DetectedCell], max_cells: int = 24, side_um: float = 40.0,
                    side_px: int = 192) -> ScaleCheck:
    """The check before this change: Hough radii as a fraction of a square fixed in claimed um."""
    diameters = []
    step = max(1, len(cells) // max_cells)
    config = CropConfig(output_size=side_px, field_of_view_um=side_um)
    for cell in list(cells)[::step][:max_cells]:
        found = red_cell_diameter_px(crop_cell(slide, cell, config))
        if found is not None:
            diameters.append(found[0] * side_um / side_px)
    if len(diameters) < 3:
        return ScaleCheck(None, len(diameters), None, None)
    median = float(np.median(diameters))
    ratio = median / RED_CELL_DIAMETER_UM
    return ScaleCheck(round(median, 3), len(diameters), round(ratio, 3),
                      abs(ratio - 1.0) <= SCALE_TOLERANCE)


def _fmt(check: ScaleCheck | None) -> str:
    if check is None:
        return f"{'-':>7} {'-':>6} {'-':>5} {'-':>3}"
    d = "-" if check.red_cell_diameter_um is None else f"{check.red_cell_diameter_um:.2f}"
    r = "-" if check.ratio is None else f"{check.ratio:.3f}"
    return f"{d:>7} {r:>6} {check.ok!s:>5} {check.crops_measured:>3}"


def check_slide(files: list[Path], old: bool) -> tuple[int, ScaleCheck, ScaleCheck | None, float]:
    with Slide.open(files) as slide:
        cells = find_cells(slide).cells
        t0 = time.perf_counter()
        new = slide_scale_check(slide, cells)
        seconds = time.perf_counter() - t0
        before = old_scale_check(slide, list(cells)) if old else None
    return len(cells), new, before, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sets", type=int, default=3, help="sets of fields (distinct fields)")
    parser.add_argument("--fields", type=int, default=6, help="fields per set (one slide)")
    parser.add_argument("--claims", type=float, nargs="+", default=list(CLAIMS))
    parser.add_argument("--old", action="store_true", help="also run the check as it was before")
    args = parser.parse_args(argv)
    fields = [f for f in bccd_fields(args.data / "bccd")
              if f.single_cell_label is not None and f.index not in SAMPLE_SLIDE_FIELDS]
    sets = [fields[k * args.fields:(k + 1) * args.fields] for k in range(args.sets)]
    header = f"{'set':<22} {'claim':>6} {'true_d':>6} {'cells':>5} | {'new_d':>7} {'ratio':>6} {'ok':>5} {'n':>3} {'s':>5}"
    if args.old:
        header += f" | {'old_d':>7} {'ratio':>6} {'ok':>5} {'n':>3}"
    header += " | want"
    print(header)
    print("-" * len(header))
    wrong = 0
    with tempfile.TemporaryDirectory(prefix="cytonode-scale-check-") as tmp:
        for s, chunk in enumerate(sets):
            name = "fields " + ",".join(str(f.index) for f in chunk)
            for claim in args.claims:
                out = Path(tmp) / f"set{s}_{claim}"
                # the same glass between fields in native pixels whatever the claim
                files = make_slide([f.image for f in chunk], out, columns=3,
                                   gap_um=16.0 * claim / TRUTH_UM, pixel_spacing_um=claim)
                n, new, before, seconds = check_slide(files, args.old)
                true_d = RED_CELL_DIAMETER_UM * claim / TRUTH_UM
                off = abs(claim / TRUTH_UM - 1.0)
                want = "pass" if off <= SCALE_TOLERANCE - 0.003 else (
                    "fail" if off >= SCALE_TOLERANCE + 0.003 else "either")
                wrong += (want == "pass" and new.ok is not True) or (want == "fail" and new.ok is not False)
                line = f"{name:<22} {claim:>6.4f} {true_d:>6.2f} {n:>5} | {_fmt(new)} {seconds:>5.2f}"
                if args.old:
                    line += f" | {_fmt(before)}"
                print(line + f" | {want}", flush=True)
    n, new, before, seconds = check_slide(sorted(SAMPLE_SLIDE.glob("*.dcm")), args.old)
    line = f"{'sample slide':<22} {TRUTH_UM:>6.4f} {7.5:>6.2f} {n:>5} | {_fmt(new)} {seconds:>5.2f}"
    if args.old:
        line += f" | {_fmt(before)}"
    print(line + " | pass")
    wrong += new.ok is not True
    print(f"\n{wrong} slide(s) where the check disagrees with the truth "
          f"(tolerance {SCALE_TOLERANCE:.0%}; 'either' rows not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
