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
