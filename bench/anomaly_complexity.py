"""Which anomaly score tells a class the model never saw? (PBC val, a held-out-class model)

Scores val cells of the known classes and of the held-out class with a leave-one-class-out
model (``cytonode train --exclude-class``), with the budget of its calibration, and prints the
AUROC (held-out vs known) of candidate anomaly scores computed from the same denoising errors:
the shipped per-class z-score of the best class's error (:func:`analysis.classify.anomaly_raw`),
its raw form, and the raw form centred per class without scaling; the raw score after regressing
it on the image's complexity (PNG bits per pixel, Serra et al., ICLR 2020; fitted on the known
cells only) and the complexity alone; the same with the model's own complexity measure, the best
class's error on small timesteps (``--low-t``, t < 125, where the error carries little class
information); the two-sided per-class z-score (a cell atypical for its class either way); the
uncertainty; scores of how much better the best class explains the cell than the others (minus
its gap to the class that explains it worst, the "class gap"; to the runner-up; the mean gap);
and the shipped z-score plus the class gap. Val only: nothing here looks at test cells.

    .venv/bin/python bench/anomaly_complexity.py --weights analysis/weights/loco_erythroblast --heldout erythroblast
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: Parts of the timestep grid the raw score is also computed on (is the complexity confound
#: a small-timestep effect?).
TIMESTEP_RANGES = ((0, 125), (125, 250), (250, 500), (125, 500))


def png_bits_per_pixel(images: np.ndarray) -> np.ndarray:
    """Lossless PNG size of each ``uint8`` image in bits per pixel (a complexity measure)."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=True)
        out.append(8 * len(buffer.getvalue()) / (image.shape[0] * image.shape[1]))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, required=True, help="folder of a held-out-class model")
    p.add_argument("--heldout", required=True, help="the class the model was trained without")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    p.add_argument("--per-class", type=int, default=12, help="val cells per known class")
    p.add_argument("--heldout-limit", type=int, default=48, help="val cells of the held-out class")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--arrays-out", type=Path, help="write every candidate score of every cell here (.npz)")
    p.add_argument("--low-t", type=int, default=8,
                   help="timesteps of [0, 125) for the model's own complexity measure (0: skip)")
    args = p.parse_args(argv)

    import torch

    from analysis.classifier import DIFFUSION_WEIGHTS, diffusion_predictions, read_calibration
    from analysis.classify import (
        ClassifierConfig,
        anomaly_raw,
        error_deltas,
        images_to_tensor,
        load_diffusion,
        score_cells,
    )
    from analysis.training.evaluate import stratified_rows
    from analysis.training.pbc import load_images, read_split
    from analysis.uncertainty import auroc

    torch.set_num_threads(args.threads)
    calibration = read_calibration(args.weights)
    config = ClassifierConfig.from_calibration(dict(calibration["classifier_config"]))  # type: ignore[call-overload]
    unet, model_config, _ = load_diffusion(args.weights / DIFFUSION_WEIGHTS)
    if args.heldout in model_config.class_names:
        p.error(f"{args.weights} was trained on {args.heldout}")
    size = model_config.image_size
    sets = {
        "known": load_images(args.data, stratified_rows(
            read_split(args.data, "val", model_config.class_names), args.per_class, args.seed), size),
        "heldout": load_images(args.data, stratified_rows(
            read_split(args.data, "val", (args.heldout,)), args.heldout_limit, args.seed), size),
    }
    reference = np.asarray(calibration["anomaly_reference"], dtype=np.float64)
    class_mean = np.asarray(calibration["anomaly_class_mean"], dtype=np.float64)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    scores: dict[str, dict[str, np.ndarray]] = {}
    bpp: dict[str, np.ndarray] = {}
    low: dict[str, np.ndarray] = {}
    low_config = dataclasses.replace(config, t_min=0, t_max=125, n_timesteps=max(args.low_t, 2))
    low_generator = torch.Generator("cpu").manual_seed(args.seed + 1)  # the main scores stay as before
    by_range: dict[str, dict[tuple[int, int], np.ndarray]] = {name: {} for name in sets}
    for name, data in sets.items():
        s = score_cells(unet, model_config, images_to_tensor(data.images), config, generator)
        pred = diffusion_predictions(s, calibration)
        deltas, best = error_deltas(s.errors, s.error_scale)
        bpp[name] = png_bits_per_pixel(data.images)
        if args.low_t:
            # Every class on the small timesteps (the same views); the predicted class's mean log error.
            e_low = score_cells(unet, model_config, images_to_tensor(data.images), low_config,
                                low_generator, adaptive=False).errors
            low[name] = np.log(e_low[np.arange(len(best)), best]).mean(axis=1)
        raw_score = anomaly_raw(s.errors, best, reference)
        scores[name] = {
            "best class's error, z-score (shipped)": pred.anomaly_score,
            "best class's error, raw": raw_score,
            "best class's error, centred per class (not scaled)": raw_score - class_mean[best],
            "complexity alone, simpler = more anomalous": -bpp[name],
            "two-sided z-score |z| (atypical either way)": np.abs(pred.anomaly_score),
            "uncertainty (entropy)": pred.uncertainty,
            "class gap: minus the gap to the worst class": -deltas.max(axis=1),
            "minus the gap to the runner-up": -np.sort(deltas, axis=1)[:, 1],
            "minus the mean gap to all classes": -deltas.mean(axis=1),
        }
        # The raw score on one part of the timestep grid only (NaN where that part was not reached).
        for lo, hi in TIMESTEP_RANGES:
            part = s.errors.copy()
            part[:, :, (s.timesteps < lo) | (s.timesteps >= hi)] = np.nan
            with warnings.catch_warnings():  # a cell that never reached this part: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                by_range[name][(lo, hi)] = anomaly_raw(part, best, reference)
    k, h = scores["known"], scores["heldout"]
    raw = "best class's error, raw"
    slope, intercept = np.polyfit(bpp["known"], k[raw], 1)
    for name in sets:
        scores[name]["best class's error minus its complexity fit"] = (scores[name][raw]
                                                                       - slope * bpp[name])
    if args.low_t:
        low_slope, _ = np.polyfit(low["known"], k[raw], 1)
        for name in sets:
            scores[name]["small-t error alone, simpler = more anomalous"] = -low[name]
            scores[name]["best class's error minus its small-t fit"] = (scores[name][raw]
                                                                       - low_slope * low[name])
    # Both kinds of evidence at once: the shipped z-score and the class gap, each standardised on
    # the known cells, summed.
    gap, shipped = "class gap: minus the gap to the worst class", "best class's error, z-score (shipped)"
    for name in sets:
        scores[name]["shipped z + class gap (standardised on known)"] = sum(
            (scores[name][c] - k[c].mean()) / k[c].std() for c in (shipped, gap))
    if args.arrays_out:
        np.savez(args.arrays_out, **{f"{name}|{c}": v for name in sets for c, v in scores[name].items()})
    print(f"val cells: {len(bpp['known'])} known, {len(bpp['heldout'])} {args.heldout}; "
          f"budget {config.n_timesteps} timesteps, {config.views} views, [{config.t_min}, "
          f"{config.t_max}); corr(raw, bpp) on known = {np.corrcoef(k[raw], bpp['known'])[0, 1]:.2f}; "
          f"fit raw = {intercept:.3f} + {slope:.4f} * bpp")
    for name in k:
        print(f"  AUROC {args.heldout} vs known, {name:50s} {auroc(h[name], k[name]):.3f}")
    for lo, hi in TIMESTEP_RANGES:
        kr, hr = by_range["known"][(lo, hi)], by_range["heldout"][(lo, hi)]
        kr, hr = kr[np.isfinite(kr)], hr[np.isfinite(hr)]
        label = f"raw score on {lo} <= t < {hi} ({len(kr)}+{len(hr)} cells)"
        print(f"  AUROC {args.heldout} vs known, {label:50s} {auroc(hr, kr):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
