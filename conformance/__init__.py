"""CytoNode's DICOM conformance statement, its machine-readable table and the conformance kit.

Run the kit against a node with ``python -m conformance --host H --port P --aet AE``
(see ``conformance/README.md``).
"""
