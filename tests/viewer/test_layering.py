"""The viewer reads the node's tables (studies, series, instances, jobs, outbox) only through the
store's query API (dicom_node.store.queries): no viewer module imports the index module, names
one of its table classes, or writes SQL on one of its tables. The viewer's own tables
(viewer/models.py) stay the viewer's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dicom_node.store import index
from viewer import models

VIEWER = Path(__file__).resolve().parents[2] / "viewer"
INDEX_MODULE = "dicom_node.store.index"

#: The node's table classes and table names, read from the index itself (so a new table counts).
NODE_CLASSES = {name for name, obj in vars(index).items()
                if isinstance(obj, type) and issubclass(obj, index.Base) and obj is not index.Base
                and obj.__module__ == INDEX_MODULE}
NODE_TABLES = {getattr(index, name).__tablename__ for name in NODE_CLASSES}
_TABLE_NAMES = "|".join(sorted(NODE_TABLES))
_SQL_ON_TABLE = re.compile(rf"\b(?:from|join|update|into|table)\s+\"?({_TABLE_NAMES})\b",
                           re.IGNORECASE)


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Where ``source`` reaches the node's tables other than through the query API."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names
                      if a.name == INDEX_MODULE or a.name.startswith(INDEX_MODULE + ".")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == INDEX_MODULE:
                found.append(f"{where}: imports from {module}")
            elif module == "dicom_node.store" and any(a.name == "index" for a in node.names):
                found.append(f"{where}: imports {INDEX_MODULE}")
            elif module.startswith("dicom_node"):
                found += [f"{where}: imports the node table {a.name} from {module}"
                          for a in node.names if a.name in NODE_CLASSES]
        elif isinstance(node, ast.Attribute) and node.attr in NODE_CLASSES:
            found.append(f"{where}: uses the node table {node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _SQL_ON_TABLE.search(node.value)
            if match:
                found.append(f"{where}: SQL on the node table {match.group(1)}")
    return found


def test_the_node_tables_are_known() -> None:
    assert {"Study", "Series", "Instance", "Job", "OutboxItem"} <= NODE_CLASSES
    assert {"studies", "series", "instances", "jobs", "outbox"} <= NODE_TABLES
    # the viewer's tables are not counted as the node's
    assert not {models.User.__tablename__, models.CellEdit.__tablename__} & NODE_TABLES


@pytest.mark.parametrize("source", [
    "from dicom_node.store.index import Instance\n",
    "import dicom_node.store.index as idx\n",
    "from dicom_node.store import index\n",
    "from dicom_node.store.files import Series\n",
    "def f(store):\n    from dicom_node.store import index\n",
    "x = something.Job.state\n",
    "q = text('SELECT * FROM instances WHERE 1')\n",
])
def test_the_check_finds_each_way_in(source: str) -> None:
    assert violations(source)


def test_the_check_leaves_the_query_api_and_the_viewer_tables_alone() -> None:
    assert violations("from dicom_node.store import queries\n"
                      "from viewer.models import CaseVersion, CellEdit\n"
                      "rows = queries.worklist_cases(store)\n"
                      "label = 'the series of the case'\n") == []


def test_no_viewer_module_reaches_the_node_tables() -> None:
    files = sorted(VIEWER.glob("*.py"))
    assert files, VIEWER
    found = [v for path in files for v in violations(path.read_text(), path.name)]
    assert found == []
