"""Remote tracebacks re-rendered to point at the cell (or file) of the shipped code."""

from __future__ import annotations

import linecache
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.run import Run
from dispynb.jupyter.tracebacks import SourceMap, rerender_traceback
from tests.jupyter import helpers
from tests.jupyter.shell import shell_on

CELLS: list[str] = []


def cell(name: str, source: str) -> dict[str, Any]:
    """Run ``source`` as a notebook cell named ``name`` (its source in linecache)."""
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    CELLS.append(name)
    scope: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, name, "exec"), scope)
    return scope


@pytest.fixture(autouse=True)
def _forget_cells() -> Iterator[None]:
    yield
    while CELLS:
        linecache.cache.pop(CELLS.pop(), None)


def remote(*frames: tuple[int, str], error: str = "ZeroDivisionError: boom") -> str:
    """A traceback as a node sends it for code sent by value."""
    lines = ["Traceback (most recent call last):\n"]
    lines += [f'  File "<dynamic-code>", line {n}, in {name}\n' for n, name in frames]
    return "".join(lines) + error + "\n"


def test_frames_of_cell_code_show_the_cell_file_and_line():
    scope = cell(
        "<cell-1>",
        "def helper(x):\n    return 1 / x\n\ndef compute(x):\n    y = x\n"
        "    return helper(y)\n",
    )

    text = rerender_traceback(remote((6, "compute"), (2, "helper")), scope["compute"])

    assert text == (
        "Traceback (most recent call last):\n"
        '  File "<cell-1>", line 6, in compute\n'
        "    return helper(y)\n"
        '  File "<cell-1>", line 2, in helper\n'
        "    return 1 / x\n"
        "ZeroDivisionError: boom\n"
    )


def test_nested_functions_lambdas_and_methods_are_matched():
    scope = cell(
        "<cell-2>",
        "class Box:\n"
        "    def open(self, x):\n        return [1 / v for v in x]\n"
        "def outer(x):\n"
        "    def inner(v):\n        return Box().open(v)\n"
        "    return inner(x)\n",
    )

    # A comprehension has a frame of its own up to Python 3.11 (PEP 709 inlines it).
    frames = [(7, "outer"), (6, "inner"), (3, "open")]
    frames += [(3, "<listcomp>")] if sys.version_info < (3, 12) else []
    text = SourceMap.of(scope["outer"]).rerender(remote(*frames))

    assert "<dynamic-code>" not in text
    assert text.count('"<cell-2>"') == len(frames)
    assert "        return Box().open(v)" not in text  # re-indented as a traceback
    assert "    return [1 / v for v in x]\n" in text


def test_ambiguous_unknown_or_out_of_range_frames_are_left_alone():
    first = cell("<cell-3>", "def f(x):\n    return 1 / x\n")["f"]
    second = cell("<cell-4>", "def f(x):\n    return x.missing\n")["f"]
    sources = SourceMap.of(first, second)
    original = remote((2, "f"), (9, "g"))
    only_first = SourceMap.of(first)

    assert sources.rerender(original) == original  # two f with a line 2: ambiguous
    assert only_first.rerender(remote((9, "g"))) == remote((9, "g"))  # unknown
    assert only_first.rerender(remote((5, "f"))) == remote((5, "f"))  # no line 5


def test_code_without_source_is_never_rewritten():
    scope: dict[str, Any] = {}
    exec(compile("def f(x):\n    return 1 / x\n", "<nowhere>", "exec"), scope)

    assert len(SourceMap.of(scope["f"])) == 0
    assert rerender_traceback(remote((2, "f")), scope["f"]) == remote((2, "f"))


def test_a_source_line_already_there_is_not_repeated_and_other_frames_kept():
    f = cell("<cell-5>", "def f(x):\n    return 1 / x\n")["f"]
    text = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/json/__init__.py", line 346, in loads\n'
        "    return _default_decoder.decode(s)\n"
        '  File "<dynamic-code>", line 2, in f\n'
        "    return 1 / x\n"
        "ZeroDivisionError: boom\n"
    )

    assert SourceMap.of(f).rerender(text) == text.replace("<dynamic-code>", "<cell-5>")


def test_source_is_kept_when_the_cell_leaves_linecache():
    f = cell("<cell-6>", "def f(x):\n    return 1 / x\n")["f"]
    sources = SourceMap.of(f)
    linecache.cache.pop("<cell-6>")

    assert "    return 1 / x\n" in sources.rerender(remote((2, "f")))


def test_empty_and_plain_tracebacks_pass_through():
    sources = SourceMap()

    assert sources.rerender(None) == ""
    assert sources.rerender("ValueError: x\n") == "ValueError: x\n"


# --- on nodes --------------------------------------------------------------------


@pytest.mark.slow
def test_run_prints_module_code_failures_with_their_file_and_lines(local, capsys):
    run = Run.map(helpers.fail_in_helper, [1], nodes=local, progress="none")

    [job] = run.failures
    # The cluster already put the file and lines back (dispynb.tracebacks).
    assert job.exception == run.traceback(job)
    text = run.traceback(job)
    assert f'File "{helpers.__file__}", line' in text
    assert "in fail_in_helper\n    return _divide(x, 0)\n" in text
    assert "in _divide\n    return a / b\n" in text
    assert "<dynamic-code>" not in text
    err = capsys.readouterr().err
    assert "return _divide(x, 0)" in err
    assert "return a / b" in run._repr_html_()


@pytest.fixture(scope="module")
def ip(local) -> Iterator[InteractiveShell]:
    with shell_on(local) as shell:
        yield shell


@pytest.mark.slow
def test_magic_cell_failure_points_at_the_cells_lines(ip):
    with capture_output() as captured, pytest.raises(MagicError, match="failed"):
        ip.run_cell_magic(
            "dispy",
            '--over "[0]" --into broken',
            (
                "def ratio(x):\n"
                "    return 10 / x\n"
                "\n"
                "def compute(x):\n"
                "    scaled = x * 2\n"
                "    return ratio(scaled)\n"
            ),
        )

    err = captured.stderr
    assert "<dynamic-code>" not in err
    assert ", line 6, in compute\n    return ratio(scaled)\n" in err
    assert ", line 2, in ratio\n    return 10 / x\n" in err
    assert "Cell In[" in err or "<ipython-input-" in err
    assert "ZeroDivisionError: division by zero" in err
