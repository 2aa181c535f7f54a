"""Which anomaly score tells a class the model never saw? (PBC val, a held-out-class model)

Scores val cells of the known classes and of the held-out class with a leave-one-class-out
model (``cytonode train --exclude-class``), with the budget of its calibration, and prints the
AUROC (held-out vs known) of candidate anomaly scores computed from the same denoising errors:
the shipped per-class z-score (:func:`analysis.classify.anomaly_raw`, the gap to the class that
explains the cell worst) and its raw form; the gap to the runner-up and the mean gap to all
classes; the best class's own error (the score shipped before; reference: the per-timestep
median of the known cells); the uncertainty; the image complexity alone (PNG bits per pixel,
Serra et al., ICLR 2020) and the best class's error after regressing it on complexity (fitted on
the known cells only). Val only: nothing here looks at test cells.

    .venv/bin/python bench/anomaly_complexity.py --weights analysis/weights/loco_erythroblast --heldout erythroblast
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    from analysis.evaluate import stratified_rows
    from analysis.pbc import load_images, read_split
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
    generator = torch.Generator("cpu").manual_seed(args.seed)
    scores: dict[str, dict[str, np.ndarray]] = {}
    log_best: dict[str, np.ndarray] = {}
    bpp: dict[str, np.ndarray] = {}
    for name, data in sets.items():
        s = score_cells(unet, model_config, images_to_tensor(data.images), config, generator)
        pred = diffusion_predictions(s, calibration)
        deltas, best = error_deltas(s.errors, s.error_scale)
        log_best[name] = np.log(s.errors[np.arange(len(best)), best])  # (N, T), NaN: not scored
        bpp[name] = png_bits_per_pixel(data.images)
        scores[name] = {
            "class gap z-score (shipped)": pred.anomaly_score,
            "class gap, raw": anomaly_raw(deltas),
            "minus the gap to the runner-up": -np.sort(deltas, axis=1)[:, 1],
            "minus the mean gap to all classes": -deltas.mean(axis=1),
            "uncertainty (entropy)": pred.uncertainty,
            "complexity alone, simpler = more anomalous": -bpp[name],
        }
    # The earlier score: the best class's log error over the per-timestep median of known cells,
    # and its residual after a linear fit on complexity (both fitted on the known cells).
    reference = np.nanmedian(log_best["known"], axis=0)
    best_error = {name: np.nanmean(log_best[name] - reference, axis=1) for name in sets}
    slope, _ = np.polyfit(bpp["known"], best_error["known"], 1)
    for name in sets:
        scores[name]["best class's error (the earlier score)"] = best_error[name]
        scores[name]["best class's error minus its complexity fit"] = (best_error[name]
                                                                       - slope * bpp[name])
    k, h = scores["known"], scores["heldout"]
    print(f"val cells: {len(bpp['known'])} known, {len(bpp['heldout'])} {args.heldout}; "
          f"budget {config.n_timesteps} timesteps, {config.views} views, [{config.t_min}, "
          f"{config.t_max}); corr(best class's error, bpp) on known = "
          f"{np.corrcoef(best_error['known'], bpp['known'])[0, 1]:.2f}")
    for name in k:
        print(f"  AUROC {args.heldout} vs known, {name:50s} {auroc(h[name], k[name]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
