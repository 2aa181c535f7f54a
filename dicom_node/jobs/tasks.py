"""Analysis jobs as Celery tasks. The job row in the index is the record; the task carries its id.

Embedded default: a broker on the local file system under the data directory
(kombu's ``filesystem://`` transport) and a worker child process started by
``cytonode serve``. ``CYTONODE_BROKER_URL=redis://...`` takes the same path.
"""

from __future__ import annotations

import logging

from celery import Celery

from dicom_node.settings import Settings

log = logging.getLogger(__name__)

app = Celery("cytonode")
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="cytonode",
)

_settings: Settings | None = None


def configure_celery(settings: Settings) -> Celery:
    """Point the Celery app at the node's broker; call once per process."""
    global _settings
    _settings = settings
    url = settings.effective_broker_url
    conf: dict[str, object] = {"broker_url": url}
    if url.startswith("filesystem"):
        folder = settings.broker_dir.resolve()
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
        # The file-system transport has no fan-out exchange for remote control.
        conf["worker_enable_remote_control"] = False
    app.conf.update(conf)
    return app


def current_settings() -> Settings:
    if _settings is None:
        raise RuntimeError("configure_celery() was not called in this process")
    return _settings


@app.task(name="cytonode.analyse_series")  # type: ignore[untyped-decorator]
def analyse_series(job_id: int) -> None:
    """Celery task: run job ``job_id`` (see :func:`dicom_node.jobs.worker.run_job`)."""
    from dicom_node.store.files import Store
    from dicom_node.jobs.worker import run_job

    store = Store(current_settings())
    try:
        run_job(store, job_id)
    finally:
        store.close()


def dispatch(job_id: int) -> None:
    """Send the task of job ``job_id`` to the broker."""
    analyse_series.apply_async(args=(job_id,))
