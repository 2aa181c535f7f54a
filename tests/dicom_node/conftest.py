from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import NodeProcess


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[object]:
    """Factory: ``start_node(**settings)`` starts ``cytonode serve``; all are stopped at the end."""
    nodes: list[NodeProcess] = []

    def factory(name: str = "node", **settings: object) -> NodeProcess:
        node = NodeProcess(tmp_path / name, **settings)
        nodes.append(node)
        return node.start()

    yield factory
    for node in nodes:
        node.cleanup()
