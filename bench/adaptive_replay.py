"""Replay the adaptive classifier's pruning rules offline on exhaustive errors (PBC val).

Step 1 scores val cells exhaustively (every class on every grid timestep) and keeps the errors;
step 2 replays the adaptive procedure of ``analysis.classify.score_cells`` on them for several
settings (error scale, round size, minimum samples, alpha) without another UNet call, and prints
balanced accuracy and UNet evaluations per cell. This is how ``error_scale="log"`` and
``alpha=0.1`` were chosen (on val only; test is for ``cytonode evaluate``).

    .venv/bin/python bench/adaptive_replay.py --weights W.safetensors --errors val.npz [--per-class 12]
    .venv/bin/python bench/adaptive_replay.py --errors val.npz --replay-t-min 125   (reuse the errors)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = [(scale, rs, ms, a) for scale in ("linear", "log")
            for rs, ms, a in ((2, 4, 0.01), (2, 4, 0.05), (4, 4, 0.05), (2, 4, 0.1), (4, 4, 0.1),
                              (1, 3, 0.1), (2, 4, 0.2))]


def collect(weights: Path, data: Path, per_class: int, out: Path, threads: int) -> None:
    import torch

    from analysis.classify import ClassifierConfig, images_to_tensor, load_diffusion, score_cells
    from analysis.training.evaluate import stratified_rows
    from analysis.training.pbc import load_images, read_split

    torch.set_num_threads(threads)
    unet, model_config, meta = load_diffusion(weights)
    rows = stratified_rows(read_split(data, "val"), per_class, seed=1)
    cells = load_images(data, rows, model_config.image_size)
    # The whole range the model trained on, the cell as it is (the settings the card's rows used).
    config = ClassifierConfig(n_timesteps=32, t_min=0, views=1)
    generator = torch.Generator().manual_seed(0)
    x = images_to_tensor(cells.images)
    parts, start = [], time.monotonic()
    for s in range(0, len(x), 8):
        scores = score_cells(unet, model_config, x[s:s + 8], config, generator, adaptive=False)
        parts.append(scores.errors)
        print(f"scored {min(len(x), s + 8)}/{len(x)} val cells in {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)
    np.savez(out, errors=np.concatenate(parts), labels=cells.labels, step=meta.get("step", ""),
             timesteps=scores.timesteps)


def replay(errors: np.ndarray, labels: np.ndarray, scale: str, round_size: int, min_samples: int,
           alpha: float, seed: int = 0) -> tuple[float, float]:
    """Balanced accuracy and mean UNet evaluations per cell of one setting."""
    e_all = np.log(errors) if scale == "log" else errors
    n, c, t = e_all.shape
    rng = np.random.default_rng(seed)
    pred, evals = np.zeros(n, dtype=int), np.zeros(n)
    for i in range(n):
        order = rng.permutation(t)
        active, done = np.ones(c, bool), 0
        while True:
            last = min(t, done + round_size)
            evals[i] += active.sum() * (last - done)
            done = last
            act = np.flatnonzero(active)
            e = e_all[i][act][:, order[:done]]
            best = int(np.argmin(e.mean(1)))
            if done >= min_samples and len(act) > 1:
                diff = e - e[best]
                t_stat = diff.mean(1) / (diff.std(1, ddof=1) / math.sqrt(done) + 1e-12)
                drop = (t_stat > stats.t.ppf(1 - alpha, done - 1)) & (np.arange(len(act)) != best)
                active[act[drop]] = False
            if active.sum() == 1 or done >= t:
                act = np.flatnonzero(active)
                pred[i] = act[np.argmin(e_all[i][act][:, order[:done]].mean(1))]
                break
    recall = [np.mean(pred[labels == k] == k) for k in range(c) if np.any(labels == k)]
    return float(np.mean(recall)), float(evals.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="exported EMA weights (to score val; else reuse)")
    parser.add_argument("--errors", type=Path, required=True, help="the .npz of exhaustive val errors")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replay-t-min", type=int, default=0,
                        help="replay the adaptive settings on the grid timesteps >= this only")
    args = parser.parse_args(argv)
    from analysis.classify import ClassifierConfig, timestep_grid
    from analysis.uncertainty import balanced_accuracy

    if args.weights is not None:
        collect(args.weights, args.data, args.per_class, args.errors, args.threads)
    d = np.load(args.errors)
    errors, labels = d["errors"], d["labels"]
    n, c, t = errors.shape
    print(f"{n} val cells, weights step {d['step']}; exhaustive: {c * t} UNet evaluations per cell")
    for scale in ("linear", "log"):
        e = np.log(errors) if scale == "log" else errors
        bal = balanced_accuracy(labels, np.argmin(e.mean(2), 1), c)
        print(f"  exhaustive {scale:6s}: balanced accuracy {bal:.3f}")
    # Which part of the timestep grid carries the class: exhaustive accuracy on the grid
    # timesteps below each cut, and on each quarter of the grid alone (log scale).
    # Files from before the timesteps were saved hold the grid of [0, 500).
    grid = (d["timesteps"] if "timesteps" in d.files
            else timestep_grid(ClassifierConfig(n_timesteps=t, t_min=0, t_max=500)).numpy())
    e = np.log(errors)

    def exhaustive(keep: np.ndarray | slice) -> float:
        """Balanced accuracy of the exhaustive log procedure on the grid timesteps ``keep``."""
        return balanced_accuracy(labels, np.argmin(e[:, :, keep].mean(2), 1), c)

    for cut in (125, 250, 375, 500):
        keep = grid < cut
        print(f"  exhaustive log, t < {cut}: balanced accuracy {exhaustive(keep):.3f} "
              f"({keep.sum()} timesteps)")
    for cut in (62, 125, 187, 250):
        keep = grid >= cut
        print(f"  exhaustive log, t >= {cut}: balanced accuracy {exhaustive(keep):.3f} "
              f"({keep.sum()} timesteps)")
    # Is accuracy still rising with the number of timesteps (noise-limited) or flat (model-limited)?
    for every in (8, 4, 2, 1):
        print(f"  exhaustive log, every {every} grid timestep(s) ({len(grid[::every])} timesteps): "
              f"balanced accuracy {exhaustive(slice(None, None, every)):.3f}")
    for lo in range(0, 500, 125):
        keep = (grid >= lo) & (grid < lo + 125)
        print(f"  exhaustive log, {lo} <= t < {lo + 125} only: balanced accuracy {exhaustive(keep):.3f}")
    if args.replay_t_min:
        errors = errors[:, :, grid >= args.replay_t_min]
        c, t = errors.shape[1:]
        print(f"adaptive replays on the {t} grid timesteps >= {args.replay_t_min}:")
    for scale, rs, ms, a in SETTINGS:
        bal, ev = replay(errors, labels, scale, rs, ms, a)
        print(f"  adaptive {scale:6s} round {rs} min {ms} alpha {a:<4}: balanced accuracy {bal:.3f}, "
              f"{ev:.0f} evaluations per cell ({c * t / ev:.1f}x fewer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
