"""WiSE-FT for the reference: the weights of a linear probe and of a fine-tuned network averaged.

Wortsman et al. (CVPR 2022, "Robust fine-tuning of zero-shot models") found that averaging every
weight of a pretrained network and of its fine-tuned copy keeps much of the pretrained network's
robustness to distribution shift and the fine-tuned one's accuracy. Here the pretrained end is
the ImageNet EfficientNet-Lite0 of the wheel with a linear head fitted on its frozen features of
the training labs' train cells (a linear probe, weighted as :mod:`analysis.training.reference_train`
samples cells), the fine-tuned end a reference trained on the same labs. Measured leave-one-lab-out
(model card, tenth session); it failed, so the node does not use it.

    python -m analysis.training.wise_ft .train/ms/ref_no_chula_base.safetensors \\
        --labs pbc,bccd --out-stem .train/ms/ref_no_chula_wise --mix 0,0.25,0.5,0.75

writes ``<out-stem><mix>.safetensors`` for each mix, to be scored with
:mod:`analysis.training.compare_references`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from analysis.framing import FIELD_OF_VIEW_UM
from analysis.reference import build_reference, load_reference, reference_logits, save_reference
from analysis.training.labs import LABS, LabCells, load_lab
from analysis.training.train import lab_class_weights

log = logging.getLogger(__name__)


def fit_linear_probe(model: torch.nn.Module, cells: list[LabCells], *, l2: float = 1e-4,
                     lab_share: float = 0.5) -> torch.nn.Module:
    """Fit ``model``'s head on its frozen features of ``cells`` (weighted cross-entropy: each
    lab and each class within a lab weighed as the reference's training samples them) and
    return ``model`` with that head."""
    # the pooled features the head reads
    x = torch.from_numpy(np.concatenate([reference_logits(model, c.images, features=True)[1]
                                         for c in cells]))
    y = torch.from_numpy(np.concatenate([c.labels for c in cells])).long()
    labs = np.concatenate([np.full(len(c), LABS.index(c.lab)) for c in cells])
    w = lab_class_weights(labs, y.numpy(), lab_share).float()
    w = w / w.sum()
    head = torch.nn.Linear(x.shape[1], model._fc.out_features)
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (torch.nn.functional.cross_entropy(head(x), y, reduction="none") * w).sum()
        loss = loss + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        model._fc.weight.copy_(head.weight)
        model._fc.bias.copy_(head.bias)
    log.info("linear probe: %d cells, training accuracy %.3f", len(y),
             float((head(x).argmax(1) == y).float().mean()))
    return model


def mix_weights(probe: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                mix: float) -> dict[str, torch.Tensor]:
    """Every floating-point tensor ``(1 - mix) * probe + mix * tuned`` (batch-norm statistics
    included); integer ones (batch counters) from ``tuned``."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], not {mix}")
    if probe.keys() != tuned.keys():
        raise ValueError("the two networks' tensors differ")
    return {k: (1.0 - mix) * probe[k] + mix * v if v.is_floating_point() else v
            for k, v in tuned.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tuned", type=Path, help="the fine-tuned reference (.safetensors)")
    p.add_argument("--labs", required=True, help="the labs it was trained on, comma-separated")
    p.add_argument("--out-stem", required=True)
    p.add_argument("--mix", default="0,0.25,0.5,0.75", help="comma-separated shares of the tuned")
    p.add_argument("--pbc-per-class", type=int, default=150)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tuned, config, metadata = load_reference(args.tuned)
    cells = [load_lab(args.data, lab.strip(), "train", config.image_size, FIELD_OF_VIEW_UM,
                      config.class_names) for lab in args.labs.split(",") if lab.strip()]
    cells = [c.per_class(args.pbc_per_class, 0) if c.lab == "pbc" else c for c in cells]
    probe = fit_linear_probe(build_reference(config, pretrained=True), cells)
    extra = {k: v for k, v in metadata.items() if k not in ("config", "architecture")}
    for mix in (float(x) for x in args.mix.split(",")):
        model = build_reference(config, pretrained=False)
        model.load_state_dict(mix_weights(probe.state_dict(), tuned.state_dict(), mix))
        out = Path(f"{args.out_stem}{mix}.safetensors")
        save_reference(model, config, out, {**extra, "wise_ft_mix": str(mix)})
        log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
