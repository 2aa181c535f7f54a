"""The node runs the top of ``analysis/``; ``analysis/training/`` only builds and measures models.

A run-time module that imports a training module drags datasets, training loops and plotting
into every worker and makes the line between the two meaningless; these tests keep it real.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANALYSIS = ROOT / "analysis"

#: The node's entry points besides every module at the top of analysis/.
NODE_ENTRY_POINTS = ("dicom_node.app.cli", "dicom_node.jobs.worker", "dicom_node.app.analyze", "dicom_node.app.demo")

#: The only run-time functions that may import analysis.training (lazily, when called):
#: the handlers of ``cytonode train`` and ``cytonode evaluate``.
TRAINING_COMMANDS = {("analysis/commands.py", "run_train"), ("analysis/commands.py", "run_evaluate")}


def _run_time_modules() -> list[str]:
    return sorted(f"analysis.{p.stem}" for p in ANALYSIS.glob("*.py") if p.stem != "__init__")


def test_importing_the_node_loads_no_training_module() -> None:
    modules = [*_run_time_modules(), *NODE_ENTRY_POINTS]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from dicom_node.app.cli import build_parser\n"
        "build_parser()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('analysis.training'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing the node loaded training modules: {loaded}"


def _is_training(module: str) -> bool:
    return module == "analysis.training" or module.startswith("analysis.training.")


def _training_imports(path: Path) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of every import of analysis.training in ``path``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
                if any(_is_training(n) for n in names):
                    found.append((function, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.module:
                # "from analysis import training" imports analysis.training too.
                names = [child.module, *(f"{child.module}.{a.name}" for a in child.names)]
                if any(_is_training(n) for n in names):
                    found.append((function, child.lineno))
            visit(child, function)

    visit(ast.parse(path.read_text(), str(path)), "<module>")
    return found


def test_run_time_code_imports_training_only_in_the_training_commands() -> None:
    """Lazy imports too: only ``cytonode train`` and ``cytonode evaluate`` may reach training."""
    sources = [*ANALYSIS.glob("*.py"), *(ROOT / "dicom_node").rglob("*.py"),
               *(ROOT / "viewer").rglob("*.py")]
    offending = []
    for path in sorted(sources):
        rel = path.relative_to(ROOT).as_posix()
        for function, line in _training_imports(path):
            if (rel, function) not in TRAINING_COMMANDS:
                offending.append(f"{rel}:{line} ({function})")
    assert offending == [], "run-time code imports analysis.training: " + ", ".join(offending)


def test_training_commands_are_still_wired_to_training() -> None:
    """The allowance above is used: the two commands' handlers import the training modules."""
    used = {function for function, _ in _training_imports(ANALYSIS / "commands.py")}
    assert used == {function for _, function in TRAINING_COMMANDS}
