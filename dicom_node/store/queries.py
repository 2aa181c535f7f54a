"""The questions the rest of the product asks of the node's index, each written once.

The viewer, the worker and sign-off read the node's tables only through these functions (and
the :class:`~dicom_node.store.files.Store` methods); none of them writes SQL on ``studies``,
``series``, ``instances`` or ``jobs`` itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy import select

from dicom_node.settings import VL_WSM
from dicom_node.store.files import Store
from dicom_node.store.index import Instance


@dataclasses.dataclass(frozen=True)
class SlideFiles:
    """The stored VL Whole Slide Microscopy instances of one series (one slide).

    ``paths`` are sorted, so two reads of an unchanged slide compare equal.
    """

    series_instance_uid: str
    paths: tuple[Path, ...]
    frames: int

    def __bool__(self) -> bool:
        return bool(self.paths)


def slide_files(store: Store, series_instance_uid: str) -> SlideFiles:
    """The VL Whole Slide Microscopy instances of ``series_instance_uid`` (none: an empty
    :class:`SlideFiles`)."""
    with store.session() as session:
        instances = session.scalars(select(Instance).where(
            Instance.series_instance_uid == series_instance_uid,
            Instance.sop_class_uid == VL_WSM)).all()
        paths = tuple(sorted(store.path_of(i) for i in instances))
        frames = sum(int(i.number_of_frames or 0) for i in instances)
    return SlideFiles(series_instance_uid, paths, frames)
