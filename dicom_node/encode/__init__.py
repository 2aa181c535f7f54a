"""Encoders: a :class:`analysis.results.SlideResult` to DICOM objects, each built by one highdicom call.

- :func:`dicom_node.encode.sr.encode_report`: Comprehensive 3D SR, TID 1500 measurement report.
- :func:`dicom_node.encode.ann.encode_bulk_annotations`: Microscopy Bulk Simple Annotations.
- :func:`dicom_node.encode.seg.encode_heatmaps`: FRACTIONAL Segmentation of the heatmaps.
- :func:`dicom_node.encode.pdf.encode_pdf_report` (and ``encode_final_pdf_report`` at sign-off):
  the report as Encapsulated PDF, built with pydicom (highdicom 0.28 has no class for it).
- :func:`dicom_node.encode.sc.encode_flagged_gallery`: Secondary Capture gallery of the flagged cells.

Every code they write is listed in :mod:`dicom_node.encode.codes` and ``docs/codes.md``.
"""
