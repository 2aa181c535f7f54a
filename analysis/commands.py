"""Command-line entry points of the analysis package (train, evaluate, classify).

Each ``add_*`` function registers a sub-command on an :mod:`argparse` parser;
:mod:`dicom_node.app.cli` assembles them into the ``cytonode`` command. The train and evaluate
handlers import :mod:`analysis.training` only when they run, so the node loads no training code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

from analysis.classes import CLASS_NAMES, kept_classes

DEFAULT_PBC = Path("../shared/data/pbc")
DEFAULT_DATA = Path("../shared/data")
# ModelConfig's defaults, written out so that building the parser does not import
# torch and diffusers (seconds); tests/analysis/test_evaluate.py checks they agree.
DEFAULT_IMAGE_SIZE = 48
DEFAULT_CHANNELS = (16, 32, 64, 128)


def add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train (or resume training) the diffusion classifier")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="shared data folder with pbc/, bccd/ and chula_wbc/")
    p.add_argument("--labs", default="pbc,bccd,chula",
                   help="labs whose train cells are used, comma separated (leave one out: "
                        "pbc,chula or pbc,bccd)")
    p.add_argument("--lab-share", type=float, default=0.5, help="share of each batch from PBC")
    p.add_argument("--init", type=Path, default=None,
                   help="start a new run from these exported weights (fine-tuning)")
    p.add_argument("--t-min", type=int, default=0, help="train on timesteps >= T_MIN")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="min-SNR loss weighting (0: off)")
    p.add_argument("--cell-disc", type=float, default=0.4,
                   help="radius of the cell disc the error is measured in, a fraction of the frame")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder (resumes if present)")
    p.add_argument("--steps", type=int, default=60000, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--channels", default=",".join(map(str, DEFAULT_CHANNELS)),
                   help="UNet channels per level, comma separated")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slower on CPUs without native bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", type=Path, help="after training write the EMA weights here")
    p.add_argument("--t-max", type=int, default=None,
                   help="train on timesteps [0, T_MAX) only (default: the whole schedule)")
    p.add_argument("--exclude-class", action="append", default=[], choices=CLASS_NAMES,
                   metavar="CLASS", help="train without this class (leave-one-class-out; repeatable)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    try:
        classes = kept_classes(args.exclude_class)
    except ValueError as exc:
        sys.stderr.write(f"cytonode train: {exc}\n")
        return 2
    from analysis.model import ModelConfig
    from analysis.training.train import TrainConfig, export_weights, train_diffusion

    channels = tuple(int(c) for c in args.channels.split(","))
    levels = len(channels)
    model_config = ModelConfig(image_size=args.image_size, block_out_channels=channels,
                               attention_levels=(levels - 1,),
                               class_names=classes, cell_disc=args.cell_disc)
    labs = tuple(lab.strip() for lab in args.labs.split(",") if lab.strip())
    try:
        train_config = TrainConfig(data_dir=args.data, out_dir=args.out, steps=args.steps,
                                   batch_size=args.batch_size, learning_rate=args.lr,
                                   device=args.device, bf16=args.bf16, threads=args.threads,
                                   seed=args.seed, t_max=args.t_max, t_min=args.t_min, labs=labs,
                                   lab_share=args.lab_share, init_weights=args.init,
                                   min_snr_gamma=args.min_snr_gamma)
    except ValueError as exc:
        sys.stderr.write(f"cytonode train: {exc}\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = train_diffusion(train_config, model_config)
    if args.export:
        export_weights(args.out, args.export)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


DEFAULT_AML = Path("../shared/data/aml_dev")


def _weights_dir_default() -> Path:
    from analysis.classifier import WEIGHTS_DIR

    return WEIGHTS_DIR


def add_classify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("classify", help="classify single-cell images (PNG/JPEG/BMP files or folders)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--json", action="store_true", help="one JSON object a line (the contract)")
    p.add_argument("--model", choices=("diffusion", "reference", "cnn"), default="diffusion",
                   help="the diffusion classifier (default), the fine-tuned EfficientNet-Lite0 "
                        "reference, or the small CNN of earlier versions")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="UM",
                   help="micrometres per pixel of the images (default: estimated from the red "
                        "cells around each cell)")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder with the weights and calibration.json (default: the shipped ones)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--batch", type=int, default=64, help="images read and classified together")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from analysis.classes import CLASS_NAMES
    from analysis.errors import CheckpointError, DatasetError
    from analysis.framing import (
        CELL_IMAGE_MAX_SIDE,
        CELL_IMAGE_MIN_SIDE,
        FIELD_OF_VIEW_UM,
        FramedImage,
        check_image_size,
        collect_image_paths,
        frame_at,
        frame_cell_image,
        read_image,
    )
    from analysis.review import diffusion_reasons

    if args.batch < 1:
        raise ValueError("--batch must be positive")
    if args.pixel_spacing is not None and not 0.01 <= args.pixel_spacing <= 10.0:
        sys.stderr.write(f"cytonode classify: --pixel-spacing must lie in [0.01, 10] um, "
                         f"not {args.pixel_spacing}\n")
        return 2
    try:  # bad input is reported before the model is loaded
        paths = collect_image_paths(list(args.paths))
        for p in paths:  # from the headers: nothing is decoded yet
            check_image_size(p, CELL_IMAGE_MIN_SIDE, CELL_IMAGE_MAX_SIDE, "an image of one cell")
    except DatasetError as exc:
        sys.stderr.write(f"cytonode classify: {exc}\n")
        return 2

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write(f"cytonode classify: --device cuda, but this torch ({torch.__version__}) "
                         "has no CUDA device; use --device cpu\n")
        return 2

    from analysis.classifier import (
        BaselineClassifier,
        DiffusionClassifier,
        Predictions,
        ReferenceClassifier,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.weights or _weights_dir_default()
    try:
        model: DiffusionClassifier | BaselineClassifier | ReferenceClassifier
        if args.model == "diffusion":
            model = DiffusionClassifier(weights, device=args.device)
        elif args.model == "reference":
            model = ReferenceClassifier(weights)
        else:
            model = BaselineClassifier(weights)
    except CheckpointError as exc:
        sys.stderr.write(f"cytonode classify: {exc}\n")
        return 1
    review_model = None
    if isinstance(model, DiffusionClassifier):  # the node's review rule, as on slides
        from analysis.review import ReviewModel

        try:
            review_model = ReviewModel.load(weights, model.calibration)
        except CheckpointError as exc:
            sys.stderr.write(f"cytonode classify: {exc}\n")
            return 1
    generator = torch.Generator("cpu").manual_seed(args.seed)
    progress = len(paths) > args.batch
    for start in range(0, len(paths), args.batch):
        chunk = paths[start:start + args.batch]
        framed: list[FramedImage] = []
        reference_images: list[np.ndarray] = []
        for p in chunk:
            try:
                rgb = read_image(p)
                framed.append(frame_cell_image(rgb, model.image_size, args.pixel_spacing))
                if review_model is not None:  # the same cell and spacing, at the reference's size
                    h, w = rgb.shape[:2]
                    reference_images.append(frame_at(rgb, (w / 2, h / 2), framed[-1].pixel_spacing_um,
                                                     FIELD_OF_VIEW_UM, review_model.image_size))
            except DatasetError as exc:
                sys.stderr.write(f"cytonode classify: {p}: {exc}\n")
                return 2
        images = np.stack([f.image for f in framed])
        pred: Predictions
        if isinstance(model, DiffusionClassifier):
            pred = model.predict(images, generator)
        else:
            pred = model.predict(images)
        reasons = diffusion_reasons(pred.review, pred.abnormal)
        if review_model is not None:
            a = review_model.assess(pred.probabilities, pred.uncertainty, np.stack(reference_images),
                                    combined=isinstance(model, DiffusionClassifier))
            pred = dataclasses.replace(pred, probabilities=a.probabilities, label=a.label,
                                       uncertainty=a.uncertainty, review=a.decision.review,
                                       abnormal=a.decision.abnormal, anomaly_score=a.feature_distance)
            reasons = a.decision.reasons
        for i, path in enumerate(chunk):
            record = {
                "path": str(path),
                "label": CLASS_NAMES[int(pred.label[i])],
                "probabilities": {name: round(float(pred.probabilities[i, c]), 6)
                                  for c, name in enumerate(CLASS_NAMES)},
                "uncertainty": round(float(pred.uncertainty[i]), 6),
                "anomaly_score": round(float(pred.anomaly_score[i]), 6),
                "review": bool(pred.review[i]),
                "abnormal": bool(pred.abnormal[i]),
                "review_reasons": [r.value for r in reasons[i]],
                "pixel_spacing_um": round(framed[i].pixel_spacing_um, 5),
                "pixel_spacing_source": framed[i].spacing_source,
                "scale_ok": framed[i].scale_ok,
            }
            if args.json:
                sys.stdout.write(json.dumps(record) + "\n")
            else:
                flags = " ".join(f for f, on in (("REVIEW", record["review"]),
                                                  ("ABNORMAL", record["abnormal"])) if on)
                p_top = record["probabilities"][record["label"]]  # type: ignore[index]
                sys.stdout.write(f"{path}\t{record['label']}\t{p_top:.3f}\t{flags}\n")
        sys.stdout.flush()
        if progress:
            sys.stderr.write(f"classified {min(start + args.batch, len(paths))}/{len(paths)}\n")
            sys.stderr.flush()
    return 0


def add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="metrics of both models on PBC test and aml_dev "
                                        "(or, with --calibrate, fit the calibration on PBC val)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the calibration on the val split and write calibration.json")
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: shipped)")
    p.add_argument("--data", type=Path, default=DEFAULT_PBC, help="PBC folder with splits.csv")
    p.add_argument("--aml", type=Path, default=DEFAULT_AML, help="aml_dev folder")
    p.add_argument("--per-class", type=int, default=0,
                   help="cells per class for the diffusion model (0: the whole split)")
    p.add_argument("--exhaustive-per-class", type=int, default=8,
                   help="test cells per class also scored exhaustively (0: skip)")
    p.add_argument("--aml-limit", type=int, default=0, help="aml_dev images per folder (0: all)")
    p.add_argument("--target-error", type=float, default=0.01,
                   help="with --calibrate: error allowed among cells not flagged for review")
    p.add_argument("--n-timesteps", type=int, default=None, help="timestep grid (budget per class)")
    p.add_argument("--round-size", type=int, default=None)
    p.add_argument("--min-samples", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="significance of the pruning test")
    p.add_argument("--t-min", type=int, default=None)
    p.add_argument("--t-max", type=int, default=None)
    p.add_argument("--views", type=int, default=None,
                   help="test-time dihedral views of each cell, 1-8 (paired across classes)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arrays-out", type=Path, default=None, help="write per-cell outputs (.npz)")
    p.add_argument("--heldout-class", choices=CLASS_NAMES, default=None, metavar="CLASS",
                   help="leave-one-class-out: --weights were trained without CLASS (--exclude-class); "
                        "measure how well the anomaly scores separate its test cells")
    p.add_argument("--heldout-limit", type=int, default=0,
                   help="with --heldout-class: held-out test cells for the diffusion model (0: all)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from analysis.classifier import read_calibration
    from analysis.classify import ClassifierConfig
    from analysis.errors import CheckpointError, DatasetError
    from analysis.training.evaluate import calibrate, evaluate, evaluate_heldout

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.weights or _weights_dir_default()
    # The budget options share their names with ClassifierConfig's fields.
    overrides = {k: getattr(args, k) for k in ("n_timesteps", "round_size", "min_samples", "alpha",
                                               "t_min", "t_max", "views")
                 if getattr(args, k) is not None}
    try:
        if args.calibrate:
            config = ClassifierConfig(device=args.device, **overrides)
            result = calibrate(weights, args.data, config, per_class=args.per_class,
                               seed=args.seed, target_error=args.target_error)
        else:
            config = None
            if overrides or args.device != "cpu":
                stored = dict(read_calibration(weights)["classifier_config"])  # type: ignore[call-overload]
                config = dataclasses.replace(ClassifierConfig.from_calibration(stored), device=args.device,
                                             **overrides)
            if args.heldout_class:
                result = evaluate_heldout(weights, args.data, args.heldout_class, config,
                                          per_class=args.per_class, heldout_limit=args.heldout_limit,
                                          seed=args.seed)
            else:
                result = evaluate(weights, args.data, args.aml, config, per_class=args.per_class,
                                  exhaustive_per_class=args.exhaustive_per_class,
                                  aml_limit=args.aml_limit, seed=args.seed,
                                  arrays_out=args.arrays_out)
    except DatasetError as exc:
        sys.stderr.write(f"cytonode evaluate: {exc}\n")
        return 2
    except CheckpointError as exc:
        sys.stderr.write(f"cytonode evaluate: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0
