"""Which cells go to a person, and why: the review rule.

The class reported for a cell is that of the combined posterior (:func:`combine`):
the diffusion classifier's posterior and the reference's softmax, multiplied with
the weights chosen on val (``ReviewRule.diffusion_weight``; 1 is the diffusion
classifier alone). A cell is flagged for review when any of these holds, each with
its reason (:class:`analysis.results.FlagReasonValues`):

``significant-class``
    The reported class, the diffusion classifier's or the reference's is a clinically
    significant class (immature granulocyte, erythroblast), which always goes to a
    person, as haematology analysers do.
``high-anomaly-score`` ("unlike any training class")
    The reference network's features lie far from every training class: the
    Mahalanobis distance to the nearest class mean (shared covariance, in the
    leading principal components of the pooled 1280-d EfficientNet-Lite0
    features, scaled to unit length, of the training cells of every lab) is above
    its threshold. A lab's site calibration (:mod:`analysis.site`) first takes off
    how its cells sit off the training classes and sets the threshold on its own
    normal cells; without one the threshold of the val labs is used. These
    cells are also the suspected abnormal ones (a blast is none of the eight classes).
``models-disagree``
    The diffusion classifier and the discriminative reference call different classes.
``high-uncertainty`` ("uncertain")
    The normalised entropy of the reported posterior or of the diffusion classifier's
    (``ReviewRule.uncertainty_of``, chosen on val) is above its threshold.
``outside-validated-domain``
    The slide as a whole failed its quality check (see :mod:`analysis.domain`).

The thresholds are chosen on val splits (PBC, BCCD, Chula, and the first half of
aml_dev) by :mod:`analysis.training.review_rule`, which also reports every
candidate signal; they are stored in ``calibration.json`` under ``review_rule``
and the feature density in :data:`DENSITY_WEIGHTS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from analysis.classes import CLASS_NAMES
from analysis.results import FlagReasonValues, weights_sha256

#: The feature density of the reference network (next to its weights).
DENSITY_WEIGHTS = "reference_density.safetensors"

#: What the rule's uncertainty may be measured on (see :attr:`ReviewRule.uncertainty_of`).
UNCERTAINTY_OF = ("combined", "diffusion")

#: Classes every call of which goes to review.
SIGNIFICANT_CLASSES: tuple[str, ...] = ("ig", "erythroblast")


def combine(p_diffusion: np.ndarray, p_reference: np.ndarray, diffusion_weight: float) -> np.ndarray:
    """The reported posterior: ``p_diffusion ** w * p_reference ** (1 - w)``, normalised per
    cell (a weighted product of experts; ``w`` 1 is the diffusion classifier alone)."""
    w = float(diffusion_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"diffusion_weight must be in [0, 1], not {w}")
    a = np.asarray(p_diffusion, dtype=np.float64)
    b = np.asarray(p_reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"posteriors of different shapes: {a.shape} and {b.shape}")
    log = w * np.log(np.clip(a, 1e-12, 1.0)) + (1.0 - w) * np.log(np.clip(b, 1e-12, 1.0))
    p = np.exp(log - log.max(axis=1, keepdims=True))
    return np.asarray(p / p.sum(axis=1, keepdims=True))


def rule_uncertainty(rule: ReviewRule, p_diffusion: np.ndarray, p_reference: np.ndarray,
                     diffusion_uncertainty: np.ndarray | None = None) -> np.ndarray:
    """Per cell, the uncertainty ``rule`` judges (:attr:`ReviewRule.uncertainty_of`): the
    normalised entropy of the reported posterior, or the diffusion classifier's own
    (``diffusion_uncertainty``) for a rule that judges it."""
    from analysis.uncertainty import entropy

    if rule.uncertainty_of == "combined":
        return np.asarray(entropy(combine(p_diffusion, p_reference, rule.diffusion_weight)))
    if diffusion_uncertainty is None:
        raise ValueError("this rule judges the diffusion classifier's own uncertainty: give it")
    return np.asarray(diffusion_uncertainty)


def unsure(rule: ReviewRule, p_diffusion: np.ndarray, p_reference: np.ndarray,
           diffusion_uncertainty: np.ndarray | None = None) -> np.ndarray:
    """Per cell: ``rule`` would flag it as uncertain or as the two models disagreeing, the cells
    whose class the node does not know (what :attr:`analysis.site.SiteCalibration.too_many_unsure`
    counts). ``diffusion_uncertainty``: the classifier's own, for a rule that judges it."""
    out = rule_uncertainty(rule, p_diffusion, p_reference, diffusion_uncertainty) > rule.uncertainty_threshold
    if rule.disagreement:
        out = out | (np.asarray(p_diffusion).argmax(axis=1) != np.asarray(p_reference).argmax(axis=1))
    return np.asarray(out, dtype=bool)


