from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import InProcessSCP, NodeProcess


def _servers(tmp_path: Path, kind: Any, stop: str) -> Iterator[Any]:
    """Factory of ``kind(tmp_path / name, **settings).start()``; each is stopped (``stop``) at
    the end."""
    started: list[Any] = []

    def factory(name: str = "node", **settings: object) -> Any:
        server = kind(tmp_path / name, **settings)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        getattr(server, stop)()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[object]:
    """Factory: ``start_node(**settings)`` starts ``cytonode serve``; all are stopped at the end."""
    yield from _servers(tmp_path, NodeProcess, "cleanup")


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[object]:
    """Factory: ``start_scp(**settings)`` serves the node's SCP from this process
    (:class:`tests.peers.InProcessSCP`); all are stopped at the end."""
    yield from _servers(tmp_path, InProcessSCP, "stop")
