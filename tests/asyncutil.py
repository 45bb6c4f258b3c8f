"""Run a coroutine from a synchronous test with a hard time limit (no plugin)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
    """``asyncio.run(asyncio.wait_for(coro, timeout))``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
