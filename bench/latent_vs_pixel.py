"""Pixel or latent space? The measurement issue 4 asks for ("choose by measurement").

Trains two class-conditional diffusion models from scratch with the same UNet configuration, the same
training settings and the same number of steps, side by side (one CPU thread each, so they share the
machine's noise), and scores the same PBC val cells with both:

* ``pixel``: the shipped design, 48x48 RGB pixels, trained by ``cytonode train``'s own code.
* ``latent``: a small diffusers ``AutoencoderKL`` (3 levels, 4 latent channels, a factor of 4) is first
  trained on the train split at 96x96 (twice the pixel model's resolution, the same augmentations, MSE
  plus a small KL term); the UNet then denoises its scaled latents, 24x24x4, of the augmented images
  encoded on the fly. Its UNet costs about a quarter of the pixel UNet per evaluation; the encoder is
  paid once per cell.

``--arm pixel64 --threads 2`` trains a third arm on its own: the pixel design at 64x64 (does resolution
help at the same number of steps?); ``--report`` adds it to the table.

Scoring: every class on every timestep of a grid of ``--timesteps`` over [0, 500) (exhaustive, one
view, noise drawn from the same seed), log errors; balanced accuracy over the whole grid and
over its timesteps >= 125 (the shipped grid's range). Also: wall time of each arm's training (the
autoencoder's included), the autoencoder's reconstruction PSNR on the scored cells, and UNet
evaluations per second while scoring.

    .venv/bin/python bench/latent_vs_pixel.py --steps 2000
    .venv/bin/python bench/latent_vs_pixel.py --steps 2000 --arm pixel64 --threads 2

Each arm writes ``OUT/ARM.json`` and its EMA weights (``OUT/ARM/``); ``--report`` prints the table
again from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("pixel", "latent")  # run side by side by default
#: The pixel arms and their side: the shipped 48, and 64 for the question whether resolution helps.
PIXEL_SIZES = {"pixel": 48, "pixel64": 64}
#: Every arm, in the report's column order, with its column heading.
HEADINGS = {"pixel": "pixel 48x48x3", "latent": "latent 24x24x4 (96 px)", "pixel64": "pixel 64x64x3"}
LATENT_INPUT = 96  # the autoencoder's input side; latents are a quarter of it


def build_autoencoder():  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    # 0.64 s per training step of 16 images at 96 px on one core of this CPU; without the
    # mid-block attention (0.87 s with it).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=LATENT_INPUT, mid_block_add_attention=False,
    )


def train_autoencoder(ae, images, labels, steps: int, generator, log: logging.Logger):  # type: ignore[no-untyped-def]
    """MSE reconstruction of augmented train images plus a KL term of weight 1e-6 (as Stable Diffusion's)."""
    import torch

    from analysis.augment import augment
    from analysis.training.train import class_balanced_weights, format_duration

    optimiser = torch.optim.AdamW(ae.parameters(), lr=1e-3)
    weights = class_balanced_weights(labels)
    t0 = time.monotonic()
    for step in range(steps):
        idx = torch.multinomial(weights, 16, replacement=True, generator=generator)
        x = augment(images[idx].float().div_(255.0), generator, LATENT_INPUT).mul_(2.0).sub_(1.0)
        posterior = ae.encode(x).latent_dist
        recon = ae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if (step + 1) % 100 == 0:
            rate = (step + 1) / (time.monotonic() - t0)
            log.info("autoencoder step %d/%d loss %.4f ETA %s", step + 1, steps, float(loss.detach()),
                     format_duration((steps - step - 1) / rate))
    ae.eval().requires_grad_(False)


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, object]:
    import torch

    from analysis.augment import augment
    from analysis.classify import (
        ClassifierConfig,
        error_deltas,
        images_to_tensor,
        load_diffusion,
        score_cells,
    )
    from analysis.model import (
        ModelConfig,
        build_scheduler,
        build_unet,
        count_parameters,
        optimisation_step,
    )
    from analysis.training.evaluate import stratified_rows
    from analysis.training.pbc import load_images, read_split
    from analysis.training.train import (
        TrainConfig,
        class_balanced_weights,
        export_weights,
        format_duration,
        train_diffusion,
    )
    from analysis.uncertainty import balanced_accuracy

    torch.set_num_threads(args.threads)
    log = logging.getLogger(arm)
    out = args.out / arm
    train = TrainConfig(data_dir=args.data, out_dir=out, steps=args.steps, threads=args.threads,
                        t_max=500)
    val_rows = stratified_rows(read_split(args.data, "val"), args.per_class, seed=0)
    result: dict[str, object] = {"arm": arm, "steps": args.steps, "threads": args.threads}
    t0 = time.monotonic()
    if arm in PIXEL_SIZES:
        config = ModelConfig(image_size=PIXEL_SIZES[arm])
        train_diffusion(train, config)
        result["train_s"] = time.monotonic() - t0
        export_weights(out, out / "weights.safetensors")
        unet, config, _ = load_diffusion(out / "weights.safetensors")
        val = load_images(args.data, val_rows, config.image_size)
        x_val = images_to_tensor(val.images)
        encode_s = 0.0
    else:
        generator = torch.Generator("cpu").manual_seed(train.seed)
        rows = read_split(args.data, "train")
        data = load_images(args.data, rows, LATENT_INPUT, progress=True)
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(data.labels)
        ae = build_autoencoder()
        train_autoencoder(ae, images, data.labels, args.ae_steps, generator, log)
        result["autoencoder_s"] = time.monotonic() - t0
        result["autoencoder_parameters"] = count_parameters(ae)

        def encode(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([ae.encode(x[s:s + 64]).latent_dist.mode() for s in range(0, len(x), 64)])

        # Unit variance latents (Stable Diffusion's scaling factor), from 512 train images as they are.
        sample = images[torch.randperm(len(images), generator=generator)[:512]].float().div(127.5).sub(1.0)
        scale = float(1.0 / encode(sample).std())
        result["latent_scale"] = scale
        config = ModelConfig(image_size=LATENT_INPUT // 4, in_channels=4)
        model, ema = build_unet(config), build_unet(config)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        optimiser = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=0.0)
        alphas = build_scheduler(config).alphas_cumprod
        weights = class_balanced_weights(data.labels)
        log.info("latent UNet: %d parameters", count_parameters(model))
        t1 = time.monotonic()
        loss_avg = math.nan
        for step in range(args.steps):
            idx = torch.multinomial(weights, train.batch_size, replacement=True, generator=generator)
            x = augment(images[idx].float().div_(255.0), generator, LATENT_INPUT).mul_(2.0).sub_(1.0)
            value = optimisation_step(model, ema, optimiser, alphas, encode(x) * scale, labels[idx], generator,
                                      step=step, train=train, t_high=500)
            loss_avg = value if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * value
            if (step + 1) % 50 == 0:
                rate = (step + 1) / (time.monotonic() - t1)
                log.info("step %d/%d loss %.4f  %.2f steps/s  ETA %s", step + 1, args.steps, loss_avg, rate,
                         format_duration((args.steps - step - 1) / rate))
        result["train_s"] = time.monotonic() - t0
        result["loss"] = loss_avg
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"unet": ema.state_dict(), "autoencoder": ae.state_dict(), "scale": scale,
                    "model_config": config.to_json()}, out / "weights.pt")
        unet = ema.eval()  # gradients off since it was built
        val = load_images(args.data, val_rows, LATENT_INPUT)
        pixels = images_to_tensor(val.images)
        t2 = time.monotonic()
        z = encode(pixels)
        encode_s = time.monotonic() - t2
        with torch.no_grad():
            recon = torch.cat([ae.decode(z[s:s + 64]).sample for s in range(0, len(z), 64)]).clamp(-1, 1)
        mse = ((recon - pixels) / 2).pow(2).mean(dim=(1, 2, 3))
        result["autoencoder_psnr_db"] = float((10 * torch.log10(1.0 / mse)).mean())
        x_val = z * scale

    result["unet_parameters"] = count_parameters(unet)
    classifier = ClassifierConfig(n_timesteps=args.timesteps, t_min=0, t_max=500, views=1, cell_batch=16)
    t3 = time.monotonic()
    scores = score_cells(unet, config, x_val, classifier, torch.Generator("cpu").manual_seed(7), adaptive=False)
    score_s = time.monotonic() - t3
    result["unet_evals_per_s"] = float(scores.unet_evals.sum() / score_s)
    result["cells_per_s_scoring"] = len(val_rows) / (score_s + encode_s)
    n_classes = len(config.class_names)
    for name, keep in (("all", slice(None)), ("t_ge_125", scores.timesteps >= 125)):
        _, best = error_deltas(scores.errors[:, :, keep], "log")
        result[f"balanced_accuracy_{name}"] = balanced_accuracy(val.labels, best, n_classes)
    result["val_cells"] = len(val_rows)
    (args.out / f"{arm}.json").write_text(json.dumps(result, indent=1))
    log.info("%s", result)
    return result


