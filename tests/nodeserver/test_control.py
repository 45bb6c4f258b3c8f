"""`nodeserver.control.ControlChannel`: the node's end of a computation process's
control socket, on a real socket pair."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from dispynb.defaults import MAX_MESSAGE_SIZE
from nodeserver.control import ControlChannel
from nodeserver.ipc import Shutdown
from tests.asyncutil import run


def test_a_process_that_exits_without_reading_our_message_is_a_quiet_eof(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A computation process whose setup failed sends LoadFailed and exits, often
    before reading the Shutdown the node sent meanwhile: the kernel then resets the
    connection, and the node's read gets ECONNRESET. That is the process's end (as
    EOF), not a warning: 'control channel read failed: [Errno 104] Connection reset
    by peer' came after every failed %%dispy --setup, printed in the notebook's
    cell by a %dispy local node."""
    node_end, process_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def main() -> None:
        closed = asyncio.Event()
        channel = ControlChannel(
            node_end,
            lambda message, buffers, fd: None,
            closed.set,
            MAX_MESSAGE_SIZE,
        )
        await channel.send(Shutdown())
        process_end.close()  # exits with our message unread
        await asyncio.wait_for(closed.wait(), 5)

    with caplog.at_level(logging.DEBUG, logger="nodeserver"):
        run(main())
    assert [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ] == []
