"""The analysis package's commands: train, classify, evaluate, calibrate-site and detect.

Each ``run_*`` function runs one ``cytonode`` sub-command on its parsed arguments and returns the
exit status; the arguments are registered in :mod:`dicom_node.app.commands`. The train and
evaluate handlers import :mod:`analysis.training` only when they run, so the node loads no
training code.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from analysis.classes import kept_classes

logger = logging.getLogger(__name__)


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
                                   min_snr_gamma=args.min_snr_gamma,
                                   strong_augment=args.strong_augment,
                                   max_shift_um=args.max_shift_um)
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


def _weights_dir_default() -> Path:
    from analysis.classifier import WEIGHTS_DIR

    return WEIGHTS_DIR


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


#: Suffixes read as plain field images rather than DICOM.
FIELD_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: Sides, in pixels, of a field image ``detect`` reads whole: smaller holds no white cell (one is
#: about 150 px across at the default 0.0823 um/px); larger is a slide (``cytonode make-slide``).
FIELD_IMAGE_MIN_SIDE = 32
FIELD_IMAGE_MAX_SIDE = 8192


def run_detect(args: argparse.Namespace) -> int:
    """Run ``cytonode detect``; return the exit status."""
    from PIL import Image, UnidentifiedImageError

    from analysis.detect import DEFAULT_FIELD_PIXEL_SPACING_UM, find_cells, find_cells_in_image
    from analysis.errors import DatasetError, SlideUnreadableError
    from analysis.framing import check_image_size
    from analysis.tiles import Slide

    path: Path = args.path
    if args.pixel_spacing_um is not None and not args.pixel_spacing_um > 0:
        raise ValueError(f"--pixel-spacing-um must be > 0, got {args.pixel_spacing_um}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        if path.is_file() and path.suffix.lower() in FIELD_IMAGE_SUFFIXES:
            try:  # from the header, before anything is decoded
                check_image_size(path, FIELD_IMAGE_MIN_SIDE, FIELD_IMAGE_MAX_SIDE,
                                 "a field image (convert larger ones with cytonode make-slide)")
            except DatasetError as exc:
                raise SlideUnreadableError(str(exc)) from None
            spacing = args.pixel_spacing_um
            if spacing is None:
                spacing = DEFAULT_FIELD_PIXEL_SPACING_UM
                logger.info("no --pixel-spacing-um; assuming %.3f um/px", spacing)
            try:
                with Image.open(path) as im:
                    rgb = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise SlideUnreadableError(f"{path}: cannot decode image ({exc})") from exc
            detections = find_cells_in_image(rgb, spacing)
        else:
            with Slide.open(path, default_pixel_spacing_um=args.pixel_spacing_um) as slide:
                detections = find_cells(slide)
    except SlideUnreadableError as exc:
        sys.stderr.write(f"cytonode detect: {str(exc).splitlines()[0] if str(exc) else exc}\n")
        return 2
    if args.json:
        json.dump(detections.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"{len(detections.cells)} white cells, {len(detections.platelets)} "
                         f"platelets in {detections.image_size[0]} x {detections.image_size[1]} px "
                         f"at {detections.pixel_spacing_um:.4f} um/px\n")
    return 0


def _finetune_steps(text: str | None) -> tuple[int, int]:
    """``--finetune-steps NETWORK,DIFFUSION`` (default: the measured 200 and 300)."""
    from analysis.site_adapt import DIFFUSION_FINETUNE_STEPS, FINETUNE_STEPS

    if not text:
        return FINETUNE_STEPS, DIFFUSION_FINETUNE_STEPS
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 10000 for p in parts):
        raise ValueError(f"--finetune-steps takes two whole numbers from 1 to 10000 joined with "
                         f"',' (network,diffusion), not {text!r}")
    return int(parts[0]), int(parts[1])


def run_calibrate_site(args: argparse.Namespace) -> int:
    from analysis.errors import CheckpointError, DatasetError
    from analysis.framing import collect_image_paths
    from analysis.site import check_site_id, scan_sites

    data_dir: Path = args.data_dir  # the command line fills in the node's data folder
    if args.list:
        check = _site_check(args.weights)
        sites, damaged = scan_sites(data_dir)
        for bad in damaged:
            sys.stdout.write(f"{bad.site_id}\tDAMAGED: {bad.reason}\n")
        for site in sites:
            verified = ("" if site.verified_balanced_accuracy is None else
                        f"\tlabelled cells read right: {site.verified_text}")
            sys.stdout.write(f"{site.label}\tsource {site.source}\tflagged {site.flag_rate_before:.1%}"
                             f" -> {site.flag_rate_after:.1%}{verified}\n")
            for note in check(site):
                sys.stdout.write(f"  warning: {note}\n")
            if site.unsure_measured:
                sys.stdout.write(f"\tunlabelled cells unsure: {site.unsure_text}\n")
            if site.uncertainty_threshold is not None:
                sys.stdout.write(f"\t'uncertain' above {site.uncertainty_threshold:.3f} (the site's own: "
                                 f"its models are fine-tuned)\n")
            for reason in site.outside_reasons:
                sys.stdout.write(f"  warning: {reason}: its slides are outside the validated domain\n")
        return 0
    if not (args.paths or args.labelled) or not args.site_id:
        sys.stderr.write("cytonode calibrate-site: give image folders and --id NAME (or --list)\n")
        return 2
    try:
        check_site_id(args.site_id)
        paths = collect_image_paths(list(args.paths)) if args.paths else []
        labelled = labelled_cells(args.labelled) if args.labelled else None
    except (ValueError, DatasetError) as exc:
        sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
        return 2
    if args.pixel_spacing is not None and not 0.01 <= args.pixel_spacing <= 10.0:
        sys.stderr.write("cytonode calibrate-site: --pixel-spacing must lie in [0.01, 10] um\n")
        return 2
    finetune = None
    if args.no_finetune and (args.finetune or args.finetune_steps):
        sys.stderr.write("cytonode calibrate-site: --no-finetune and --finetune(-steps) contradict\n")
        return 2
    if (args.finetune or args.finetune_steps) and not args.labelled:
        sys.stderr.write("cytonode calibrate-site: --finetune needs --labelled cells\n")
        return 2
    if args.labelled and not args.no_finetune:  # fine-tuned by default, where the rule allows
        try:
            finetune = _finetune_steps(args.finetune_steps)
        except ValueError as exc:
            sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
            return 2
    try:
        sources = [p.name for p in args.paths] + ([f"{args.labelled.name} (labelled)"]
                                                  if args.labelled else [])
        summary = calibrate_site(paths, args.site_id, data_dir, weights_dir=args.weights,
                                 pixel_spacing_um=args.pixel_spacing,
                                 source=", ".join(sources)[:200], labelled=labelled,
                                 finetune=finetune)
    except (DatasetError, ValueError) as exc:
        sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
        return 2
    except CheckpointError as exc:
        sys.stderr.write(f"cytonode calibrate-site: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(f"site calibration {summary['label']} written to {summary['path']}\n"
                         f"  'unlike any training class' on these cells: "
                         f"{summary['flag_rate_before']:.1%} with the shipped threshold, "
                         f"{summary['flag_rate_after']:.1%} with the site's\n")
        unsure: dict[str, Any] = summary["unsure"]  # type: ignore[assignment]
        if unsure["measured"]:
            sys.stdout.write(f"  read by both models: {unsure['text']} (the validated labs: at most "
                             f"{unsure['expected']:.1%})\n")
        if unsure["too_many"]:
            sys.stdout.write(f"  WARNING: {unsure['too_many']}: every slide of this site is outside "
                             f"the validated domain and all its cells go to review. Check that these "
                             f"are single white cells of normal smears at the right pixel spacing; "
                             f"a stain unlike the training labs' (model card) is read this way\n")
        if "site_network" in summary:
            from analysis.site_adapt import GATE_MARGIN

            counts = ", ".join(f"{c} {n}" for c, n in summary["labelled"].items())  # type: ignore[attr-defined]
            gate: dict[str, Any] = summary["site_network"]  # type: ignore[assignment]
            verdict = ("used for this site's jobs" if gate["used"] else
                       f"not used (it must be {GATE_MARGIN:.0%} better): the shipped network stays")
            if gate["finetuned"]:
                verdict += ", fine-tuned whole"
            if gate["diffusion_finetuned"]:
                verdict += "; the site's jobs use a diffusion classifier fine-tuned on these cells"
            sys.stdout.write(f"  labelled cells ({counts}): the shipped reference network calls "
                             f"{gate['shipped_accuracy']:.1%} of them right (balanced), the site's own "
                             f"network {gate['site_accuracy']:.1%} (cross-validated): {verdict}\n")
            if "finetune_rule" in gate:
                sys.stdout.write(f"  fine-tune: {gate['finetune_rule']}\n")
            if "uncertainty_threshold" in summary:
                own: dict[str, float] = summary["uncertainty_threshold"]  # type: ignore[assignment]
                sys.stdout.write(f"  'uncertain' above {own['site']:.3f} at this site (the rule: "
                                 f"{own['rule']:.3f}): the fine-tuned models flag at least the share "
                                 f"of these cells the shipped models did\n")
            verified: dict[str, Any] = summary["verified"]  # type: ignore[assignment]
            sys.stdout.write(f"  the class the node reports is right on {verified['text']} of the "
                             f"labelled cells (none read by a network fitted on it)\n")
            if verified["below_validated_accuracy"]:
                sys.stdout.write(f"  WARNING: {verified['below_validated_accuracy']}: every slide of "
                                 f"this site is outside the validated domain and all its cells go "
                                 f"to review; name more cells of each class and calibrate again\n")
    return 0


def _site_check(weights_dir: Path | None) -> Callable[[Any], list[str]]:
    """What the shipped review rule and reference make of a stored site calibration
    (:meth:`analysis.site.SiteCalibration.problems`), without loading the networks."""
    from analysis.classifier import REFERENCE_WEIGHTS, WEIGHTS_DIR, read_calibration
    from analysis.results import weights_sha256

    weights = weights_dir or WEIGHTS_DIR
    rule: Any = read_calibration(weights).get("review_rule")
    if rule is None or not (weights / REFERENCE_WEIGHTS).is_file():
        return lambda site: []
    share = float(rule.get("val_normal_flag_rate", 0.05))
    digest = weights_sha256(weights / REFERENCE_WEIGHTS)
    return lambda site: site.problems(share, digest)[1]


#: Labelled cells of a class a site network needs at least (``calibrate-site --labelled``).
MIN_LABELLED_PER_CLASS = 5


def labelled_cells(folder: Path) -> dict[str, list[Path]]:
    """The labelled cells of ``calibrate-site --labelled``: ``folder/<class>/`` image files.

    Raises
    ------
    DatasetError
        If ``folder`` is not a folder, holds anything but folders named by a class, or a
        class has fewer than :data:`MIN_LABELLED_PER_CLASS` cells, or fewer than two
        classes are given.
    """
    from analysis.classes import CLASS_NAMES
    from analysis.errors import DatasetError
    from analysis.framing import collect_image_paths

    if not folder.is_dir():
        raise DatasetError(f"--labelled {folder} is not a folder")
    out: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or entry.name not in CLASS_NAMES:
            raise DatasetError(f"--labelled {folder}: {entry.name!r} is not a folder named by a class "
                               f"(put each cell in one of {', '.join(CLASS_NAMES)})")
        cells = collect_image_paths([entry])
        if len(cells) < MIN_LABELLED_PER_CLASS:
            raise DatasetError(f"--labelled {folder}: {entry.name} has {len(cells)} cells; a class "
                               f"needs at least {MIN_LABELLED_PER_CLASS}")
        out[entry.name] = cells
    if len(out) < 2:
        raise DatasetError(f"--labelled {folder}: give cells of at least two classes, not {len(out)}")
    return {c: out[c] for c in CLASS_NAMES if c in out}


def calibrate_site(paths: list[Path], site_id: str, data_dir: Path, *, weights_dir: Path | None,
                   pixel_spacing_um: float | None, source: str,
                   labelled: dict[str, list[Path]] | None = None,
                   finetune: tuple[int, int] | None = None) -> dict[str, object]:
    """Frame the images, fit the calibration (and with ``labelled`` cells per class, the
    site's own network: :func:`analysis.site_adapt.fit_site_network`), store it; a summary
    for the command line. ``finetune`` ``(network steps, diffusion steps)``: the site network
    is fine-tuned whole (used where the gate lets it in) and the diffusion classifier too
    (:func:`analysis.site_adapt.finetune_diffusion`; model card, fifteenth to seventeenth
    sessions), unless the shipped models may read the labelled cells at the validated level
    (:func:`analysis.site_adapt.finetune_rule`, ``clearly``); a fine-tuned site gets its own
    uncertainty threshold (:func:`_read_site`)."""
    import numpy as np

    from analysis.classes import CLASS_NAMES
    from analysis.classifier import WEIGHTS_DIR, DiffusionClassifier, read_calibration
    from analysis.framing import folder_spacing_um, read_framed
    from analysis.reference import reference_logits
    from analysis.review import ReviewModel
    from analysis.site import fit_site, save_site

    weights = weights_dir or WEIGHTS_DIR
    # the shipped diffusion classifier, read once and only where a step needs it
    diffusion = functools.cache(lambda: DiffusionClassifier(weights))
    model = ReviewModel.load(weights, read_calibration(weights))
    if model is None:
        raise ValueError(f"{weights} has no review rule to calibrate (calibration.json)")
    labelled = labelled or {}
    named_counts = tuple((c, len(v)) for c, v in labelled.items())
    named = {p.resolve() for cells in labelled.values() for p in cells}
    paths = [p for p in paths if p.resolve() not in named]  # a labelled cell counts once
    every = paths + [p for cells in labelled.values() for p in cells]
    spacing = pixel_spacing_um or folder_spacing_um(every)

    def framed(files: list[Path]) -> np.ndarray:
        size = model.image_size
        return (np.stack([read_framed(p, size, spacing) for p in files]) if files
                else np.zeros((0, size, size, 3), np.uint8))

    logger.info("framing %d cells at %.4f um/px", len(every), spacing)
    images = framed(paths)
    network: dict[str, Any] | None = None
    verification = None
    counts: tuple[tuple[str, int], ...] = ()
    gate: dict[str, object] | None = None
    measuring = model.reference.model
    if labelled:
        from analysis.reference import reference_posterior
        from analysis.site_adapt import (
            SOURCE_PACK,
            SourcePack,
            finetune_rule,
            fit_site_network,
            network_state,
            verify_site,
        )

        pack = SourcePack.load(weights / SOURCE_PACK)
        shot = framed([p for cells in labelled.values() for p in cells])
        labels = np.concatenate([np.full(len(cells), CLASS_NAMES.index(c))
                                 for c, cells in labelled.items()])
        named_files = [p for cells in labelled.values() for p in cells]
        logger.info("the diffusion classifier reads the %d labelled cells (the site's verification)",
                    len(named_files))
        p_named = _diffusion_read(named_files, spacing, diffusion())[0].probabilities
        ruling = None
        if finetune:
            ruling = finetune_rule(p_named, reference_posterior(reference_logits(
                model.reference.model, shot)[0]), labels, model.rule.diffusion_weight, clearly=True,
                unlabelled=len(paths))
            logger.info("%s", ruling.text)
            finetune = finetune if ruling.finetune else None
        fitted = fit_site_network(model.reference.model, images, shot, labels, pack,
                                  finetune_steps=finetune[0] if finetune else 0)
        verification = verify_site(p_named, fitted.probabilities, labels, model.rule.diffusion_weight)
        images = np.concatenate([images, shot])
        gate = {"used": fitted.used, "shipped_accuracy": fitted.shipped_accuracy,
                "site_accuracy": fitted.site_accuracy, "finetuned": bool(finetune and fitted.used),
                "diffusion_finetuned": bool(finetune)}
        if ruling is not None:
            gate["finetune_rule"] = ruling.text
        if fitted.used:
            network, counts = network_state(fitted.model, whole=bool(finetune)), named_counts
            measuring = fitted.model
        if finetune:  # the site's diffusion classifier, beside its network or the shipped one
            network, counts = network or {}, named_counts
            network.update(_finetuned_diffusion(diffusion(), named_files, labels, pack, spacing,
                                                finetune[1]))
    logits, features = reference_logits(measuring, images, features=True,
                                        views=model.reference.views)
    assert features is not None  # asked for
    finetuned = bool(finetune)  # a fine-tune always leaves a network file (its diffusion classifier)
    unsure, own_threshold = _read_site(diffusion, model, paths, spacing, logits[:len(paths)], network,
                                       images[:len(paths)] if finetuned else None)
    val_rate = float(model.rule.val_normal_flag_rate)
    site = fit_site(site_id, features, density=model.density,
                    shipped_threshold=model.rule.feature_threshold,
                    val_normal_flag_rate=val_rate, source=source,
                    reference_sha256=model.reference_sha256, labelled=counts, network=network,
                    verification=verification, unsure=unsure, finetuned=finetuned,
                    uncertainty_threshold=own_threshold)
    path = save_site(data_dir, site)
    summary: dict[str, object] = {
        "id": site.site_id, "label": site.label, "path": str(path), "cells": site.cells,
        "pixel_spacing_um": round(spacing, 5), "feature_threshold": site.feature_threshold,
        "flag_rate_before": site.flag_rate_before, "flag_rate_after": site.flag_rate_after,
        "unsure": {"cells": site.unsure_cells, "measured": site.unsure_measured,
                   "expected": site.unsure_expected, "text": site.unsure_text,
                   "too_many": site.too_many_unsure}}
    if site.uncertainty_threshold is not None:
        summary["uncertainty_threshold"] = {"site": site.uncertainty_threshold,
                                            "rule": model.rule.uncertainty_threshold}
    if gate is not None:
        summary["labelled"] = dict(named_counts)
        summary["site_network"] = gate
        if network is not None:
            summary["network_sha256"] = site.network_sha256
        summary["verified"] = {"balanced_accuracy": site.verified_balanced_accuracy,
                               "interval_95": list(site.verified_interval),
                               "text": site.verified_text, "cells": site.verified_cells,
                               "below_validated_accuracy": site.below_validated_accuracy}
    return summary


def _finetuned_diffusion(classifier: Any, files: list[Path], labels: Any, pack: Any, spacing: float,
                         steps: int) -> dict[str, Any]:
    """The diffusion classifier fine-tuned on the site's labelled ``files`` beside the source
    ``pack`` (:func:`analysis.site_adapt.finetune_diffusion`), as network-file tensors."""
    import numpy as np

    from analysis.framing import read_framed
    from analysis.site_adapt import DIFFUSION_PREFIX, finetune_diffusion, resample

    load = classifier.image_size * 4 // 3  # framed a third larger, as training frames cells
    logger.info("fine-tuning the diffusion classifier on the %d labelled cells (%d steps)",
                len(files), steps)
    images = np.stack([read_framed(p, load, spacing) for p in files])
    unet = finetune_diffusion(classifier.unet, classifier.model_config, images, labels,
                              resample(pack.images, load), pack.labels, steps=steps)
    return {DIFFUSION_PREFIX + k: v.detach().contiguous() for k, v in unet.state_dict().items()}


def _read_site(diffusion: Callable[[], Any], model: Any, files: list[Path], spacing: float,
               logits: Any, network: Any = None, shipped_images: Any = None
               ) -> tuple[tuple[int, int, float] | None, float | None]:
    """Both models read (at most :data:`analysis.site.UNSURE_CELLS` of) the site's unlabelled
    cells: the diffusion classifier (``diffusion()``; the site's own where ``network`` holds
    one) beside the reference ``logits`` of the network the site uses. Returns ``(unsure, read,
    the validated labs' share)`` (how many the review rule calls uncertain or models-disagree,
    under the rule's own threshold, as the validated labs' share was measured; ``None`` when the
    rule has no share or too few cells are given) and, for a fine-tuned site (``shipped_images``:
    the cells framed for the reference network), its own uncertainty threshold
    (:func:`analysis.site_adapt.matched_threshold`: the shipped models read the same cells);
    else ``None``."""
    import numpy as np

    from analysis.reference import reference_logits, reference_posterior
    from analysis.review import rule_uncertainty, unsure
    from analysis.site import MIN_CELLS, UNSURE_CELLS
    from analysis.site_adapt import matched_threshold

    expected = model.rule.site_unsure_share
    if len(files) < MIN_CELLS or (expected is None and shipped_images is None):
        return None, None
    chosen = np.sort(np.random.default_rng(0).permutation(len(files))[:UNSURE_CELLS])
    chosen_files = [files[i] for i in chosen]
    classifier = diffusion().for_network(network)
    logger.info("both models read %d of the site's cells (is the site readable?)", len(chosen))
    readers = [classifier]
    if shipped_images is not None:
        logger.info("the shipped models read them too (the fine-tuned site's uncertainty threshold)")
        readers.append(diffusion())
    pred, *shipped_read = _diffusion_read(chosen_files, spacing, *readers)
    p_reference = reference_posterior(logits[chosen])
    own = None
    for read in shipped_read:  # the shipped classifier's read: a fine-tuned site only
        shipped = rule_uncertainty(model.rule, read.probabilities, reference_posterior(reference_logits(
            model.reference.model, shipped_images[chosen], views=model.reference.views)[0]), read.uncertainty)
        own = matched_threshold(shipped, rule_uncertainty(model.rule, pred.probabilities, p_reference,
                                                          pred.uncertainty), model.rule.uncertainty_threshold)
    if expected is None:
        return None, own
    # the count keeps the rule's threshold (see above)
    flags = unsure(model.rule, pred.probabilities, p_reference, pred.uncertainty)
    return (int(flags.sum()), len(chosen), float(expected)), own


def _diffusion_read(files: list[Path], spacing: float, *classifiers: Any) -> list[Any]:
    """Each diffusion classifier's prediction (seed 0) on cell image ``files``, framed for them
    at ``spacing`` once (they share an input size: the shipped one and a site's fine-tuned
    copy): what the fine-tune rule, the site's verification and the unsure count read."""
    import numpy as np
    import torch

    from analysis.framing import read_framed

    images = np.stack([read_framed(p, classifiers[0].image_size, spacing) for p in files])
    return [c.predict(images, torch.Generator("cpu").manual_seed(0)) for c in classifiers]
