"""Training of the baseline CNN (:mod:`analysis.baseline`) on the PBC train split.

    python -m analysis.training.baseline_train --out analysis/weights/baseline_cnn.safetensors
    python -m analysis.training.baseline_train --exclude-class monocyte \\
        --out .train/loco_monocyte_cnn/baseline_cnn.safetensors
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
from analysis.baseline import BaselineCNN, BaselineConfig, save_baseline
from analysis.classes import CLASS_NAMES, kept_classes
from analysis.training.pbc import load_images, read_split

log = logging.getLogger(__name__)


def train_baseline(data_dir: Path, out: Path, *, steps: int, batch_size: int = 64,
                   learning_rate: float = 2e-3, seed: int = 0,
                   config: BaselineConfig | None = None) -> dict[str, float]:
    """Train the baseline on the PBC train split with :func:`analysis.augment.augment`.

    Classes are sampled with equal probability (as for the diffusion model); the
    learning rate follows a linear warm-up and a cosine decay.
    """
    config = config or BaselineConfig()
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.manual_seed(seed)
    rows = read_split(data_dir, "train", config.class_names)
    data = load_images(data_dir, rows, config.image_size)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(data.labels)
    counts = np.bincount(data.labels)
    weights = torch.as_tensor(1.0 / counts[data.labels], dtype=torch.float64)
    model = BaselineCNN(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    model.train()
    t0 = time.monotonic()
    loss_avg = math.nan
    warmup = max(1, steps // 20)
    for step in range(steps):
        lr = learning_rate * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimiser.param_groups:
            group["lr"] = lr
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        x = images[idx].float().div_(255.0)
        x = augment(x, generator, config.image_size).mul_(2.0).sub_(1.0)
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        value = float(loss.detach())
        loss_avg = value if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * value
        if (step + 1) % 100 == 0:
            rate = (step + 1) / (time.monotonic() - t0)
            log.info("baseline step %d/%d loss %.4f  %.2f steps/s  ETA %.0f s", step + 1, steps,
                     loss_avg, rate, (steps - step - 1) / rate)
    elapsed = time.monotonic() - t0
    model.eval()
    save_baseline(model, out, {"steps": str(steps), "elapsed_s": f"{elapsed:.0f}",
                               "batch_size": str(batch_size), "seed": str(seed)})
    return {"steps": float(steps), "elapsed_s": elapsed, "loss": loss_avg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.training.baseline_train", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/pbc"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-class", action="append", default=[], choices=CLASS_NAMES,
                   metavar="CLASS", help="train without this class (leave-one-class-out; repeatable)")
    args = p.parse_args(argv)
    try:
        kept = kept_classes(args.exclude_class)
    except ValueError as exc:
        p.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    torch.set_num_threads(args.threads)
    summary = train_baseline(args.data, args.out, steps=args.steps, batch_size=args.batch_size,
                             learning_rate=args.lr, seed=args.seed,
                             config=BaselineConfig(class_names=kept))
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
