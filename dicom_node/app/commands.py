"""Every ``cytonode`` sub-command's registration: its arguments, help texts and defaults.

The ``run_*`` function of each command stays with its work (:mod:`dicom_node.app.node`,
:mod:`dicom_node.app.demo`, :mod:`dicom_node.app.analyze`, :mod:`dicom_node.make_slide`,
:mod:`analysis.commands`, :mod:`viewer.auth`) and is imported only when the command runs, so
building the parser loads no model code; :data:`NODE_COMMANDS` need not even import
:mod:`analysis` (see :func:`dicom_node.app.cli.build_parser`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.settings import Settings

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

#: Commands registered by :func:`add_node_commands` alone (no analysis import).
NODE_COMMANDS = ("serve", "worker", "status", "demo")

DEFAULT_PBC = Path("../shared/data/pbc")
DEFAULT_DATA = Path("../shared/data")
DEFAULT_AML = Path("../shared/data/aml_dev")
# ModelConfig's defaults, written out so that building the parser does not import
# torch and diffusers (seconds); tests/analysis/test_evaluate.py checks they agree.
DEFAULT_IMAGE_SIZE = 48
DEFAULT_CHANNELS = (16, 32, 64, 128)


def _runs(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """The handler ``module.function(args)``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), function)(args))

    return run


def add_node_commands(sub: SubParsers) -> None:
    """Register serve, worker, demo and status (none of them imports :mod:`analysis` here)."""
    p = sub.add_parser("serve", help="run the node: SCP, router, outbox and a worker")
    p.set_defaults(func=lambda a: _serve())
    p = sub.add_parser("worker", help="run only an analysis worker (scale-out)")
    p.set_defaults(func=lambda a: _worker())
    p = sub.add_parser("demo", help="run a node and send it the bundled sample slide")
    p.add_argument("--exit", action="store_true", help="stop once the results are in")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the analysis")
    p.add_argument("--pacs", choices=("auto", "orthanc", "pynetdicom"), default="auto",
                   help="the stand-in PACS: Orthanc when installed (auto), or a pynetdicom storage SCP")
    p.set_defaults(func=_runs("dicom_node.app.demo", "run_demo"))
    p = sub.add_parser("status", help="studies, series, jobs and outbox of a node")
    p.add_argument("--json", action="store_true", help="print JSON (the only format so far)")
    p.set_defaults(func=_status)


def add_commands(sub: SubParsers) -> None:
    """Register the analysis, slide and account commands (after :func:`add_node_commands`)."""
    from analysis.classes import CLASS_NAMES
    from viewer.models import RoleValues

    _add_train(sub, CLASS_NAMES)
    _add_classify(sub)
    _add_evaluate(sub, CLASS_NAMES)
    _add_calibrate_site(sub)
    _add_detect(sub)
    _add_make_slide(sub)
    _add_analyze(sub)
    _add_user(sub, [r.value for r in RoleValues])


def _add_train(sub: SubParsers, class_names: tuple[str, ...]) -> None:
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
    p.add_argument("--strong-augment", action="store_true",
                   help="wider colour, contrast and blur augmentation (for unseen stains)")
    p.add_argument("--max-shift-um", type=float, default=None,
                   help="largest move of the cell off the frame's centre in training, um "
                        "(default: about 0.4; a detector's centre is off by up to ~2)")
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
    p.add_argument("--exclude-class", action="append", default=[], choices=class_names,
                   metavar="CLASS", help="train without this class (leave-one-class-out; repeatable)")
    p.set_defaults(func=_runs("analysis.commands", "run_train"))


def _add_classify(sub: SubParsers) -> None:
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
    p.set_defaults(func=_runs("analysis.commands", "run_classify"))


def _add_evaluate(sub: SubParsers, class_names: tuple[str, ...]) -> None:
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
    p.add_argument("--heldout-class", choices=class_names, default=None, metavar="CLASS",
                   help="leave-one-class-out: --weights were trained without CLASS (--exclude-class); "
                        "measure how well the anomaly scores separate its test cells")
    p.add_argument("--heldout-limit", type=int, default=0,
                   help="with --heldout-class: held-out test cells for the diffusion model (0: all)")
    p.set_defaults(func=_runs("analysis.commands", "run_evaluate"))


def _add_calibrate_site(sub: SubParsers) -> None:
    p = sub.add_parser(
        "calibrate-site",
        help="fit the review rule's site-dependent parts on unlabelled cells of a new lab's "
             "normal smears",
        description="Reads single-cell images (PNG/JPEG/BMP files or folders) of normal smears "
                    "of one lab, fits where its cells sit in the reference network's feature "
                    "space and the matching 'unlike any training class' threshold, and stores "
                    "the calibration in DATA_DIR/sites/ID.json. With --labelled, cells the lab's "
                    "staff named also refit the site's own reference network (its normalisation "
                    "statistics and last layer, DATA_DIR/sites/ID.safetensors), which then gives "
                    "the reference's call for this site. Jobs use the newest calibration (or the "
                    "one CYTONODE_SITE_CALIBRATION names) and every report names it.")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="image files or folders (unlabelled cells)")
    p.add_argument("--labelled", type=Path, default=None, metavar="DIR",
                   help="a folder of folders named by class (neutrophil, eosinophil, basophil, "
                        "lymphocyte, monocyte, ig, erythroblast, platelet), at least 5 cells each, "
                        "two classes or more: the site's own labelled cells (7 or more a class to "
                        "show the validated 85%%: the whole 95%% interval must lie at or above it)")
    p.add_argument("--finetune", action="store_true",
                   help="with --labelled (the default there): fine-tune the whole site network "
                        "and the diffusion classifier on the labelled cells where the shipped "
                        "models clearly read them below the validated 85%%; a fine-tuned site gets "
                        "its own uncertainty threshold (minutes; model card)")
    p.add_argument("--no-finetune", action="store_true",
                   help="with --labelled: refit only the site network's statistics and last layer")
    p.add_argument("--finetune-steps", default=None, metavar="NETWORK,DIFFUSION",
                   help="training steps of each fine-tune (default 200,300, as measured)")
    p.add_argument("--id", dest="site_id", help="name of the calibration (letters, digits, _.-)")
    p.add_argument("--pixel-spacing", type=float, default=None,
                   help="micrometres per pixel of the images (default: the median red-cell "
                        "estimate over all images)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the node's data folder (default: CYTONODE_DATA_DIR or ./var)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: shipped)")
    p.add_argument("--list", action="store_true", help="list the stored calibrations and exit")
    p.add_argument("--json", action="store_true", help="print the calibration's summary as JSON")
    p.set_defaults(func=_calibrate_site)


