"""Site calibration: fit the site-dependent parts of the review rule on a new lab's cells.

A lab that installs CytoNode has its own stain, microscope and scanner. Its normal
cells sit at a different place in the reference network's feature space than the
training labs' cells, so the "unlike any training class" distance flags more of
them than on val. ``cytonode calibrate-site DIR`` reads unlabelled cell images of
normal smears of the new lab (single-cell crops, framed as ``cytonode classify``
frames them) and fits:

``feature_shift``
    How the site's cells sit off the training classes in the reference feature
    density's principal components: the mean offset of each cell from its nearest
    class mean (:meth:`analysis.review.FeatureDensity.site_shift`), taken off a
    cell's features before the distance. It does not depend on the site's differential.
``feature_threshold``
    The distance (after the shift) that flags the same share of the site's cells as
    the shipped threshold flags of val normal cells (``val_normal_flag_rate``).
``median_distance``
    The median of the site's distances after the shift: the slide check's reference
    (:func:`analysis.domain.slide_threshold`).
``distance_quantiles``
    The site's distances after the shift at every half percentile, so that a later
    review rule with another share (``val_normal_flag_rate``) takes its threshold from
    the same cells (:meth:`SiteCalibration.threshold_for`) without a new calibration.
``reference_sha256``
    The reference network whose features were measured. The shift lives in that
    network's feature space: with another network it means nothing, and the node does
    not use the calibration (:meth:`SiteCalibration.problems`).

With ``--labelled DIR`` (folders named by class holding single-cell crops the lab's staff
named), it also fits the site's own reference network (:mod:`analysis.site_adapt`): the
network's batch-normalisation statistics re-estimated on all the site's cells and its last
layer refitted on the labelled ones. That network (``network_sha256``, stored as
``DATA_DIR/sites/<id>.safetensors``) then gives the reference's call and the features for
this site, and the shift and threshold above are measured with it.

Whether the node can read the site at all is measured too, without labels: both models are run
on up to :data:`UNSURE_CELLS` of the site's unlabelled cells and the review rule's "uncertain" and
"models disagree" calls are counted (``unsure_cells`` of ``unsure_measured``). A site with far
more such cells than any validated lab (``unsure_expected``, the rule's ``site_unsure_share``;
one-sided binomial, p < :data:`UNSURE_ALPHA`) is one the node reads badly: every slide of it is
outside the validated domain (:attr:`SiteCalibration.too_many_unsure`).

It is stored as ``DATA_DIR/sites/<id>.json`` with its id, date, cell count and
source, and every result analysed with it names it in its provenance. A file written
before the quantiles were stored keeps its one threshold: results name the share it
was fitted for, and ask for ``cytonode calibrate-site`` again when that differs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np

SITES_DIR = "sites"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Fewer cells than this give too noisy a mean and quantile to be worth storing.
MIN_CELLS = 30
#: The probabilities at which the site's distances are stored (every half percentile).
QUANTILE_GRID = np.linspace(0.0, 1.0, 201)
#: At most this many of a site's unlabelled cells are read by both models to count the unsure.
UNSURE_CELLS = 200
#: A site whose unsure cells are this unlikely under the validated labs' share is not read.
UNSURE_ALPHA = 0.01


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``: how surprising ``k`` of ``n`` is at share ``p``."""
    if k <= 0:
        return 1.0
    return float(min(1.0, sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i)
                              for i in range(k, n + 1))))


