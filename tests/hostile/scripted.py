"""The base of attack tests' fake nodes: a node holding the secret that misbehaves.

A fake node is dispynb's real listener and handshake (`tests.transport.util`'s
``serving_in_thread``), then messages of the test's own. `ScriptedNode` does what
every one of them does as a node would (a computation's setup answered ready with
one worker, its close answered closed, the client's connections counted for the
listener's ``serving``) and leaves the jobs to the test's subclass (`jobs`), with
`other` for any other message. `finished` is a job's entry of a `JobResults`.
"""

from __future__ import annotations

from typing import Any

from dispynb.errors import ConnectionClosedError
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationClosed,
    ComputationReady,
    ComputationSetup,
    JobSubmit,
)
from dispynb.transport.connection import Connection


def finished(key: int, attempt: int) -> list[Any]:
    """A `JobResults` entry: job ``key`` (its ``attempt``) finished, its result the
    one buffer sent with the message."""
    return [key, attempt, "finished", 1.0, 2.0, "", "", None, 1]


class ScriptedNode:
    """A fake node's connections: `jobs` (and `other`) are the subclass's script."""

    #: What ends a connection quietly: the client going (a subclass that writes to
    #: the socket itself adds `OSError`).
    ENDS: tuple[type[BaseException], ...] = (ConnectionClosedError,)

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.active = 0

    async def __call__(self, conn: Connection, name: str) -> None:
        self.connections.append(conn)
        self.active += 1
        try:
            await self.serve(conn)
        except self.ENDS:
            return
        finally:
            self.active -= 1

    async def serve(self, conn: Connection) -> None:
        """Answer the client's messages until it goes."""
        while True:
            message, _buffers = await conn.recv()
            if isinstance(message, ComputationSetup):
                self.setup(conn, message)
            elif isinstance(message, JobSubmit):
                await self.jobs(conn, message)
            elif isinstance(message, ComputationClose):
                conn.write(ComputationClosed(comp_id=message.comp_id))
            else:
                self.other(conn, message)

    def setup(self, conn: Connection, message: ComputationSetup) -> None:
        """The computation is ready, on one worker."""
        conn.write(ComputationReady(comp_id=message.comp_id, workers=1))

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        """The jobs the client submits: the test's script."""
        raise NotImplementedError

    def other(self, conn: Connection, message: Any) -> None:
        """Any other message (a file, a ping): ignored."""