def report(out: Path) -> None:
    arms = [arm for arm in HEADINGS if (out / f"{arm}.json").is_file()]
    rows = [json.loads((out / f"{arm}.json").read_text()) for arm in arms]
    fields = [("threads", "CPU threads (the default run: both arms at once, one each)", "{}"),
              ("train_s", "training wall time, s (latent: autoencoder included)", "{:.0f}"),
              ("autoencoder_s", "of which the autoencoder, s", "{:.0f}"),
              ("autoencoder_psnr_db", "autoencoder reconstruction PSNR on the val cells, dB", "{:.1f}"),
              ("unet_parameters", "UNet parameters", "{:,}"),
              ("unet_evals_per_s", "UNet evaluations per second while scoring", "{:.1f}"),
              ("cells_per_s_scoring", "cells per second, exhaustive scoring (encoder included)", "{:.3f}"),
              ("balanced_accuracy_all", "val balanced accuracy, grid [0, 500)", "{:.3f}"),
              ("balanced_accuracy_t_ge_125", "val balanced accuracy, grid timesteps >= 125", "{:.3f}")]
    print(f"| {rows[0]['steps']} UNet steps each, {rows[0]['val_cells']} val cells | "
          + " | ".join(HEADINGS[a] for a in arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for key, label, fmt in fields:
        cells = [fmt.format(r[key]) if key in r else "-" for r in rows]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "latent_vs_pixel")
    parser.add_argument("--steps", type=int, default=2000, help="UNet training steps of each arm")
    parser.add_argument("--ae-steps", type=int, default=1500, help="autoencoder training steps (batch 16)")
    parser.add_argument("--per-class", type=int, default=20, help="val cells of each class scored")
    parser.add_argument("--timesteps", type=int, default=20, help="grid of the exhaustive scoring")
    parser.add_argument("--arm", choices=tuple(HEADINGS),
                        help="run one arm in this process (the default runs pixel and latent side by side)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each arm")
    parser.add_argument("--report", action="store_true", help="print the table of an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.report:
        report(args.out)
        return 0
    if args.arm:
        run_arm(args.arm, args)
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} is not empty: remove it or pass another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("arm", "report")]
    procs = [subprocess.Popen([sys.executable, __file__, "--arm", arm, *forwarded]) for arm in ARMS]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"an arm failed: exit codes {dict(zip(ARMS, codes))}", file=sys.stderr)
        return 1
    report(args.out)
    print(f"\n{time.monotonic() - t0:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
