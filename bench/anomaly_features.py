"""Does the UNet's feature space tell a class the model never saw? (PBC val, a held-out-class model)

The denoising-error scores compared by ``bench/anomaly_complexity.py`` each detect one kind of
novel cell and miss the other. This bench tries another kind of evidence from the same model:
the features of each block of the UNet (global average over space) for the cell noised to a
timestep, under each class condition. Class ``c`` is described by the mean and a covariance
(tied over classes, shrunk towards its diagonal) of the features of its **train** cells under
condition ``c``; a cell's score is the smallest Mahalanobis distance over the classes (Lee et al.,
NeurIPS 2018): how badly even the best class explains the cell, in feature space, normalised per
class. Prints the AUROC (held-out val cells vs known val cells, the cells of the other bench) per
timestep and for the mean over timesteps. Val and train only: nothing here looks at test cells.

    .venv/bin/python bench/anomaly_features.py --weights analysis/weights/loco_monocyte --heldout monocyte

``--aml`` scores aml_dev instead, with the aml_dev neutrophils as a same-lab control, and
``--stain-normalise`` first gives aml_dev PBC's colours (``bench/stain_control.py``): does the
feature score still separate the lab once its stain is gone?
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, required=True, help="folder of a held-out-class model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--heldout", help="the class the model was trained without (val cells)")
    which.add_argument("--aml", type=Path, help="aml_dev folder: score its myeloblasts against PBC "
                       "*test* cells with a model of all classes (the one look after a choice on val)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    p.add_argument("--train-per-class", type=int, default=150, help="train cells per known class for the fit")
    p.add_argument("--per-class", type=int, default=12, help="val cells per known class")
    p.add_argument("--heldout-limit", type=int, default=48, help="val cells of the held-out class")
    p.add_argument("--shrinkage", type=float, default=0.1, help="weight of the diagonal in the covariance")
    p.add_argument("--timesteps", type=int, nargs="+", default=[50, 150, 300],
                   help="timesteps the features are taken at")
    p.add_argument("--stain-normalise", action="store_true",
                   help="with --aml: give aml_dev the colours of the fit's train cells first "
                   "(bench/stain_control.py's Reinhard normalisation)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from analysis.classes import CLASS_NAMES
    from analysis.classifier import DIFFUSION_WEIGHTS
    from analysis.classify import images_to_tensor, load_diffusion
    from analysis.model import build_scheduler
    from analysis.training.evaluate import AML_BLASTS, AML_NEUTROPHILS, load_folder, stratified_rows
    from analysis.training.pbc import load_images, read_split
    from analysis.uncertainty import auroc

    torch.set_num_threads(args.threads)
    unet, model_config, _ = load_diffusion(args.weights / DIFFUSION_WEIGHTS)
    names = model_config.class_names
    if args.aml and len(names) != len(CLASS_NAMES):
        p.error(f"{args.weights} was trained without some classes: --aml needs the full model")
    if args.stain_normalise and not args.aml:
        p.error("--stain-normalise is for --aml (PBC val cells have PBC's colours already)")
    if args.heldout in names:
        p.error(f"{args.weights} was trained on {args.heldout}")
    size, n_classes = model_config.image_size, len(names)
    alphas = build_scheduler(model_config).alphas_cumprod.to(torch.float32)
    # Each block's output (a down block returns it first, with its skip connections), averaged over space.
    blocks = {f"down {i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid"] = unet.mid_block
    blocks.update({f"up {i}": b for i, b in enumerate(unet.up_blocks)})
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def store(_module, _inputs, out) -> None:
            captured[name] = (out[0] if isinstance(out, tuple) else out).float().mean(dim=(2, 3))
        return store

    for name, block in blocks.items():
        block.register_forward_hook(hook(name))

    @torch.no_grad()
    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        """Per block ``(N, len(timesteps), C, D)``: the features of each cell under each class."""
        x0 = images_to_tensor(images)
        generator = torch.Generator("cpu").manual_seed(args.seed)  # the same noise for every set
        out: dict[str, np.ndarray] = {}
        for j, t in enumerate(args.timesteps):
            for s in range(0, len(x0), 64):
                x = x0[s:s + 64]
                noise = torch.randn(x.shape, generator=generator)
                a = alphas[t]
                noisy = (a.sqrt() * x + (1 - a).sqrt() * noise).repeat_interleave(n_classes, dim=0)
                labels = torch.arange(n_classes).repeat(len(x))
                unet(noisy.contiguous(memory_format=torch.channels_last),
                     torch.full((len(noisy),), t), class_labels=labels)
                for name, f in captured.items():
                    if name not in out:
                        out[name] = np.zeros((len(x0), len(args.timesteps), n_classes, f.shape[1]))
                    out[name][s:s + len(x), j] = f.view(len(x), n_classes, -1).numpy()
        return out

    t0 = time.monotonic()
    train = load_images(args.data, stratified_rows(read_split(args.data, "train", names),
                                                   args.train_per_class, args.seed), size)
    split = "test" if args.aml else "val"
    known = load_images(args.data, stratified_rows(read_split(args.data, split, names),
                                                   args.per_class, args.seed), size).images
    novel_name = "myeloblasts" if args.aml else args.heldout
    if args.aml:
        novel = load_folder(args.aml / AML_BLASTS, size)
        same_lab = load_folder(args.aml / AML_NEUTROPHILS, size)
        if args.stain_normalise:
            from stain_control import reinhard  # this folder (bench/) is the script's own

            novel, same_lab = np.split(reinhard(np.concatenate([novel, same_lab]), train.images),
                                       [len(novel)])
    else:
        novel = load_images(args.data, stratified_rows(read_split(args.data, "val", (args.heldout,)),
                                                       args.heldout_limit, args.seed), size).images
    f_train, f_known, f_held = (features(images) for images in (train.images, known, novel))
    # The control: aml_dev neutrophils, normal cells from the blasts' lab and scanner. A score that
    # separates them from PBC as well as the blasts detects the lab, not the blast.
    f_same_lab = features(same_lab) if args.aml else None

    def fit(block: str, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Class means ``(C, D)`` and the shrunk tied precision ``(D, D)`` at timestep index ``j``."""
        own = f_train[block][np.arange(len(train.labels)), j, train.labels]  # each train cell, own class
        means = np.stack([own[train.labels == c].mean(axis=0) for c in range(n_classes)])
        cov = np.cov(own - means[train.labels], rowvar=False)
        cov = (1 - args.shrinkage) * cov + args.shrinkage * np.diag(np.diag(cov))
        return means, np.linalg.inv(cov)

    def min_distance(f: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
        """Smallest Mahalanobis distance over the classes of features ``(N, C, D)``."""
        d = f - means[None]
        return np.sqrt(np.einsum("ncd,de,nce->nc", d, precision, d)).min(axis=1)

    print(f"{len(train.labels)} train cells for the fit, {len(known)} known {split} cells and "
          f"{len(novel)} {novel_name}; {time.monotonic() - t0:.0f} s")
    for block in blocks:
        total_k, total_h = np.zeros(len(known)), np.zeros(len(novel))
        for j, t in enumerate(args.timesteps):
            means, precision = fit(block, j)
            k = min_distance(f_known[block][:, j], means, precision)
            h = min_distance(f_held[block][:, j], means, precision)
            total_k, total_h = total_k + k, total_h + h
            line = f"  AUROC {novel_name} vs known, {block:6s} Mahalanobis at t = {t:3d}  {auroc(h, k):.3f}"
            if f_same_lab is not None:
                n = min_distance(f_same_lab[block][:, j], means, precision)
                line += (f"; aml_dev neutrophils vs known {auroc(n, k):.3f}; "
                         f"myeloblasts vs aml_dev neutrophils {auroc(h, n):.3f}")
            print(line)
        if len(args.timesteps) > 1:
            print(f"  AUROC {novel_name} vs known, {block:6s} mean over the timesteps  "
                  f"{auroc(total_h, total_k):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
