"""Analysis jobs: which stable series are analysed (:mod:`.routing`), the Celery task that carries a
job (:mod:`.tasks`), the worker that opens the slide once, runs the analysis and stores its DICOM
results (:mod:`.worker`, encoding them in :mod:`.encoding`), and the typed, versioned hand-over of a slide's result to the viewer,
the demo and ``status`` (:mod:`.result`).
"""