@dataclasses.dataclass(frozen=True)
class FeatureDensity:
    """Class-conditional Gaussians with one shared covariance in a PCA subspace.

    ``mean`` ``(D,)`` and ``components`` ``(K, D)`` project a feature vector;
    ``class_means`` ``(C, K)`` and ``precision`` ``(K, K)`` give the Mahalanobis
    distance to each class (Lee et al. 2018, "A simple unified framework for
    detecting out-of-distribution samples and adversarial attacks").
    """

    mean: np.ndarray
    components: np.ndarray
    class_means: np.ndarray
    precision: np.ndarray

    @staticmethod
    def normalise(features: np.ndarray) -> np.ndarray:
        """Features on the unit sphere: the density sees their direction, not their size
        (on val this separated aml_dev's blasts better than the raw features)."""
        x = np.asarray(features, dtype=np.float64)
        return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, n_components: int = 64,
            shrinkage: float = 0.05) -> FeatureDensity:
        """Fit on ``features`` ``(N, D)`` of training cells of every class in ``labels``."""
        x = cls.normalise(features)
        labels = np.asarray(labels)
        present = np.unique(labels)
        if len(present) < 2 or len(x) <= n_components:
            raise ValueError("need cells of at least two classes and more cells than components")
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        components = vt[:n_components]
        z = (x - mean) @ components.T
        class_means = np.stack([z[labels == c].mean(axis=0) if np.any(labels == c)
                                else np.full(n_components, np.nan) for c in range(len(CLASS_NAMES))])
        centred = z - class_means[labels]
        cov = centred.T @ centred / len(z)
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / n_components * np.eye(n_components)
        return cls(mean.astype(np.float32), components.astype(np.float32),
                   class_means.astype(np.float32), np.linalg.inv(cov).astype(np.float32))

    def project(self, features: np.ndarray) -> np.ndarray:
        """``(N, K)``: (normalised) features in the density's principal components."""
        return np.asarray((self.normalise(features) - self.mean) @ self.components.T.astype(np.float64))

    def class_distances(self, features: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
        """``(N, C)`` Mahalanobis distances (NaN for a class the density has no cells of);
        ``shift`` ``(K,)`` (a site calibration's) is taken off the projected features first."""
        z = self.project(features)
        if shift is not None:
            z = z - shift
        d = z[:, None, :] - self.class_means[None].astype(np.float64)
        m = np.einsum("nck,kl,ncl->nc", d, self.precision.astype(np.float64), d)
        return np.asarray(np.sqrt(np.maximum(m, 0.0)))

    def distance(self, features: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
        """Distance to the nearest class: how unlike every training class a cell is."""
        return np.asarray(np.nanmin(self.class_distances(features, shift), axis=1))

    def site_shift(self, features: np.ndarray, iterations: int = 3) -> np.ndarray:
        """How a site's cells sit off the training classes: the mean offset of each cell
        from its nearest class mean (``(K,)``, re-assigned ``iterations`` times). Unlike
        the difference of overall means it does not depend on the site's differential."""
        z = self.project(features)
        shift = np.zeros(z.shape[1])
        means = self.class_means.astype(np.float64)
        for _ in range(iterations):
            nearest = np.nanargmin(self.class_distances(features, shift), axis=1)
            shift = (z - means[nearest]).mean(axis=0)
        return shift

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({f.name: np.ascontiguousarray(getattr(self, f.name))
                   for f in dataclasses.fields(self)}, str(path),
                  metadata={"kind": "reference feature density", "classes": json.dumps(CLASS_NAMES)})

    @classmethod
    def load(cls, path: Path) -> FeatureDensity:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ReviewRule:
    """The thresholds of the review rule (``inf``: that signal never flags)."""

    uncertainty_threshold: float
    feature_threshold: float
    disagreement: bool = True
    significant_classes: tuple[str, ...] = SIGNIFICANT_CLASSES
    chosen_on: str = ""
    #: Share of val normal cells the feature threshold flags (a site calibration keeps it).
    val_normal_flag_rate: float = 0.05
    #: A slide whose cells' median distance is above this is outside the validated domain
    #: (:mod:`analysis.domain`); ``None``: not checked.
    slide_feature_threshold: float | None = None
    #: Weight of the diffusion posterior in the reported one (:func:`combine`; 1: alone).
    diffusion_weight: float = 1.0
    #: Whose normalised entropy ``uncertainty_threshold`` applies to: ``"combined"`` (the
    #: reported posterior's) or ``"diffusion"`` (the diffusion classifier's own).
    uncertainty_of: str = "diffusion"
    #: Dihedral views the reference's probabilities are averaged over
    #: (:func:`analysis.reference.reference_logits`; 1: the cell as it is, as rules chosen
    #: before it existed were).
    reference_views: int = 1
    #: The largest share of a val lab's normal cells the rule calls uncertain or models-disagree:
    #: a site calibration whose own cells are unsure far more often is one the node cannot read
    #: (:attr:`analysis.site.SiteCalibration.too_many_unsure`); ``None``: not checked.
    site_unsure_share: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= int(self.reference_views) <= 8:
            raise ValueError(f"reference_views must be 1 to 8, not {self.reference_views}")
        if not 0.0 <= float(self.diffusion_weight) <= 1.0:
            raise ValueError(f"diffusion_weight must be in [0, 1], not {self.diffusion_weight}")
        if self.uncertainty_of not in UNCERTAINTY_OF:
            raise ValueError(f"uncertainty_of must be one of {UNCERTAINTY_OF}, not {self.uncertainty_of!r}")
        for name in ("uncertainty_threshold", "feature_threshold"):
            value = float(getattr(self, name))
            if math.isnan(value):
                raise ValueError(f"{name} must be a number or inf, not NaN")
            object.__setattr__(self, name, value)
        share = self.site_unsure_share
        if share is not None and not 0.0 < float(share) < 1.0:
            raise ValueError(f"site_unsure_share must lie in (0, 1), not {share}")
        unknown = [c for c in self.significant_classes if c not in CLASS_NAMES]
        if unknown:
            raise ValueError(f"significant_classes must be classes of {CLASS_NAMES}, not {unknown}")
        object.__setattr__(self, "significant_classes", tuple(self.significant_classes))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("uncertainty_threshold", "feature_threshold"):
            if math.isinf(out[name]):
                out[name] = None  # JSON has no inf: None means "never flags"
        out["significant_classes"] = list(self.significant_classes)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ReviewRule:
        values = dict(raw)
        for name in ("uncertainty_threshold", "feature_threshold"):
            if values.get(name) is None:
                values[name] = math.inf
        values["significant_classes"] = tuple(values.get("significant_classes", SIGNIFICANT_CLASSES))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclasses.dataclass(frozen=True)
class ReviewDecision:
    """Per cell: ``review`` and ``abnormal`` masks and the reasons of each flagged cell."""

    review: np.ndarray
    abnormal: np.ndarray
    reasons: tuple[tuple[FlagReasonValues, ...], ...]


def decide(rule: ReviewRule, label: np.ndarray, reference_label: np.ndarray,
           uncertainty: np.ndarray, feature_distance: np.ndarray, *,
           outside_domain: bool = False, diffusion_label: np.ndarray | None = None
           ) -> ReviewDecision:
    """Apply ``rule`` to the cells of one slide (or any set of cells): ``label`` and
    ``uncertainty`` are the reported ones, ``diffusion_label`` the diffusion classifier's own
    call where it differs from ``label`` (the combined posterior; ``None``: the same)."""
    label = np.asarray(label)
    reference_label = np.asarray(reference_label)
    own = label if diffusion_label is None else np.asarray(diffusion_label)
    significant = np.array([CLASS_NAMES.index(c) for c in rule.significant_classes], dtype=np.int64)
    signals = {
        FlagReasonValues.HIGH_UNCERTAINTY: np.asarray(uncertainty) > rule.uncertainty_threshold,
        FlagReasonValues.HIGH_ANOMALY_SCORE: np.asarray(feature_distance) > rule.feature_threshold,
        FlagReasonValues.SIGNIFICANT_CLASS: (np.isin(label, significant) | np.isin(own, significant)
                                             | np.isin(reference_label, significant)),
        FlagReasonValues.MODELS_DISAGREE: (own != reference_label) if rule.disagreement
        else np.zeros(len(label), bool),
        FlagReasonValues.OUTSIDE_DOMAIN: np.full(len(label), bool(outside_domain)),
    }
    order = list(FlagReasonValues)
    reasons = tuple(tuple(r for r in order if signals[r][i]) for i in range(len(label)))
    review = np.array([bool(r) for r in reasons], dtype=bool)
    return ReviewDecision(review=review, abnormal=signals[FlagReasonValues.HIGH_ANOMALY_SCORE].copy(),
                          reasons=reasons)


def diffusion_reasons(review: np.ndarray, abnormal: np.ndarray, *, outside_domain: bool = False
                      ) -> tuple[tuple[FlagReasonValues, ...], ...]:
    """Reasons under a calibration without the rule: the diffusion classifier's own review
    (uncertainty) and abnormal (anomaly score) thresholds, and the slide check."""
    tail = (FlagReasonValues.OUTSIDE_DOMAIN,) if outside_domain else ()
    return tuple((FlagReasonValues.HIGH_UNCERTAINTY,) * bool(r) + (FlagReasonValues.HIGH_ANOMALY_SCORE,)
                 * bool(a) + tail for r, a in zip(review, abnormal))


@dataclasses.dataclass(frozen=True)
class Assessment:
    """The review decision of a set of cells with what it rests on: the reported posterior
    (``probabilities``), its class (``label``) and normalised entropy (``uncertainty``)."""

    decision: ReviewDecision
    feature_distance: np.ndarray
    reference_label: np.ndarray
    reference_probabilities: np.ndarray
    probabilities: np.ndarray
    label: np.ndarray
    #: The uncertainty the rule judged (:attr:`ReviewRule.uncertainty_of`).
    uncertainty: np.ndarray
    #: The diffusion classifier's own class (its posterior's argmax, before combining).
    diffusion_label: np.ndarray


class ReviewModel:
    """The reference network, its feature density and the rule: what flags cells.

    ``load`` returns ``None`` for a calibration written before the rule existed
    (the diffusion thresholds alone then decide, as before).
    """

    def __init__(self, weights_dir: Path, rule: ReviewRule) -> None:
        from analysis.classifier import REFERENCE_WEIGHTS, ReferenceClassifier

        self.rule = rule
        self.reference = ReferenceClassifier(weights_dir, views=rule.reference_views)
        self.density = FeatureDensity.load(weights_dir / DENSITY_WEIGHTS)
        #: What a site calibration must have been fitted with (:meth:`usable_site`).
        self.reference_sha256 = weights_sha256(weights_dir / REFERENCE_WEIGHTS)
        #: The last site network used, by its digest (one site at a time).
        self._site_network: tuple[str, Any] | None = None

    @classmethod
    def load(cls, weights_dir: Path, calibration: Mapping[str, Any]) -> ReviewModel | None:
        raw = calibration.get("review_rule")
        if raw is None:
            return None
        from analysis.errors import CheckpointError

        if not (weights_dir / DENSITY_WEIGHTS).is_file():
            raise CheckpointError(f"{weights_dir / DENSITY_WEIGHTS} not found: the calibration's "
                                  f"review rule needs it (python -m analysis.training.review_rule --write)")
        return cls(weights_dir, ReviewRule.from_dict(raw))

    @property
    def image_size(self) -> int:
        """The reference network's input size (cells are framed for it apart)."""
        return self.reference.image_size

    def usable_site(self, site: Any) -> tuple[Any, tuple[str, ...]]:
        """The :class:`analysis.site.SiteCalibration` to use (``None`` when there is none or
        it was fitted with another reference network) and what a result must say about it."""
        if site is None:
            return None, ()
        usable, notes = site.problems(self.rule.val_normal_flag_rate, self.reference_sha256)
        return (site if usable else None), tuple(notes)

    def rule_for(self, site: Any = None) -> ReviewRule:
        """The rule with a :class:`analysis.site.SiteCalibration`'s feature threshold, if any:
        the distance above which the rule's share of the site's own cells lie; and a fine-tuned
        site's own uncertainty threshold, where it has one."""
        if site is None:
            return self.rule
        threshold = site.threshold_for(self.rule.val_normal_flag_rate)
        own = site.uncertainty_threshold
        return dataclasses.replace(self.rule, feature_threshold=threshold,
                                   uncertainty_threshold=self.rule.uncertainty_threshold if own is None
                                   else float(own))

    def network_for(self, site: Any = None) -> Any:
        """The reference network for a site: its own (``cytonode calibrate-site --labelled``:
        :mod:`analysis.site_adapt`) when it has one, else the shipped one."""
        if site is None or site.network is None:
            return self.reference.model
        if self._site_network is None or self._site_network[0] != site.network_sha256:
            from analysis.site_adapt import apply_network_state

            self._site_network = (site.network_sha256,
                                  apply_network_state(self.reference.model, site.network))
        return self._site_network[1]

    def measure(self, reference_images: np.ndarray, site: Any = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The reference's call, its probabilities and the feature distance (with the site's
        shift, if any) of cells framed at :attr:`image_size`, by the site's network if it has
        one (:meth:`network_for`)."""

        from analysis.reference import reference_logits, reference_posterior

        if len(reference_images) == 0:
            return np.zeros(0, np.int64), np.zeros((0, len(CLASS_NAMES))), np.zeros(0)
        logits, features = reference_logits(self.network_for(site), reference_images, features=True,
                                            views=self.reference.views)
        assert features is not None  # asked for
        p = reference_posterior(logits)
        distance = self.density.distance(features, None if site is None else site.shift())
        return p.argmax(axis=1), p, distance

    def assess(self, probabilities: np.ndarray, uncertainty: np.ndarray,
               reference_images: np.ndarray, *, combined: bool = True,
               outside_domain: bool = False, site: Any = None) -> Assessment:
        """Decide for cells the diffusion classifier gave ``probabilities`` (and ``uncertainty``);
        ``reference_images`` are the same cells framed at :attr:`image_size`. ``combined``:
        report the combined posterior (:func:`combine`); without it (another model's
        ``probabilities``) they are reported as given. With a :class:`analysis.site.SiteCalibration`
        its shift and feature threshold are used."""
        return self.conclude(probabilities, uncertainty, self.measure(reference_images, site),
                             combined=combined, outside_domain=outside_domain, site=site)

    def conclude(self, probabilities: np.ndarray, uncertainty: np.ndarray,
                 measured: tuple[np.ndarray, np.ndarray, np.ndarray], *, combined: bool = True,
                 outside_domain: bool = False, site: Any = None) -> Assessment:
        """:meth:`assess` on what :meth:`measure` returned (for a caller that needs the
        distances first, e.g. for the slide check)."""
        from analysis.uncertainty import entropy

        reference_label, p_ref, distance = measured
        own = np.asarray(probabilities, dtype=np.float64)
        u = np.asarray(uncertainty, dtype=np.float64)
        p = own
        if combined:
            p = combine(own, p_ref, self.rule.diffusion_weight)
            if self.rule.uncertainty_of == "combined":
                u = entropy(p)
        label, own_label = p.argmax(axis=1), own.argmax(axis=1)
        decision = decide(self.rule_for(site), label, reference_label, u, distance,
                          outside_domain=outside_domain, diffusion_label=own_label)
        return Assessment(decision, distance, reference_label, p_ref, p, label, u, own_label)
