"""The node's platform string is `platform.platform()`, without its subprocess."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from nodeserver import platforminfo
from nodeserver.platforminfo import node_platform


def test_node_platform_is_platform_platform() -> None:
    assert node_platform() == platform.platform()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's string")
def test_node_platform_runs_no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    node_platform.cache_clear()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("node_platform started a process")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    try:
        assert node_platform().startswith("Linux-")
    finally:
        node_platform.cache_clear()


@pytest.mark.parametrize(
    "parts",
    [
        ("Linux", "6.1 (x)", "x86_64", "with", ""),
        ("Linux", "unknown", "", "a/b;c:d"),
        ("Linux", "6.1", "x86_64", "with", "glibc2.36"),
    ],
)
def test_join_cleans_as_platform_does(parts: tuple[str, ...]) -> None:
    # The standard library's own helper (private, so only compared here).
    assert platforminfo._join(*parts) == platform._platform(*parts)  # type: ignore[attr-defined]
