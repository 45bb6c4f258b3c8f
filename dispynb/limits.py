"""Checks of the limits a cluster's jobs and their results are held to: time,
memory, output and result sizes, tasks, attempts, message size, and the types a
result may be made of (`ClusterOptions`; per job, ``submit``'s ``dispy_job_*``)."""

from __future__ import annotations

import re
from typing import Any

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.errors import ConfigurationError

#: Default of ``max_output_size``: characters of stdout (and of stderr) kept per job.
DEFAULT_MAX_OUTPUT = 4 << 20

#: Default of ``max_pids``: tasks (processes and threads) a job may have at once.
DEFAULT_MAX_PIDS = 1024


def _check_setup_timeout(value: Any) -> float | None:
    """Seconds the setup function may take on a node; None (default) for no limit."""
    return _seconds_or_none(value, "setup_timeout", "no limit")


def check_job_timeout(value: Any, name: str) -> float | None:
    """Seconds a job may run (``name``: the option, for the message); None: no limit."""
    return _seconds_or_none(value, name, "no time limit")


def _seconds_or_none(value: Any, name: str, none_means: str) -> float | None:
    """``value`` as a positive, finite number of seconds, or None; else a
    `ConfigurationError` naming option ``name`` (whose None means ``none_means``)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < float("inf")
    ):
        raise ConfigurationError(
            f"{name} must be a positive number of seconds, or None for "
            f"{none_means}; got {value!r}"
        )
    return float(value)


#: Multipliers of the size suffixes `_parse_size` accepts (powers of 1024).
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: Smallest memory limit accepted: below it a Python worker cannot even run a job.
MIN_MEM_LIMIT = 32 << 20


def _parse_size(value: Any) -> int | None:
    """An int as it is, or bytes from ``"512M"``-style text; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(
            r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", value.upper()
        )
        if match is not None:
            return int(float(match[1]) * _SIZE_UNITS[match[2]])
    return None


def check_mem_limit(value: Any, name: str) -> int | None:
    """Bytes a job's worker may map, from an int or ``"512M"``-style text; or None."""
    if value is None:
        return None
    size = _parse_size(value)
    if size is None:
        raise ConfigurationError(
            f"{name} must be a number of bytes or a size such as '512M' or '2G' "
            f"(K, M, G, T: powers of 1024), or None for no limit; got {value!r}"
        )
    if size < MIN_MEM_LIMIT:
        raise ConfigurationError(
            f"{name} of {size} bytes is too small for a Python worker to run a job: "
            f"give at least {MIN_MEM_LIMIT >> 20}M, or None for no limit"
        )
    return size


def check_size(value: Any, name: str) -> int | None:
    """A size in bytes (or characters) from an int or ``"4M"``-style text; or None."""
    if value is None:
        return None
    size = _parse_size(value)
    if size is None or size < 0:
        raise ConfigurationError(
            f"{name} must be a number of bytes or a size such as '4M' or '1G' "
            f"(K, M, G, T: powers of 1024), or None for no limit; got {value!r}"
        )
    return size


_GLOBAL_NAME = re.compile(r"[A-Za-z_][\w.]*\.(\*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)")


def _check_result_types(value: Any) -> list[str] | None:
    """None, or a list of ``"module.name"`` / ``"module.*"`` strings."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset) or not all(
        isinstance(item, str) and _GLOBAL_NAME.fullmatch(item) for item in items
    ):
        raise ConfigurationError(
            "result_types must be a list of names such as 'numpy.ndarray', "
            "'mymodule.Point' or 'pandas.*' (a whole module), or None; "
            f"got {value!r}"
        )
    return sorted(items)


def _check_max_pids(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigurationError(
            "max_pids must be an int >= 2 (tasks a job may have at once: its worker "
            f"and what it starts), or None for no limit; got {value!r}"
        )
    return value


def _check_max_attempts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"max_attempts must be an int >= 1 (attempts of a job that may die with "
            f"their node before it is abandoned), not {value!r}"
        )
    return value


def _check_message_size(value: Any) -> int:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= PRE_AUTH_MAX_FRAME
    ):
        return value
    raise ConfigurationError(
        f"max_message_size must be a number of bytes, at least {PRE_AUTH_MAX_FRAME}; "
        f"got {value!r}"
    )
