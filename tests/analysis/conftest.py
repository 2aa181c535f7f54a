"""Real-data fixtures for the slide reader and the white-cell finder, and a tiny diffusion model."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
BCCD = DATA / "bccd" / "BCCD"
HIGHDICOM = DATA / "dicom" / "highdicom_test_files"
SAMPLE_SLIDE = REPO / "dicom_node" / "data" / "sample_slide"
#: BCCD fields of the committed sample slide, in mosaic order (3 columns x 2 rows).
SAMPLE_FIELDS = (0, 8, 9, 10, 15, 20)
#: Where field ``k`` of the sample slide starts: 3 columns of 640 x 480 fields, 194 px of glass
#: between them (``make-slide --gap-um 16`` at 0.0823 um/px).
SAMPLE_GAP_PX = 194


def small_pbc(out: Path, per_class: int) -> Path:
    """A PBC folder (``splits.csv`` and the class folders, linked) with the first ``per_class``
    cells of each class in each split: for commands that read every cell of a split, where the
    test needs their behaviour on real cells, not their speed on 1,700."""
    import csv

    pbc = DATA / "pbc"
    out.mkdir(parents=True)
    kept: dict[tuple[str, str], int] = {}
    with (pbc / "splits.csv").open(newline="") as src, (out / "splits.csv").open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        for row in reader:
            key = (row["split"], row["label"])
            if kept.get(key, 0) < per_class:
                kept[key] = kept.get(key, 0) + 1
                writer.writerow(row)
    for folder in pbc.iterdir():
        if folder.is_dir():
            (out / folder.name).symlink_to(folder, target_is_directory=True)
    return out


def sample_field_origin(k: int) -> tuple[int, int]:
    return (k % 3) * (640 + SAMPLE_GAP_PX), (k // 3) * (480 + SAMPLE_GAP_PX)


def bccd_image(index: int) -> Path:
    return BCCD / "JPEGImages" / f"BloodImage_{index:05d}.jpg"


def bccd_boxes(index: int, name: str = "WBC") -> list[tuple[float, float, float, float]]:
    """Boxes ``(x0, y0, x1, y1)`` labelled ``name`` in a BCCD VOC annotation."""
    root = ET.parse(BCCD / "Annotations" / f"BloodImage_{index:05d}.xml").getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name") == name:
            b = obj.find("bndbox")
            assert b is not None
            boxes.append(tuple(float(b.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes  # type: ignore[return-value]


@pytest.fixture(scope="session")
def bccd() -> Path:
    if not BCCD.is_dir():
        pytest.skip("BCCD data not present (../shared/data/bccd)")
    return BCCD


@pytest.fixture(scope="session")
def highdicom_files() -> Path:
    if not HIGHDICOM.is_dir():
        pytest.skip("highdicom test files not present")
    return HIGHDICOM


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    if not any(SAMPLE_SLIDE.glob("*.dcm")):
        pytest.skip("sample slide not built")
    return SAMPLE_SLIDE


@pytest.fixture(scope="session")
def field_image(bccd: Path):  # type: ignore[no-untyped-def]
    """``field_image(index)``: path of a BCCD field."""
    return bccd_image


@pytest.fixture(scope="session")
def field_boxes(bccd: Path):  # type: ignore[no-untyped-def]
    """``field_boxes(index, name="WBC")``: VOC boxes of a BCCD field."""
    return bccd_boxes


@pytest.fixture(scope="session")
def sample_fields() -> tuple[int, ...]:
    return SAMPLE_FIELDS


def write_tiny_diffusion(folder: Path, config, images: np.ndarray, labels: np.ndarray,  # type: ignore[no-untyped-def]
                         steps: int) -> None:
    """Train a diffusion model of ``config`` ``steps`` steps on ``images`` (seed 0) and write its
    weights as ``folder/cytodiffusion.safetensors``, the way
    :func:`analysis.training.train.export_weights` does."""
    import torch
    from safetensors.torch import save_file

    from analysis.classifier import DIFFUSION_WEIGHTS
    from analysis.classify import images_to_tensor
    from analysis.model import build_scheduler, build_unet

    torch.manual_seed(0)
    g = torch.Generator("cpu").manual_seed(0)
    x0 = images_to_tensor(images)
    y = torch.from_numpy(labels)
    unet = build_unet(config)
    alphas = build_scheduler(config).alphas_cumprod
    opt = torch.optim.Adam(unet.parameters(), lr=5e-3)
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(
            unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, class_labels=y).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()},
              str(folder / DIFFUSION_WEIGHTS),
              metadata={"model_config": config.to_json(), "step": str(steps), "elapsed_s": "1"})


def write_tiny_cnn(folder: Path, class_names: tuple[str, ...], images: np.ndarray,
                   labels: np.ndarray, steps: int) -> None:
    """Train a small CNN (32 px) ``steps`` steps on ``images`` (seed 0) and write it as
    ``folder/baseline_cnn.safetensors``, the way :mod:`analysis.training.baseline_train` does."""
    import torch

    from analysis.baseline import BaselineCNN, BaselineConfig, save_baseline
    from analysis.classifier import BASELINE_WEIGHTS
    from analysis.classify import images_to_tensor

    torch.manual_seed(0)
    x0 = images_to_tensor(images)
    y = torch.from_numpy(labels)
    cnn = BaselineCNN(BaselineConfig(image_size=32, channels=(8, 16), class_names=class_names))
    opt = torch.optim.Adam(cnn.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(cnn(x0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cnn.eval()
    save_baseline(cnn, folder / BASELINE_WEIGHTS, {"steps": str(steps)})
