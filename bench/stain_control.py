"""Is the anomaly score's aml_dev result the blast or the lab's stain? (both shipped models)

aml_dev comes from another lab and scanner than PBC. This bench scores its 100 myeloblasts and
100 neutrophils twice with both shipped models, as ``cytonode evaluate`` frames them and after a
stain normalisation that takes the lab's colours away (Reinhard et al., 2001: each CIELAB
channel of aml_dev, all 200 cells pooled, no labels used, gets the mean and standard deviation of
PBC train cells), and prints for each: accuracy on the neutrophils (domain shift), the anomaly
AUROC of myeloblasts vs PBC test cells (the issue's metric), of aml_dev neutrophils vs PBC test
(0.5 = the lab is not seen) and of myeloblasts vs aml_dev neutrophils (within one lab). A score
that detects blasts keeps its AUROC after normalisation; one that detects the stain loses it.

    .venv/bin/python bench/stain_control.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reinhard(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Give ``images`` the mean and standard deviation of ``reference`` in each CIELAB channel."""
    from skimage import color

    def lab(x: np.ndarray) -> np.ndarray:
        return np.asarray(color.rgb2lab(x.reshape(-1, 1, 3))).reshape(-1, 3)

    src, ref = lab(images), lab(reference)
    mapped = (src - src.mean(0)) / src.std(0) * ref.std(0) + ref.mean(0)
    rgb = np.asarray(color.lab2rgb(mapped.reshape(-1, 1, 3))).reshape(images.shape)
    return np.asarray(np.clip(rgb * 255 + 0.5, 0, 255), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=ROOT / "analysis" / "weights")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    p.add_argument("--aml", type=Path, default=ROOT.parent / "shared" / "data" / "aml_dev")
    p.add_argument("--per-class", type=int, default=30, help="PBC test cells per class")
    p.add_argument("--reference-per-class", type=int, default=50,
                   help="PBC train cells per class whose colours are the target")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import warnings

    import torch

    from analysis.classes import CLASS_NAMES
    from analysis.classifier import BaselineClassifier, DiffusionClassifier
    from analysis.training.evaluate import AML_BLASTS, AML_NEUTROPHILS, load_folder, stratified_rows
    from analysis.training.pbc import load_images, read_split
    from analysis.uncertainty import auroc

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    diffusion, cnn = DiffusionClassifier(args.weights), BaselineClassifier(args.weights)
    size = diffusion.image_size
    test = load_images(args.data, stratified_rows(read_split(args.data, "test"), args.per_class,
                                                  args.seed), size)
    reference = load_images(args.data, stratified_rows(read_split(args.data, "train"),
                                                       args.reference_per_class, args.seed + 1), size)
    blasts = load_folder(args.aml / AML_BLASTS, size)
    neutrophils = load_folder(args.aml / AML_NEUTROPHILS, size)
    with warnings.catch_warnings():  # a few out-of-gamut pixels are clipped, as they should be
        warnings.simplefilter("ignore", UserWarning)
        normalised = np.split(reinhard(np.concatenate([blasts, neutrophils]), reference.images),
                              [len(blasts)])
    generator = torch.Generator("cpu").manual_seed(args.seed)
    models = {"diffusion": lambda x: diffusion.predict(x, generator), "CNN": cnn.predict}
    pbc = {name: predict(test.images) for name, predict in models.items()}
    neutrophil = CLASS_NAMES.index("neutrophil")
    print(f"{len(test.labels)} PBC test cells, {len(blasts)} myeloblasts, {len(neutrophils)} "
          f"neutrophils; {time.monotonic() - t0:.0f} s", flush=True)
    print("aml_dev colours   model      neutrophil accuracy  blasts vs PBC  neutrophils vs PBC  "
          "blasts vs neutrophils")
    for colours, (b, n) in (("as scanned", (blasts, neutrophils)), ("Reinhard", normalised)):
        for name, predict in models.items():
            pb, pn, pt = predict(b), predict(n), pbc[name]
            print(f"{colours:17s} {name:10s} {np.mean(pn.label == neutrophil):19.3f}  "
                  f"{auroc(pb.anomaly_score, pt.anomaly_score):13.3f}  "
                  f"{auroc(pn.anomaly_score, pt.anomaly_score):18.3f}  "
                  f"{auroc(pb.anomaly_score, pn.anomaly_score):21.3f}", flush=True)
    print(f"{time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
