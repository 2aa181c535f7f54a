"""Training augmentations: the ones that buy robustness to stain, scanner and focus.

Geometry (dihedral views, small rotation, scale +-15 %: the red-cell scale check lets
a spacing be off by about that much) and the colour and optics shifts computational
pathology uses between labs: HED stain jitter (Tellez et al. 2019: each stain's
optical density scaled and shifted), brightness, contrast, saturation, hue, a per-channel
white balance (grey-green or pink backgrounds), Gaussian blur (focus) and sensor noise.
"""

from __future__ import annotations

import torch

# RGB -> YIQ; a hue shift is a rotation in the I/Q plane.
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
# Haematoxylin, eosin, DAB optical densities (Ruifrok and Johnston 2001; skimage's rgb_from_hed).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def _u(b: int, g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(b, *shape, generator=g)


#: The ``strong`` ranges: wide enough for pale, low-contrast, blurred, grey-green smears.
STRONG = {"contrast": (0.5, 1.3), "hue": 0.5, "saturation": (0.5, 1.5), "blur": (0.3, 2.0),
          "grey": 0.1}


def stain_augment(x: torch.Tensor, generator: torch.Generator, *,
                  strong: bool = False) -> torch.Tensor:
    """HED jitter, white balance, blur and noise on a ``(B, 3, S, S)`` batch in ``[0, 1]``
    (``strong``: blur up to 2 px and a tenth of the batch in grey)."""
    b, g = x.shape[0], generator
    # HED: optical density -> stain concentrations, scale and shift each, back.
    od = -torch.log(x.clamp(min=1e-3))
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB)
    alpha = _u(b, g, 0.7, 1.3, 3, 1, 1)
    beta = _u(b, g, -0.06, 0.06, 3, 1, 1)
    hed = hed * alpha + beta
    x = torch.exp(-torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED)).clamp(0.0, 1.0)
    # White balance: one gain per channel.
    x = x * _u(b, g, 0.88, 1.12, 3, 1, 1)
    # Focus: Gaussian blur on half the batch (one sigma a batch, 0.3-1.0 output pixels).
    blur = torch.rand(b, generator=g) < 0.5
    if bool(blur.any()):
        low, high = STRONG["blur"] if strong else (0.3, 1.0)
        sigma = float(_u(1, g, low, high))
        radius = max(1, round(2.5 * sigma))
        k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        sub = x[blur]
        c = sub.shape[1]
        sub = torch.nn.functional.pad(sub, (radius, radius, radius, radius), mode="reflect")
        sub = torch.nn.functional.conv2d(sub, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        sub = torch.nn.functional.conv2d(sub, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
        x = x.clone()
        x[blur] = sub
    if strong:
        grey = (torch.rand(b, 1, 1, 1, generator=g) < STRONG["grey"]).float()
        y = torch.einsum("c,bchw->bhw", _RGB2YIQ[0], x)[:, None]
        x = grey * y.expand_as(x) + (1 - grey) * x
    # Sensor noise.
    x = x + torch.randn(x.shape, generator=g) * _u(b, g, 0.0, 0.025, 1, 1, 1)
    return x.clamp(0.0, 1.0)


#: Largest move of the cell off the centre in training by default, a fraction of half the frame
#: (about 0.4 um at a 26 um field of view).
DEFAULT_SHIFT = 0.03


def augment(x: torch.Tensor, generator: torch.Generator, out_size: int,
            *, stain: bool = True, strong: bool = False,
            shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """Randomly rotate, flip, rescale and colour-jitter a batch (and, with ``stain``, the
    stain, white balance, focus and noise shifts of :func:`stain_augment`; ``strong`` widens
    contrast, hue, saturation and blur to :data:`STRONG`).

    Parameters
    ----------
    x:
        ``float32`` batch ``(B, 3, S, S)`` in ``[0, 1]`` with ``S >= out_size``.
    generator:
        Source of randomness (CPU).
    out_size:
        Side of the returned images.
    shift:
        Largest move of the cell off the centre along each axis, a fraction of half the
        frame (0.03: about 0.4 um at a 26 um field of view). A detector's centre is not an
        annotator's: on BCCD val fields it lies 0.7 um off (median), 1.8 um (90th percentile).

    Returns
    -------
    torch.Tensor
        ``(B, 3, out_size, out_size)`` in ``[0, 1]``.
    """
    b = x.shape[0]
    g = generator
    # Dihedral group: 90 degree rotations and flips (cells have no orientation).
    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.rand(1, generator=g) < 0.5):
        x = torch.flip(x, dims=(3,))
    # Small free rotation and scale (0.85-1.15 with stain, else 0.9-1.1) with an affine grid.
    angle = (torch.rand(b, generator=g) - 0.5) * (torch.pi / 6)
    scale = 1.0 + (torch.rand(b, generator=g) - 0.5) * (0.3 if stain else 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = (torch.rand(b, 2, generator=g) - 0.5) * (2.0 * shift)
    grid = torch.nn.functional.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter: brightness, contrast, saturation, hue.
    bright = 1.0 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
    if strong:
        contrast = _u(b, g, *STRONG["contrast"], 1, 1, 1)
        sat = _u(b, g, *STRONG["saturation"], 1, 1)
        hue = (torch.rand(b, generator=g) - 0.5) * 2 * STRONG["hue"]  # radians
    else:
        contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
        sat = 1.0 + (torch.rand(b, 1, 1, generator=g) - 0.5) * 0.4
        hue = (torch.rand(b, generator=g) - 0.5) * 0.2  # radians
    x = x * bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    yiq = torch.einsum("ij,bjhw->bihw", _RGB2YIQ, x)
    c, s = torch.cos(hue) , torch.sin(hue)
    i_, q_ = yiq[:, 1], yiq[:, 2]
    i2 = (c[:, None, None] * i_ - s[:, None, None] * q_) * sat
    q2 = (s[:, None, None] * i_ + c[:, None, None] * q_) * sat
    yiq = torch.stack([yiq[:, 0], i2, q2], dim=1)
    x = torch.einsum("ij,bjhw->bihw", _YIQ2RGB, yiq).clamp(0.0, 1.0)
    return stain_augment(x, g, strong=strong) if stain else x
