"""Build the source pack a site's labelled calibration refits beside (:class:`analysis.site_adapt.SourcePack`).

``--per-class`` cells of each class from each training lab's **train** split (seeded),
framed at the reference's input size, stored as JPEG. The shipped pack holds the shipped
reference's training labs:

    python -m analysis.training.site_pack --labs pbc,bccd,chula --out analysis/weights/site_source.safetensors

and a leave-one-lab-out measurement (:mod:`analysis.training.few_shot`) one without the
held-out lab (``--labs pbc,bccd`` for Chula).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from analysis.framing import FIELD_OF_VIEW_UM
from analysis.reference import ReferenceConfig
from analysis.site_adapt import SourcePack
from analysis.training.labs import LABS, load_lab


def build_pack(data_root: Path, labs: tuple[str, ...], per_class: int = 24, seed: int = 0,
               size: int = ReferenceConfig().image_size) -> SourcePack:
    parts = [load_lab(data_root, lab, "train", size, FIELD_OF_VIEW_UM).per_class(per_class, seed)
             for lab in labs]
    return SourcePack(np.concatenate([p.images for p in parts]),
                      np.concatenate([p.labels for p in parts]),
                      tuple(lab for p in parts for lab in [p.lab] * len(p)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--labs", default=",".join(LABS), help="training labs, comma-separated")
    p.add_argument("--per-class", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    labs = tuple(args.labs.split(","))
    if not labs or any(x not in LABS for x in labs):
        p.error(f"--labs are {', '.join(LABS)} joined with ',', not {args.labs!r}")
    if args.per_class < 1:
        p.error("--per-class must be at least 1")
    pack = build_pack(args.data, labs, args.per_class, args.seed)
    pack.save(args.out)
    print(f"{len(pack.labels)} cells ({', '.join(labs)}) -> {args.out} "
          f"({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
