"""Layering: the core never depends on the Jupyter layer (design, "Shape").

``dispynb/jupyter/`` may import the core; no other module of ``dispynb`` (nor
``nodeserver``) imports ``dispynb.jupyter``, so that ``import dispynb`` and the
core's own notebook displays (``_repr_html_`` of jobs and clusters) never load it,
nor IPython, ipywidgets or pandas.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JUPYTER = "dispynb.jupyter"
HEAVY = ("IPython", "ipywidgets", "pandas", "ipykernel", "traitlets", JUPYTER)

#: The package's front door names the layer's entry points, lazily: ``%load_ext
#: dispynb`` needs ``dispynb.load_ipython_extension``, and ``dispynb.Run`` is public.
FRONT_DOOR = {
    ROOT / "dispynb" / "__init__.py": {
        "dispynb.jupyter",
        "dispynb.jupyter.load_ipython_extension",
        "dispynb.jupyter.unload_ipython_extension",
        "dispynb.jupyter.run",
        "dispynb.jupyter.run.Run",
    }
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def named_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module (or module.name) ``path`` imports, or names in a string (lazy
    import tables); ``root`` is the directory of the top-level packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).rsplit(
        ".", 0 if path.name == "__init__.py" else 1
    )[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and str(node.value).startswith(JUPYTER):
            names.add(str(node.value))
    return names


def core_modules() -> list[Path]:
    files = sorted((ROOT / "dispynb").rglob("*.py")) + sorted(
        (ROOT / "nodeserver").rglob("*.py")
    )
    return [p for p in files if (ROOT / "dispynb" / "jupyter") not in p.parents]


def test_the_scan_sees_every_way_of_naming_the_layer(tmp_path):
    """The checker itself: each spelling of an import of the layer is caught."""
    package = tmp_path / "dispynb"
    package.mkdir()
    spellings = [
        "import dispynb.jupyter.display",
        "from dispynb.jupyter import display",
        "from dispynb import jupyter",
        "from .jupyter.display import job_html",
        "importlib.import_module('dispynb.jupyter.run')",
    ]
    for index, line in enumerate(spellings):
        module = package / f"m{index}.py"
        module.write_text(line + "\n")
        found = named_modules(module, root=tmp_path)
        assert any(n.startswith(JUPYTER) for n in found), line


def test_no_core_module_imports_the_jupyter_layer():
    offenders = {}
    for path in core_modules():
        allowed = FRONT_DOOR.get(path, set())
        found = {
            name
            for name in named_modules(path)
            if (name == JUPYTER or name.startswith(JUPYTER + "."))
            and name not in allowed
        }
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert offenders == {}, (
        "the core must not import the Jupyter layer; move what it needs into the "
        f"core (HTML of core objects: dispynb/reprs.py): {offenders}"
    )


def loaded_after(code: str) -> set[str]:
    """Which of `HEAVY` a fresh interpreter has imported after running ``code``."""
    probe = (
        f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    )
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import dispynb",
        "import dispynb; dispynb.JobCluster; dispynb.Executor; dispynb.DispyJob",
        "from dispynb.job import DispyJob\n"
        "assert 'dispynb-job' in DispyJob(None, (), {})._repr_html_()",
    ],
)
def test_the_core_and_its_displays_load_no_jupyter_code(code):
    assert loaded_after(code) == set()


#: The client's event loops: the one I/O loop, and the web monitor's own (so that
#: browsers never slow the I/O loop), as `dispynb._loop` says.
LOOP_OWNERS = {ROOT / "dispynb" / "_loop.py", ROOT / "dispynb" / "httpd" / "server.py"}
LOOP_MAKERS = {"run", "new_event_loop", "Runner", "run_until_complete"}
#: Functions of dispynb that run only in a node's job process, never in the client:
#: the executor's runner runs an async function's coroutine there (asyncio.run).
NODE_SIDE = {ROOT / "dispynb" / "executorrunner.py": {"dispynb_executor"}}


def loop_makers(path: Path) -> list[str]:
    """Calls in ``path`` that start an event loop (``asyncio.run`` and kin),
    outside its `NODE_SIDE` functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = {
        id(inner)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        and function.name in NODE_SIDE.get(path, ())
        for inner in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in skipped:
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in LOOP_MAKERS:
            owner = func.value
            if func.attr == "run_until_complete" or (
                isinstance(owner, ast.Name) and owner.id == "asyncio"
            ):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(func)}")
    return found


def test_the_client_runs_no_event_loop_but_its_own():
    """Client code runs on the one I/O loop (`dispynb._loop`): no module starts
    another (``asyncio.run`` fails under a notebook's running loop, and a second
    loop in a thread doubles the machinery)."""
    files = [
        p for p in sorted((ROOT / "dispynb").rglob("*.py")) if p not in LOOP_OWNERS
    ]
    found = [call for path in files for call in loop_makers(path)]
    assert found == [], f"event loops started outside dispynb/_loop.py: {found}"
