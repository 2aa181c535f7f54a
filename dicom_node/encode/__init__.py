"""Encoders: a :class:`analysis.results.SlideResult` to DICOM objects, each built by one highdicom call.

- :func:`dicom_node.encode.sr.encode_report`: Comprehensive 3D SR, TID 1500 measurement report.
- :func:`dicom_node.encode.ann.encode_bulk_annotations`: Microscopy Bulk Simple Annotations.
- :func:`dicom_node.encode.seg.encode_heatmaps`: FRACTIONAL Segmentation of the heatmaps.

Every code they write is listed in :mod:`dicom_node.encode.codes` and ``docs/codes.md``.
"""
