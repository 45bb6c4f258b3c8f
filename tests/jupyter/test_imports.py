"""``import dispynb`` stays light: Jupyter dependencies load only when used."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("IPython", "ipywidgets", "pandas", "ipykernel", "traitlets")


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
    )
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import dispynb",
        "import dispynb; dispynb.JobCluster; dispynb.LocalCluster",
        "import dispynb.jupyter",
        "import dispynb; dispynb.Run; dispynb.load_ipython_extension",
        "from dispynb.jupyter.progress import make_progress; make_progress('text')",
    ],
)
def test_import_loads_no_jupyter_dependency(code):
    assert loaded_after(code) == set()


def test_run_frame_loads_pandas_only_when_asked():
    assert loaded_after("import dispynb; dispynb.Run().df") == {"pandas"}


def test_load_ipython_extension_is_exported_lazily():
    import dispynb

    assert "load_ipython_extension" in dispynb.__all__
    assert "Run" in dir(dispynb)
