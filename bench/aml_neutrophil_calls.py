"""What each model calls aml_dev's first-half neutrophils (the review rule's val half), and why
the rule flags them: a probe for issue 19's aml_dev target (model card, fourteenth session).
About a minute on 2 cores:

    .venv/bin/python bench/aml_neutrophil_calls.py
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch

from analysis.classes import CLASS_NAMES
from analysis.classifier import WEIGHTS_DIR, DiffusionClassifier, read_calibration
from analysis.reference import load_reference, reference_logits, reference_posterior
from analysis.review import ReviewRule, combine, unsure
from analysis.training.review_signals import aml_cells, aml_half
from analysis.uncertainty import entropy


def _names(labels: np.ndarray) -> dict[str, int]:
    return dict(collections.Counter(CLASS_NAMES[i] for i in labels).most_common())


def main() -> None:
    torch.set_num_threads(2)
    data = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    classifier = DiffusionClassifier(WEIGHTS_DIR)
    reference, config, _ = load_reference(WEIGHTS_DIR / "reference_effnet.safetensors")
    rule = ReviewRule.from_dict(read_calibration(WEIGHTS_DIR)["review_rule"])  # type: ignore[arg-type]
    d, r = aml_cells(data, classifier.image_size), aml_cells(data, config.image_size)
    keep = (d.labels == 0) & aml_half(d.paths)
    p_d = classifier.predict(d.images[keep], torch.Generator("cpu").manual_seed(0)).probabilities
    p_r = reference_posterior(reference_logits(reference, r.images[keep])[0])
    combined = combine(p_d, p_r, rule.diffusion_weight)
    uncertain = entropy(combined) > rule.uncertainty_threshold
    disagree = p_d.argmax(1) != p_r.argmax(1)
    print(f"aml_dev first-half neutrophils: {int(keep.sum())}; unsure {int(unsure(rule, p_d, p_r).sum())}, "
          f"uncertain {int(uncertain.sum())}, models disagree {int(disagree.sum())}, "
          f"both {int((uncertain & disagree).sum())}")
    print("diffusion classifier calls:", _names(p_d.argmax(1)))
    print("reference calls:", _names(p_r.argmax(1)))
    print("reported (combined) calls:", _names(combined.argmax(1)))
    print("where they disagree, the diffusion classifier calls:", _names(p_d.argmax(1)[disagree]),
          f"with median probability {np.median(p_d[disagree].max(1)):.3f} "
          f"(neutrophil {np.median(p_d[disagree, 0]):.3f})")


if __name__ == "__main__":
    main()
