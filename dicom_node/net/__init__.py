"""The node on the wire: association handling (:mod:`.ae`, :mod:`.receive`), the storage and
Query/Retrieve handlers (:mod:`.handlers`, :mod:`.qr`), sending (:mod:`.send`), DICOM TLS
(:mod:`.tls`) and DICOMweb (:mod:`.dicomweb`: the same store spoken over HTTP, a Flask blueprint
the application mounts). Everything here reads and writes through :mod:`dicom_node.store`.
"""
