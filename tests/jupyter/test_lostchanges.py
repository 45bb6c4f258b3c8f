"""Which functions `lost_changes` reports: those that change a global of their
module in place (or rebind one declared ``global``) and return nothing."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from dispynb.jupyter.lostchanges import (
    LostChangeWarning,
    lost_changes,
    warn_lost_changes,
)

collected: list[int] = []
table: dict[int, int] = {}
total = 0
model: dict[str, int] | None = None


def appends(x):
    collected.append(x)


def sets_an_item(x):
    table[x] = x * x
    return None


def adds(x):
    global total
    total += x


def caches_and_returns(x):
    global model
    if model is None:
        model = {"k": 2}
    return model["k"] * x


def changes_its_parameter(collected):
    collected.append(1)


def changes_a_local(x):
    out = []
    out.append(x)
    table = {}
    table[x] = 1


def inner_function_changes(x):
    def helper():
        collected.append(x)

    return None


def prints(x):
    print(x)


def configures_modules_on_its_node(x):
    # A module's settings are the node's to change (a job that writes a file).
    os.environ["DISPYNB_EXAMPLE_SEED"] = str(x)
    logging.raiseExceptions = False


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (appends, ["collected"]),
        (sets_an_item, ["table"]),
        (adds, ["total"]),
        (caches_and_returns, []),
        (changes_its_parameter, []),
        (changes_a_local, []),
        (inner_function_changes, []),
        (prints, []),
        (configures_modules_on_its_node, []),
        (print, []),  # a builtin: no source
    ],
)
def test_lost_changes(func, expected):
    assert lost_changes(func) == expected


def test_the_warning_points_at_the_function_once():
    with pytest.warns(LostChangeWarning) as record:
        assert warn_lost_changes(appends) == ["collected"]
    assert record[0].filename == __file__
    assert record[0].lineno == appends.__code__.co_firstlineno
    assert str(record[0].message).startswith(
        "appends changes collected, a global of this program, and returns nothing"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_lost_changes(appends) == []  # said once per process
