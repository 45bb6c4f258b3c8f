"""Checks of how a cluster reaches its nodes: the client's addresses, dispy's
port and intervals, and the TLS files."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from dispynb.defaults import PULSE_RANGE
from dispynb.errors import ConfigurationError

#: Allowed ranges (seconds) of dispy's intervals.
_INTERVAL_RANGES: dict[str, tuple[float, float]] = {
    "ping_interval": (1, 1000),
    "pulse_interval": PULSE_RANGE,
    "poll_interval": (5, 1000),
}


def _check_hosts(value: Any, name: str) -> str | list[str] | None:
    """Accept None, an address, or a list of addresses (copied)."""
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list | tuple) and all(
        isinstance(item, str) and item for item in value
    ):
        return list(value)
    raise ConfigurationError(
        f"{name} must be a host name or IP address, or a list of them; got {value!r}"
    )


def _check_port(value: Any, name: str = "dispy_port", lowest: int = 1) -> int | None:
    if value is None:
        return None
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and lowest <= value < 65536
    ):
        return value
    raise ConfigurationError(
        f"{name} must be a TCP port number from {lowest} to 65535, or None; got "
        f"{value!r}"
    )


def _check_interval(value: Any, name: str) -> float | None:
    if value is None:
        return None
    low, high = _INTERVAL_RANGES[name]
    if isinstance(value, str):  # dispy float()s it: "10" from a config file works
        with contextlib.suppress(ValueError):
            value = float(value)
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and low <= value <= high
    ):
        return float(value)
    raise ConfigurationError(
        f"{name} must be between {low} and {high} seconds, or None; got {value!r}"
    )


def _check_pem_file(value: Any, name: str) -> str | None:
    """Accept None or the path of an existing file; return it made absolute."""
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(
            f"{name} must be the path of a PEM file; got a {type(value).__name__}"
        )
    path = os.path.expanduser(os.fspath(value))
    if not os.path.isfile(path):
        raise ConfigurationError(
            f"{name} {path!r} does not exist: give the path of an existing PEM file"
        )
    return os.path.abspath(path)
