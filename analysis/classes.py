"""The eight white-cell classes of the classifier, in their fixed order."""

from __future__ import annotations

import enum


class CellClassValues(str, enum.Enum):
    """Cell classes of the PBC dataset (Acevedo et al. 2020), in model order.

    The order is the order of the class embedding of the model and of every
    probability vector; it never changes.
    """

    NEUTROPHIL = "neutrophil"
    EOSINOPHIL = "eosinophil"
    BASOPHIL = "basophil"
    LYMPHOCYTE = "lymphocyte"
    MONOCYTE = "monocyte"
    IG = "ig"
    ERYTHROBLAST = "erythroblast"
    PLATELET = "platelet"


CLASS_NAMES: tuple[str, ...] = tuple(c.value for c in CellClassValues)


def check_class_names(names: list[str] | tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming every entry of ``names`` that is not a class."""
    unknown = sorted(set(names) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; the classes are {', '.join(CLASS_NAMES)}")


def kept_classes(excluded: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The classes of a model trained without ``excluded`` (leave-one-class-out), in the fixed order.

    Raises
    ------
    ValueError
        If a name is not a class, or fewer than two classes would be left.
    """
    check_class_names(excluded)
    kept = tuple(c for c in CLASS_NAMES if c not in excluded)
    if len(kept) < 2:
        raise ValueError("at least two classes must be left to train on")
    return kept
