"""Shared fixtures: unexpected ERROR log records fail a test; no leftover children."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psutil
import pytest


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def allow_error_logs() -> list[logging.LogRecord]:
    """Request this in a test that expects ERROR log records; returns them."""
    return _current.records if _current is not None else []


_current: _ErrorRecords | None = None


@pytest.fixture(autouse=True)
def _fail_on_error_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    global _current
    handler = _current = _ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        _current = None
    if "allow_error_logs" not in request.fixturenames and handler.records:
        lines = [f"{r.name}: {r.getMessage()}" for r in handler.records]
        pytest.fail("unexpected ERROR log records:\n" + "\n".join(lines))


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    """Every process a test starts (nodes, computations, workers) must be gone."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    if not left:
        return
    _gone, alive = psutil.wait_procs(left, timeout=10)
    names = []
    for proc in alive:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    if names:
        pytest.fail(f"processes left running after the test: {names}")
