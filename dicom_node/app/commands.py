"""Sub-commands that run or inspect a node: serve, worker, status."""

from __future__ import annotations

import argparse
import json
import sys

from dicom_node.settings import Settings

NODE_COMMANDS = ("serve", "worker", "status", "demo")


def add_node_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the node: SCP, router, outbox and a worker")
    p.set_defaults(func=lambda a: _serve())
    p = sub.add_parser("worker", help="run only an analysis worker (scale-out)")
    p.set_defaults(func=lambda a: _worker())
    from dicom_node.app.demo import add_demo

    add_demo(sub)
    p = sub.add_parser("status", help="studies, series, jobs and outbox of a node")
    p.add_argument("--json", action="store_true", help="print JSON (the only format so far)")
    p.set_defaults(func=_status)


def _serve() -> int:
    from dicom_node.app.node import serve

    return serve(Settings.from_env())


def _worker() -> int:
    from dicom_node.app.node import run_worker

    return run_worker(Settings.from_env())


def _status(args: argparse.Namespace) -> int:
    from dicom_node.store.overview import node_status
    from dicom_node.store.files import Store

    settings = Settings.from_env()
    if not (settings.data_dir / "index.sqlite").exists() and not settings.database_url:
        raise FileNotFoundError(f"no node index under {settings.data_dir} (set CYTONODE_DATA_DIR)")
    store = Store(settings)
    try:
        json.dump(node_status(store), sys.stdout, indent=2)
        sys.stdout.write("\n")
    finally:
        store.close()
    return 0
