"""The façade's layering (DESIGN.md decision 11): `JobCluster` knows no wire format.

``dispynb/cluster.py`` (with its parts, ``dispynb/_cluster*.py``) is dispy's
façade; the engine binding lives in ``dispynb/backends/``. The façade must not
import the wire (``protocol``), the connections (``transport``) or the scheduler,
not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dispynb

FORBIDDEN = ("dispynb.protocol", "dispynb.transport", "dispynb.scheduler", "nodeserver")
PACKAGE = Path(dispynb.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from X import y``: X.y too)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def offending(modules: set[str]) -> list[str]:
    return sorted(
        m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    )


def test_cluster_facade_imports_no_wire_transport_or_scheduler():
    facade = [PACKAGE / "cluster.py", *sorted(PACKAGE.glob("_cluster*.py"))]
    assert len(facade) > 1  # JobCluster's parts (_clusterjobs.py, ...) are seen
    assert {p.name: offending(imported_modules(p)) for p in facade} == {
        p.name: [] for p in facade
    }


def test_backend_protocol_module_imports_no_engine_either():
    assert offending(imported_modules(PACKAGE / "backends" / "base.py")) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from dispynb.scheduler import driver\n"
        "import dispynb.protocol.messages\nfrom dispynb import transport\n"
    )
    assert offending(imported_modules(probe)) == [
        "dispynb.protocol.messages",
        "dispynb.scheduler",
        "dispynb.scheduler.driver",
        "dispynb.transport",
    ]


def constructed_classes(path: Path) -> set[str]:
    """Names of the classes or functions ``path`` calls (``X(...)``, ``m.X(...)``)."""
    called: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                called.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                called.add(node.func.attr)
    return called


def test_layers_above_the_facade_ask_a_factory_for_their_clusters():
    """The Jupyter layer and the Executor never construct `JobCluster` (nor an
    engine's class): they pass an engine to a cluster factory (DESIGN.md 11)."""
    above = [*sorted((PACKAGE / "jupyter").glob("*.py")), PACKAGE / "executor.py"]
    constructing = {
        str(path.relative_to(PACKAGE)): called & {"JobCluster", "SharedJobCluster"}
        for path in above
        if (called := constructed_classes(path)) & {"JobCluster", "SharedJobCluster"}
    }
    assert constructing == {}
