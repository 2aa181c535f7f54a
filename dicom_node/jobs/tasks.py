"""Analysis jobs as Celery tasks. The job row in the index is the record; the task carries its id.

Embedded default: a broker on the local file system under the data directory
(kombu's ``filesystem://`` transport) and a worker child process started by
``cytonode serve``. ``CYTONODE_BROKER_URL=redis://...`` takes the same path.

The node's :class:`~dicom_node.settings.Settings` travel on the Celery app
(:attr:`NodeCelery.settings`, set by :func:`configure_celery`); a task reads them from its own
app (``self.app``).
"""

from __future__ import annotations

import logging

from celery import Celery, Task

from dicom_node.settings import Settings

log = logging.getLogger(__name__)


class NodeCelery(Celery):  # type: ignore[misc]
    """The node's Celery app; it carries the settings its tasks run on."""

    #: Set by :func:`configure_celery`; ``None`` until then.
    settings: Settings | None = None

    def node_settings(self) -> Settings:
        """The settings :func:`configure_celery` gave this app."""
        if self.settings is None:
            raise RuntimeError("configure_celery() was not called in this process")
        return self.settings


app = NodeCelery("cytonode")
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="cytonode",
)

def configure_celery(settings: Settings) -> NodeCelery:
    """Point the Celery app at the node's broker and hand it ``settings``; call once per process."""
    app.settings = settings
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


@app.task(name="cytonode.analyse_series", bind=True)  # type: ignore[untyped-decorator]
def analyse_series(self: Task, job_id: int) -> None:
    """Celery task: run job ``job_id`` (see :func:`dicom_node.jobs.worker.run_job`)."""
    from dicom_node.jobs.worker import run_job
    from dicom_node.store.files import Store

    store = Store(self.app.node_settings())
    try:
        run_job(store, job_id)
    finally:
        store.close()


def dispatch(job_id: int) -> None:
    """Send the task of job ``job_id`` to the broker."""
    analyse_series.apply_async(args=(job_id,))
