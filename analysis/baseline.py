"""The discriminative baseline: a small CNN trained on the same split and augmentations.

Every evaluation of the diffusion classifier reports this model beside it. Its
maximum softmax probability is its confidence; ``1 - max softmax`` is both its
uncertainty and its anomaly score. This module holds what ``cytonode classify --model cnn``
runs (the architecture, loading and prediction); its training is
:mod:`analysis.training.baseline_train`
(``python -m analysis.training.baseline_train --out analysis/weights/baseline_cnn.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.classes import CLASS_NAMES
from analysis.errors import CheckpointError


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