def check_site_id(value: str) -> str:
    """A site id becomes a file name: letters, digits, ``_.-``, at most 64, no leading dot."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(f"site id must be 1-64 letters, digits, '_', '.', '-' (not starting with "
                         f"'.', '_' or '-'), not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SiteCalibration:
    site_id: str
    created: str
    cells: int
    source: str
    feature_shift: tuple[float, ...]
    feature_threshold: float
    flag_rate_before: float
    flag_rate_after: float
    #: Median distance of the site's cells after the shift (the slide check's reference).
    median_distance: float = 0.0
    #: The share of the site's cells ``feature_threshold`` flags (``None``: not recorded).
    flag_share: float | None = None
    #: The site's distances after the shift at :data:`QUANTILE_GRID` (empty: not recorded).
    distance_quantiles: tuple[float, ...] = ()
    #: SHA-256 of the reference network the features came from ("": not recorded).
    reference_sha256: str = ""
    #: Labelled cells per class the site's network was refitted on (empty: no site network).
    labelled: tuple[tuple[str, int], ...] = ()
    #: SHA-256 of the site network's file (``<id>.safetensors``; "": none).
    network_sha256: str = ""
    #: The reported class's balanced accuracy on the labelled cells, none scored by a network
    #: fitted on it (:func:`analysis.site_adapt.verify_site`; ``None``: no labelled cells).
    verified_balanced_accuracy: float | None = None
    #: The labelled cells it was measured on.
    verified_cells: int = 0
    #: Its 95 % interval (:func:`analysis.site_adapt.balanced_accuracy_interval`; empty: none).
    verified_interval: tuple[float, ...] = ()
    #: Of ``unsure_measured`` of the site's unlabelled cells, those the review rule calls
    #: uncertain or on which the two models disagree (0 of 0: not measured).
    unsure_cells: int = 0
    unsure_measured: int = 0
    #: The largest share of a validated lab's normal cells the rule calls unsure, when measured
    #: (the rule's ``site_unsure_share``; ``None``: not checked).
    unsure_expected: float | None = None
    #: The site network was fine-tuned whole on the labelled cells, and the diffusion
    #: classifier with it (``calibrate-site --labelled``, by default; its tensors are in the network file).
    finetuned: bool = False
    #: A fine-tuned site's own uncertainty threshold (:func:`analysis.site_adapt.matched_threshold`:
    #: its models call uncertain the share of its unlabelled cells the shipped models did);
    #: ``None``: the review rule's.
    uncertainty_threshold: float | None = None
    #: The site network's tensors (:func:`analysis.site_adapt.network_state`), read by
    #: :func:`load_site`; not part of the JSON.
    network: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_site_id(self.site_id)
        if self.cells < MIN_CELLS:
            raise ValueError(f"a site calibration needs at least {MIN_CELLS} cells, not {self.cells}")
        if not np.isfinite(self.feature_threshold):
            raise ValueError("feature_threshold must be finite")
        if self.flag_share is not None and not 0.0 < self.flag_share < 1.0:
            raise ValueError(f"flag_share must lie in (0, 1), not {self.flag_share}")
        q = np.asarray(self.distance_quantiles, dtype=np.float64)
        if len(q) and (len(q) != len(QUANTILE_GRID) or not np.all(np.isfinite(q))
                       or np.any(np.diff(q) < 0)):
            raise ValueError(f"distance_quantiles must be {len(QUANTILE_GRID)} finite, "
                             f"non-decreasing numbers")
        if bool(self.labelled) != bool(self.network_sha256):
            raise ValueError("labelled and network_sha256 go together")
        if self.finetuned and not self.network_sha256:
            raise ValueError("a fine-tuned site needs its network (network_sha256)")
        v = self.verified_balanced_accuracy
        if v is not None and (not 0.0 <= v <= 1.0 or self.verified_cells < 1):
            raise ValueError("verified_balanced_accuracy lies in [0, 1], measured on 1 cell or more")
        i = self.verified_interval
        if i and (v is None or len(i) != 2 or not 0.0 <= i[0] <= i[1] <= 1.0):
            raise ValueError("verified_interval is (low, high) in [0, 1], beside a verified figure")
        if not 0 <= self.unsure_cells <= self.unsure_measured:
            raise ValueError("unsure_cells lies between 0 and unsure_measured")
        e = self.unsure_expected
        if e is not None and not 0.0 < e < 1.0:
            raise ValueError(f"unsure_expected must lie in (0, 1), not {e}")
        t = self.uncertainty_threshold
        if t is not None and not (self.finetuned and 0.0 <= t <= 1.0):
            raise ValueError(f"uncertainty_threshold lies in [0, 1] and is a fine-tuned site's, not {t}")

    @property
    def labelled_cells(self) -> int:
        return sum(n for _, n in self.labelled)

    @property
    def label(self) -> str:
        """How a report names it: ``<id> (<date>, <n> cells)``, with ``, <m> labelled`` for a
        calibration with its own network."""
        named = f", {self.labelled_cells} labelled" if self.labelled else ""
        named += ", fine-tuned" if self.finetuned else ""
        return f"{self.site_id} ({self.created[:10]}, {self.cells} cells{named})"

    @property
    def below_validated_accuracy(self) -> str | None:
        """Why the node does not stand behind its answers at this site, else ``None``: its
        labelled cells are read worse than :data:`analysis.site_adapt.VERIFIED_MINIMUM`, or too
        few of them were read well enough to show it. The whole 95 % interval of the verification
        must lie at or above it (criteria.txt, 2026-12-06 08:51): on 50 named cells the figure
        alone swings by about ten points. A calibration stored without an interval is judged
        on its figure."""
        from analysis.site_adapt import VERIFIED_MINIMUM

        v = self.verified_balanced_accuracy
        if v is None:
            return None
        read = f"site {self.site_id}'s {self.verified_cells} labelled cells are read right at {self.verified_text}"
        if v < VERIFIED_MINIMUM:
            return f"{read}, below the {VERIFIED_MINIMUM:.0%} the node is validated for"
        if self.verified_interval and self.verified_interval[0] < VERIFIED_MINIMUM:
            return (f"{read}, an interval reaching below the {VERIFIED_MINIMUM:.0%} the node is "
                    f"validated for (too few cells to show it)")
        return None

    @property
    def unsure_text(self) -> str:
        """The unsure count in words: ``37 of 200 cells (18.5%) uncertain or the models disagree``."""
        if not self.unsure_measured:
            return "not measured"
        return (f"{self.unsure_cells} of {self.unsure_measured} cells "
                f"({self.unsure_cells / self.unsure_measured:.1%}) uncertain or the models disagree")

    @property
    def too_many_unsure(self) -> str | None:
        """Why the node cannot read this site (far more of its unlabelled cells unsure than at
        any validated lab: p < :data:`UNSURE_ALPHA`), else ``None``."""
        e = self.unsure_expected
        if e is None or self.unsure_measured < MIN_CELLS:
            return None
        p = binomial_tail(self.unsure_cells, self.unsure_measured, e)
        if p >= UNSURE_ALPHA:
            return None
        return (f"site {self.site_id}'s cells are read unsure: {self.unsure_text}, against at "
                f"most {e:.1%} at the validated labs (binomial p {p:.1g})")

    @property
    def outside_reasons(self) -> tuple[str, ...]:
        """Every reason this site's slides are outside the validated domain (empty: none)."""
        return tuple(r for r in (self.below_validated_accuracy, self.too_many_unsure) if r)

    @property
    def verified_text(self) -> str:
        """The verification in words: ``86.7% (balanced; 95% interval 74.1-95.0%)``."""
        v = self.verified_balanced_accuracy
        if v is None:
            return "not measured"
        if not self.verified_interval:
            return f"{v:.1%} (balanced)"
        low, high = self.verified_interval
        return f"{v:.1%} (balanced; 95% interval {low:.1%}-{high:.1%})"

    def shift(self) -> np.ndarray:
        return np.asarray(self.feature_shift, dtype=np.float64)

    def threshold_for(self, share: float) -> float:
        """The distance above which ``share`` of the site's own cells lie: from the stored
        quantiles, else the one stored threshold (whatever share it was fitted for)."""
        if not len(self.distance_quantiles):
            return float(self.feature_threshold)
        return float(np.interp(1.0 - share, QUANTILE_GRID, self.distance_quantiles))

    def problems(self, share: float, reference_sha256: str) -> tuple[bool, list[str]]:
        """Whether the calibration can be used with a review rule flagging ``share`` of a
        site's normal cells and the reference network of that digest, and what a result
        must say about it."""
        again = f"run `cytonode calibrate-site` again for {self.site_id}"
        if self.reference_sha256 and self.reference_sha256 != reference_sha256:
            return False, [(f"site calibration {self.label} was fitted with another reference "
                            f"network ({self.reference_sha256[:12]}, shipped "
                            f"{reference_sha256[:12]}): not used; {again}")]
        if len(self.distance_quantiles):
            return True, []
        fitted = self.flag_share
        if fitted is not None and abs(fitted - share) < 1e-9:
            return True, []
        was = "an unrecorded share" if fitted is None else f"{fitted:.0%}"
        return True, [(f"site calibration {self.label} flags {was} of the site's cells as unlike "
                       f"any training class, the review rule {share:.0%}: {again}")]

    def to_json(self) -> str:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "network"}
        raw["labelled"] = [list(pair) for pair in self.labelled]
        return json.dumps(raw, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SiteCalibration:
        raw: dict[str, Any] = json.loads(text)
        raw["feature_shift"] = tuple(float(v) for v in raw["feature_shift"])
        raw["distance_quantiles"] = tuple(float(v) for v in raw.get("distance_quantiles", ()))
        raw["labelled"] = tuple((str(c), int(n)) for c, n in raw.get("labelled", ()))
        raw["verified_interval"] = tuple(float(v) for v in raw.get("verified_interval", ()))
        known = {f.name for f in dataclasses.fields(cls)} - {"network"}
        return cls(**{k: v for k, v in raw.items() if k in known})


def site_path(data_dir: Path, site_id: str) -> Path:
    return data_dir / SITES_DIR / f"{check_site_id(site_id)}.json"


def network_path(data_dir: Path, site_id: str) -> Path:
    """Where a site's own network is stored (beside its JSON)."""
    return data_dir / SITES_DIR / f"{check_site_id(site_id)}.safetensors"


def _write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename (a reader never sees half)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_site(data_dir: Path, site: SiteCalibration) -> Path:
    """Store ``site`` (and its network, written first, when it has one)."""
    path = site_path(data_dir, site.site_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if site.network_sha256:
        if site.network is None:
            raise ValueError(f"site calibration {site.site_id} names a network but holds none")
        data = _network_bytes(site.network)
        if hashlib.sha256(data).hexdigest() != site.network_sha256:
            raise ValueError(f"site calibration {site.site_id}: its network is not the one named")
        _write(network_path(data_dir, site.site_id), lambda tmp: tmp.write_bytes(data))
    _write(path, lambda tmp: tmp.write_text(site.to_json() + "\n"))
    return path


def _network_bytes(network: Any) -> bytes:
    """The site network's file (safetensors; the same tensors always give the same bytes)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in network.items()})


def network_digest(network: Any) -> str:
    """The SHA-256 of the site network's file."""
    return hashlib.sha256(_network_bytes(network)).hexdigest()


def load_site(data_dir: Path, site_id: str) -> SiteCalibration:
    """Read a site calibration, with its network when it has one.

    Raises
    ------
    FileNotFoundError
        There is no such calibration.
    ValueError
        It cannot be read, or its network is missing or not the one it was fitted with.
    """
    path = site_path(data_dir, site_id)
    if not path.is_file():
        raise FileNotFoundError(f"no site calibration {site_id!r} in {path.parent}")
    site = SiteCalibration.from_json(path.read_text())
    if not site.network_sha256:
        return site
    from analysis.results import weights_sha256

    target = network_path(data_dir, site.site_id)
    if not target.is_file() or weights_sha256(target) != site.network_sha256:
        raise ValueError(f"site calibration {site.site_id}: its network {target.name} is "
                         f"{'missing' if not target.is_file() else 'not the one it was fitted with'}; "
                         f"run `cytonode calibrate-site` again")
    from safetensors.torch import load_file

    return dataclasses.replace(site, network=load_file(str(target)))


@dataclasses.dataclass(frozen=True)
class DamagedSite:
    """A site calibration file that cannot be used, and why."""

    site_id: str
    reason: str
    #: When its JSON was last written (seconds since the epoch).
    mtime: float


def scan_sites(data_dir: Path) -> tuple[list[SiteCalibration], list[DamagedSite]]:
    """Every site calibration in ``DATA_DIR/sites``: the readable ones, oldest first, and the
    damaged ones (unreadable JSON, a file named for another id, or a network missing or not
    the one it was fitted with)."""
    folder = data_dir / SITES_DIR
    if not folder.is_dir():
        return [], []
    good, damaged = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            site = load_site(data_dir, path.stem)
            if site.site_id != path.stem:
                raise ValueError(f"{path.name} holds site calibration {site.site_id!r}")
            good.append(site)
        except (ValueError, KeyError, TypeError) as exc:
            damaged.append(DamagedSite(path.stem, str(exc), path.stat().st_mtime))
    return sorted(good, key=lambda s: s.created), damaged


def list_sites(data_dir: Path) -> list[SiteCalibration]:
    """The readable site calibrations, oldest first (:func:`scan_sites`)."""
    return scan_sites(data_dir)[0]


def newest_site(data_dir: Path) -> SiteCalibration | None:
    """The site calibration jobs use when none is named: the newest readable one.

    Raises
    ------
    ValueError
        If a damaged calibration file was written after it: the node never falls back to an
        older calibration (possibly another lab's) without saying so.
    """
    good, damaged = scan_sites(data_dir)
    newest = good[-1] if good else None
    since = site_path(data_dir, newest.site_id).stat().st_mtime if newest is not None else -1.0
    newer = [d for d in damaged if d.mtime >= since]
    if newer:
        d = max(newer, key=lambda d: d.mtime)
        raise ValueError(f"the newest site calibration, {d.site_id}, cannot be used ({d.reason}); "
                         f"jobs do not fall back to an older one: run `cytonode calibrate-site` "
                         f"again, or name a calibration in the site_calibration setting")
    return newest


def fit_site(site_id: str, features: np.ndarray, *, density: Any,
             shipped_threshold: float, val_normal_flag_rate: float, source: str,
             reference_sha256: str = "", labelled: tuple[tuple[str, int], ...] = (),
             network: Any = None, verification: Any = None,
             unsure: tuple[int, int, float] | None = None,
             finetuned: bool = False, uncertainty_threshold: float | None = None) -> SiteCalibration:
    """Fit a site calibration from the reference ``features`` of the site's cells
    (``density``: :class:`analysis.review.FeatureDensity`; ``reference_sha256``: the
    shipped network; ``network``: the site's own (:func:`analysis.site_adapt.network_state`,
    fitted on ``labelled`` cells per class), which then measured ``features``;
    ``verification``: :func:`analysis.site_adapt.verify_site`'s on the labelled cells;
    ``unsure``: ``(unsure cells, cells read, the validated labs' share)``; ``finetuned``: the
    network was fine-tuned whole and holds the site's diffusion classifier;
    ``uncertainty_threshold``: then its own, :func:`analysis.site_adapt.matched_threshold`)."""
    if len(features) < MIN_CELLS:
        raise ValueError(f"a site calibration needs at least {MIN_CELLS} cells, not {len(features)}")
    shift = density.site_shift(features)
    before = density.distance(features)
    after = density.distance(features, shift)
    threshold = float(np.quantile(after, 1.0 - val_normal_flag_rate))
    return SiteCalibration(
        site_id=site_id, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cells=len(features), source=source,
        feature_shift=tuple(float(v) for v in shift),
        feature_threshold=threshold,
        flag_rate_before=round(float(np.mean(before > shipped_threshold)), 4),
        flag_rate_after=round(float(np.mean(after > threshold)), 4),
        median_distance=round(float(np.median(after)), 4),
        flag_share=float(val_normal_flag_rate),
        distance_quantiles=tuple(float(v) for v in np.quantile(after, QUANTILE_GRID)),
        reference_sha256=reference_sha256, labelled=labelled,
        network_sha256=network_digest(network) if network is not None else "", network=network,
        verified_balanced_accuracy=None if verification is None else verification.balanced_accuracy,
        verified_cells=0 if verification is None else verification.cells,
        verified_interval=() if verification is None else (verification.low, verification.high),
        unsure_cells=0 if unsure is None else int(unsure[0]),
        unsure_measured=0 if unsure is None else int(unsure[1]),
        unsure_expected=None if unsure is None else float(unsure[2]), finetuned=finetuned,
        uncertainty_threshold=None if uncertainty_threshold is None else round(float(uncertainty_threshold), 6))
