"""Training augmentations: the ones that buy robustness to stain and scanner."""

from __future__ import annotations

import torch

# RGB -> YIQ; a hue shift is a rotation in the I/Q plane.
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def augment(x: torch.Tensor, generator: torch.Generator, out_size: int) -> torch.Tensor:
    """Randomly rotate, flip, rescale and colour-jitter a batch.

    Parameters
    ----------
    x:
        ``float32`` batch ``(B, 3, S, S)`` in ``[0, 1]`` with ``S >= out_size``.
    generator:
        Source of randomness (CPU).
    out_size:
        Side of the returned images.

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
    # Small free rotation and scale (0.9-1.1) with an affine grid.
    angle = (torch.rand(b, generator=g) - 0.5) * (torch.pi / 6)
    scale = 1.0 + (torch.rand(b, generator=g) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = (torch.rand(b, 2, generator=g) - 0.5) * 0.06
    grid = torch.nn.functional.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter: brightness, contrast, saturation, hue.
    bright = 1.0 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
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
    x = torch.einsum("ij,bjhw->bihw", _YIQ2RGB, yiq)
    return x.clamp(0.0, 1.0)
