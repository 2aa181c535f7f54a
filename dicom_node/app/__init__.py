"""The process wiring: the ``cytonode`` command line and every command's registration, and
``serve`` / ``worker`` / ``demo``, which compose the node's rooms (:mod:`dicom_node.net`,
:mod:`dicom_node.store`, :mod:`dicom_node.jobs`) with the web application.

This is the only package of :mod:`dicom_node` that imports :mod:`viewer`
(``tests/dicom_node/test_imports.py`` fails on any other import).
"""
