"""The discriminative baseline: a small CNN trained on the same split and augmentations.

Every evaluation of the diffusion classifier reports this model beside it. Its
maximum softmax probability is its confidence; ``1 - max softmax`` is both its
uncertainty and its anomaly score.

Train it with ``python -m analysis.baseline --out analysis/weights/baseline_cnn.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from analysis.augment import augment
from analysis.classes import CLASS_NAMES, kept_classes
from analysis.errors import CheckpointError
from analysis.pbc import load_images, read_split

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Architecture of the baseline CNN.

    Parameters
    ----------
    image_size:
        Side of the square RGB input (the same framing as the diffusion model).
    channels:
        Channels of the three convolution stages (each stage: two 3x3 convs, max-pool).
    """

    image_size: int = 48
    channels: tuple[int, ...] = (16, 32, 64)
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError("image_size must be at least 8")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("channels must be a non-empty tuple of positive ints")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BaselineConfig:
        raw = json.loads(text)
        raw["channels"] = tuple(raw["channels"])
        raw["class_names"] = tuple(raw["class_names"])
        return cls(**raw)


class BaselineCNN(torch.nn.Module):
    """Conv-BN-ReLU stages, global average pooling and one linear layer."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[torch.nn.Module] = []
        c_in = 3
        for c in config.channels:
            for _ in range(2):
                layers += [torch.nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                           torch.nn.BatchNorm2d(c), torch.nn.ReLU(inplace=True)]
                c_in = c
            layers.append(torch.nn.MaxPool2d(2))
        self.features = torch.nn.Sequential(*layers)
        self.dropout = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(c_in, len(config.class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of images ``(B, 3, S, S)`` in ``[-1, 1]``."""
        h = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(h))


def save_baseline(model: BaselineCNN, path: Path, extra: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"baseline_config": model.config.to_json(), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_baseline(path: Path) -> BaselineCNN:
    """Load the baseline CNN written by :func:`save_baseline` (eval mode)."""
    if not path.is_file():
        raise CheckpointError(f"baseline weights {path} not found")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if "baseline_config" not in meta:
        raise CheckpointError(f"{path} has no baseline_config metadata")
    model = BaselineCNN(BaselineConfig.from_json(meta["baseline_config"]))
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model


@torch.no_grad()
def predict_baseline(model: BaselineCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities ``(N, n_classes)`` of images ``(N, 3, S, S)`` in ``[-1, 1]``."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(torch.softmax(model(images[i:i + batch_size]), dim=1))
    return torch.cat(out) if out else torch.empty(0, len(model.config.class_names))


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
    p = argparse.ArgumentParser(prog="python -m analysis.baseline", description=__doc__.splitlines()[0])
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
