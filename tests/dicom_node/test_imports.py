"""Import arrows between the packages: ``viewer -> dicom_node -> analysis``, and only
:mod:`dicom_node.app` (the process wiring) reaches back up into :mod:`viewer`.

Lazy imports inside functions count too: the files are read with :mod:`ast`, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, packages: tuple[str, ...]) -> list[str]:
    """``file:line module`` of every import in ``path`` of one of ``packages`` (or below)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            if module.split(".")[0] in packages:
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {module}")
    return found


def test_only_the_app_package_of_dicom_node_imports_the_viewer() -> None:
    app = ROOT / "dicom_node" / "app"
    offending = [hit for path in sorted((ROOT / "dicom_node").rglob("*.py"))
                 if app not in path.parents for hit in _imports(path, ("viewer",))]
    assert offending == [], "dicom_node imports viewer outside dicom_node/app/: " + ", ".join(offending)


def test_the_app_package_still_wires_the_viewer() -> None:
    """The allowance above is used: the app builds the web application from the viewer."""
    app = ROOT / "dicom_node" / "app"
    assert [hit for path in sorted(app.glob("*.py")) for hit in _imports(path, ("viewer",))]


def test_analysis_imports_neither_the_node_nor_the_viewer() -> None:
    offending = [hit for path in sorted((ROOT / "analysis").rglob("*.py"))
                 for hit in _imports(path, ("dicom_node", "viewer"))]
    assert offending == [], "analysis imports the node or the viewer: " + ", ".join(offending)