def _add_detect(sub: SubParsers) -> None:
    p = sub.add_parser("detect", help="find white cells in a WSI DICOM series or a field image")
    p.add_argument("path", type=Path, help="WSI DICOM file, folder of one series, or PNG/JPEG/BMP")
    p.add_argument("--pixel-spacing-um", type=float, default=None,
                   help="um per pixel: required scale of a field image (default 0.0823, BCCD); "
                        "for a WSI used only when it has no Pixel Measures")
    p.add_argument("--json", action="store_true", help="write the cells as one JSON object")
    p.set_defaults(func=_runs("analysis.commands", "run_detect"))


def _add_make_slide(sub: SubParsers) -> None:
    p = sub.add_parser("make-slide",
                       help="build a VL Whole Slide Microscopy series from field images "
                            "or convert a vendor slide file")
    p.add_argument("images", type=Path, nargs="+",
                   help="field images (PNG/JPEG/BMP), or one vendor slide (SVS, NDPI, MRXS, TIFF)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--columns", type=int, help="mosaic columns (fields)")
    p.add_argument("--rows", type=int, help="mosaic rows (fields)")
    p.add_argument("--repeat", type=int, default=1, help="use the image list this many times")
    p.add_argument("--pixel-spacing-um", type=float,
                   help="um per pixel of the fields (default 0.0823, BCCD, by its red cells) or "
                        "override for a vendor file")
    p.add_argument("--gap-um", type=float, default=0.0,
                   help="empty glass between fields in um (0: fields touch; 16 keeps every "
                        "cell's crop inside its own field)")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--patient-id", default="BCCD-0001")
    p.add_argument("--patient-name", default="BCCD^Anonymous")
    p.add_argument("--slide-id", default="CYTO-BCCD-0001", help="container identifier and barcode")
    p.set_defaults(func=_runs("dicom_node.make_slide", "run_make_slide"))


def _add_analyze(sub: SubParsers) -> None:
    p = sub.add_parser("analyze",
                       help="offline: analyse one slide, write SR, ANN, SEG and summary.json")
    p.add_argument("slide", type=Path, help="WSI DICOM file or folder of one series")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's noise draws")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder with the weights and calibration.json (default: the shipped ones)")
    p.add_argument("--n-timesteps", type=int, default=None,
                   help="classifier budget: timesteps per class (default: the calibrated one)")
    p.add_argument("--cell-batch", type=int, default=32, help="cells classified together")
    p.add_argument("--heatmap-timesteps", type=int, default=8,
                   help="timesteps averaged per counterfactual heatmap")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmaps (and the SEG)")
    p.add_argument("--pixel-spacing-um", type=float, default=None,
                   help="um per pixel, used only when the slide has no Pixel Measures")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_runs("dicom_node.app.analyze", "run_analyze"))


def _add_user(sub: SubParsers, roles: list[str]) -> None:
    """``cytonode user add NAME --role ROLE --password-stdin``."""
    p = sub.add_parser("user", help="viewer accounts")
    user_sub = p.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = user_sub.add_parser("add", help="create a viewer account")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=roles)
    add.add_argument("--password-stdin", action="store_true", required=True,
                     help="read the password from the first line of standard input")
    add.add_argument("--organization", default="", help="Verifying Organization in signed reports")
    add.add_argument("--person-name", default="",
                     help="Verifying Observer Name in signed reports, as Family^Given "
                          "(default: the user name)")
    add.set_defaults(func=_runs("viewer.auth", "run_user_add"))


def _serve() -> int:
    from dicom_node.app.node import serve

    return serve(Settings.from_env())


def _worker() -> int:
    from dicom_node.app.node import run_worker

    return run_worker(Settings.from_env())


def _status(args: argparse.Namespace) -> int:
    from dicom_node.store.files import Store
    from dicom_node.store.overview import node_status

    settings = Settings.from_env()
    if not (settings.data_dir / "index.sqlite").exists() and not settings.database_url:
        raise FileNotFoundError(f"no node index under {settings.data_dir} (set CYTONODE_DATA_DIR)")
    store = Store(settings)
    try:
        json.dump(node_status(store), sys.stdout, indent=2)
        sys.stdout.write("\n")
    finally:
        store.close()
    return 0


def _default_data_dir() -> Path:
    from dicom_node.errors import SettingsError

    try:
        return Settings.from_env().data_dir
    except SettingsError:
        return Settings().data_dir


def _calibrate_site(args: argparse.Namespace) -> int:
    """``calibrate-site`` with ``--data-dir`` defaulting to the node's data folder."""
    from analysis.commands import run_calibrate_site

    if args.data_dir is None:
        args.data_dir = _default_data_dir()
    return run_calibrate_site(args)

