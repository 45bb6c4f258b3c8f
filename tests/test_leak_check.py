"""The leak check every test runs (`tests/conftest.py`): what it counts as left open."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests import conftest


def test_an_engines_socket_stays_allowed_while_another_closes_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `allow_engine_sockets` (Ray's driver), a socket of the engine's that
    stays open is not a leak, also when another one closes between the check's
    listing and its look at it (Ray's threads close the connections of the actors
    a cluster ended): before, the descriptor that closed meanwhile made the check
    wait for the rest without the allowance, and it reported the socket that stayed
    (tests/backends/test_ray.py in CI: "descriptors left open: 43 -> socket:[...]").
    """
    before = conftest._open_fds()
    with socket.socket() as stays:
        closing = socket.socket()
        closing_fd = closing.fileno()
        readlink = os.readlink

        def look(path: str) -> str:
            if path == f"/proc/self/fd/{closing_fd}" and closing.fileno() != -1:
                closing.close()  # closed by another thread just now
            return readlink(path)

        monkeypatch.setattr(os, "readlink", look)
        deadline = time.monotonic() + 3.0
        assert conftest.fds_left_open(before, True, deadline) == []
        monkeypatch.undo()
        assert closing.fileno() == -1
        # Not allowed: the socket that stays is a leak.
        left = conftest.fds_left_open(before, False, time.monotonic())
        assert left == [
            f"{stays.fileno()} -> {os.readlink(f'/proc/self/fd/{stays.fileno()}')}"
        ]


def test_a_file_left_open_is_a_leak_even_with_the_engines_allowance(
    tmp_path: Path,
) -> None:
    before = conftest._open_fds()
    with open(tmp_path / "left", "w") as handle:
        left = conftest.fds_left_open(before, True, time.monotonic())
        assert left == [f"{handle.fileno()} -> {tmp_path / 'left'}"]
    assert conftest.fds_left_open(before, True, time.monotonic()) == []
