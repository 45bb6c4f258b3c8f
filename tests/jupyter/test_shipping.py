"""Large objects captured by shipped functions: found, measured once, warned once."""

from __future__ import annotations

import linecache
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from dispynb.jupyter import shipping
from dispynb.jupyter.run import Run
from dispynb.jupyter.shipping import (
    LargeCaptureWarning,
    large_captures,
    reachable,
    warn_large_captures,
)
from tests.jupyter.shell import shell_on

MB = 1 << 20


@pytest.fixture(autouse=True)
def _fresh_warning_registry() -> Iterator[None]:
    shipping._warned.clear()
    yield
    shipping._warned.clear()


def define(source: str, name: str, **namespace: Any) -> Any:
    """Define functions as a notebook cell does: in ``__main__``-like globals, with
    the source in `linecache`; return ``name`` from them."""
    filename = f"<test-cell-{id(source)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope: dict[str, Any] = {"__name__": "__main__", **namespace}
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


# --- pure ------------------------------------------------------------------------


def test_reachable_finds_closures_globals_defaults_class_attributes_and_helpers():
    compute = define(
        "import math\n"
        "class Model:\n"
        "    weights = [1, 2]\n"
        "    def apply(self, x):\n        return x * scale\n"
        "def helper(x):\n    return x + offset\n"
        "def make():\n"
        "    table = {'a': 1}\n"
        "    def compute(x, factor=3):\n"
        "        return math.sqrt(helper(x)) * factor + Model().apply(len(table))\n"
        "    return compute\n"
        "compute = make()\n",
        "compute",
        offset=7,
        scale=2,
    )

    found = reachable(compute)

    values = {(name, kind, owner) for name, kind, owner, _ in found.values}
    assert values == {
        ("table", "closure variable", "make.<locals>.compute"),
        ("factor", "default argument", "make.<locals>.compute"),
        ("offset", "global", "helper"),
        ("scale", "global", "Model.apply"),
        ("Model.weights", "class attribute", "Model"),
    }
    assert {f.__qualname__ for f in found.functions} == {
        "make.<locals>.compute",
        "helper",
        "Model.apply",
    }
    assert [c.__name__ for c in found.classes] == ["Model"]  # math: a module, skipped


def test_reachable_does_not_follow_importable_functions():
    found = reachable(np.sum)

    assert found.functions == [] and found.values == []


def test_small_function_is_pickled_once_and_not_dissected(monkeypatch):
    calls: list[object] = []
    real = shipping.pickled_size

    def counting(obj: object) -> int | None:
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(shipping, "pickled_size", counting)
    compute = define("def compute(x):\n    return x + small\n", "compute", small=5)

    total, captures = large_captures(compute)

    assert captures == []
    assert total is not None and total < 10_000
    assert calls == [compute]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"x" * (2 * MB), "bytes"),
        (list(range(400_000)), "list"),
        (np.zeros(300_000), "array"),
        (pd.DataFrame({"a": np.arange(200_000), "b": np.ones(200_000)}), "frame"),
    ],
)
def test_large_global_is_named_with_its_size(value, kind):
    compute = define("def compute(i):\n    return len(data)\n", "compute", data=value)

    total, captures = large_captures(compute)

    [capture] = captures
    assert (capture.name, capture.kind, capture.owner) == ("data", "global", "compute")
    assert capture.size >= MB
    assert total is not None and total >= capture.size


def test_large_closure_and_default_are_named_small_ones_are_not():
    compute = define(
        "def make(big):\n"
        "    small = [1, 2, 3]\n"
        "    def compute(x, lookup=bytes(3 << 20)):\n"
        "        return big[x] + small[0] + lookup[0]\n"
        "    return compute\n",
        "make",
    )(np.ones(200_000))

    _, captures = large_captures(compute)

    assert [(c.name, c.kind) for c in captures] == [
        ("lookup", "default argument"),
        ("big", "closure variable"),
    ]


def test_many_medium_values_adding_up_name_the_largest_three():
    parts = {f"part{i}": bytes(300_000 + i) for i in range(5)}
    body = " + ".join(f"len(part{i})" for i in range(5))
    compute = define(f"def compute(x):\n    return {body}\n", "compute", **parts)

    total, captures = large_captures(compute)

    assert total is not None and total > MB
    assert [c.name for c in captures] == ["part4", "part3", "part2"]


def test_warning_names_the_variable_and_how_to_send_it_once_and_comes_once():
    compute = define("def compute(i):\n    return blob[i]\n", "compute", blob=bytes(MB))

    with pytest.warns(LargeCaptureWarning) as record:
        warned = warn_large_captures(compute)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_large_captures(compute) == []  # once per function and object

    [capture] = warned
    assert capture.name == "blob"
    [warning] = record
    assert (warning.filename, warning.lineno) == (compute.__code__.co_filename, 1)
    message = str(warning.message)
    assert "compute (computation) takes 1.0 MB pickled" in message
    assert "captures blob (global, 1.0 MB)" in message
    assert "depends=[...]" in message and "--depends" in message
    assert "setup" in message and "as an argument" in message


def test_programs_and_none_are_not_checked():
    assert warn_large_captures("/bin/true") == []
    assert warn_large_captures(None) == []


# --- on nodes --------------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_run_map_warns_once_for_a_big_closure_and_still_runs(local):
    def make(table: bytes) -> Any:
        def first_bytes(i: int) -> int:
            return table[i]

        return first_bytes

    compute = make(bytes(range(256)) * 8192)  # 2 MB

    with pytest.warns(LargeCaptureWarning, match=r"captures table \(closure variable"):
        run = Run.map(compute, range(3), nodes=local, progress="none")

    assert run.results == [0, 1, 2]


@pytest.fixture(scope="module")
def ip(local) -> Iterator[InteractiveShell]:
    with shell_on(local) as shell:
        yield shell


@slow
def test_magic_warns_about_a_big_global_of_the_cell(ip):
    ip.run_cell("samples = list(range(300_000))")

    with capture_output(), pytest.warns(LargeCaptureWarning) as record:
        ip.run_cell_magic(
            "dispy",
            '--over "[0, 5]" --into picked',
            "def pick(i):\n    return samples[i]\n",
        )

    assert ip.user_ns["picked"].results == [0, 5]
    [warning] = record
    assert "pick (computation)" in str(warning.message)
    assert "captures samples (global" in str(warning.message)
