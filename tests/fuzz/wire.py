"""Seeded fuzzing of authenticated peers: messages of real ops with the wrong things
inside (a field's type mostly right, its contents wrong; maps and lists where a
number goes, nested at random), sent by a peer that holds the secret.

The pre-auth decoder has its own coverage-guided fuzzer (`fuzz_decoder.py`); this is
what a peer past the handshake reaches: the handlers of a node, a scheduler or a
client (`fuzz_server` as a client or user; `FuzzingNode` as a node). Everything
here is drawn from one `random.Random(seed)`: a run sends the same messages in the
same order every time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import pickle
import random
from typing import Any

import psutil

from dispynb.errors import DispynbError
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationSetup,
    JobResults,
    JobSubmit,
    Message,
    WireMessage,
)
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from tests.hostile.scripted import ScriptedNode, finished

#: Leaf values: the edges of each type, paths out of a directory, digests' shapes.
_LEAVES: tuple[Any, ...] = (
    0, -1, 1, 2, 2**40, 2**63, 1.5, float("nan"), float("inf"), "", "x" * 300,
    "../../etc/passwd", "/etc/passwd", None, True, b"\x00\xff", "a" * 64, "0" * 64,
    "finished", "raised",
)  # fmt: skip

#: Every message a peer may send, in a fixed order (the registry's is import order).
OPS: list[type[WireMessage]] = [
    kind for _op, kind in sorted(WireMessage._registry.items())
]


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A value: a leaf, or a list or map of values (a few levels deep at most)."""
    draw = rng.random()
    if depth > 3 or draw < 0.3:
        return rng.choice(_LEAVES)
    if draw < 0.6:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ("a", "op", "path", "digest", 1, "comp_id")
    return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _value(rng: random.Random, types: tuple[type, ...]) -> Any:
    """Mostly a value of one of ``types`` (the field's), with junk inside."""
    if int in types and rng.random() < 0.5:
        return rng.choice([1, 1, 0, 2, -1])  # ids that name something, often
    for _ in range(50):
        value = junk(rng)
        if not types or isinstance(value, types):
            return value
    return {int: 1, str: "s", list: [], dict: {}, float: 1.0, bool: True}.get(types[0])


def fuzzed_message(
    rng: random.Random, comp_id: int = 1, key: int | None = None
) -> Message:
    """A message of a random op, its fields drawn by `_value` (``comp_id`` mostly
    the one given: a computation that exists; ``key`` too, with an attempt of 0 to
    2, if given: a job that exists). Built without the constructor's checks: the
    receiver's are under test."""
    kind = rng.choice(OPS)
    message = kind.__new__(kind)
    for name, types, required in kind._field_checks():
        if name == "comp_id" and rng.random() < 0.9:
            value: Any = comp_id
        elif name == "key" and key is not None and rng.random() < 0.8:
            value = key
        elif name == "attempt" and key is not None:
            value = rng.choice((0, 1, 2))
        elif required or rng.random() < 0.5:
            value = _value(rng, types)
        else:
            value = None
        object.__setattr__(message, name, value)
    return message


def set_up(conn: Connection, comp_id: int = 1) -> None:
    """Set a computation (``abs``) up on the session and submit it a job: what the
    fuzzed messages then name."""
    bundle = serialize.dumps({"func": abs, "setup": None, "setup_args": ()})
    conn.write(ComputationSetup(comp_id=comp_id, name="fuzz", workers=1), bundle)
    conn.write(
        JobSubmit(comp_id=comp_id, jobs=[[1, 0, 1]]), serialize.dumps(((-1,), {}))
    )


async def fuzz_server(
    port: int, secret: bytes, seed: int, count: int, pause_every: int = 20
) -> collections.Counter[str]:
    """Send ``count`` fuzzed messages (seed ``seed``) to the server on ``port`` over
    authenticated sessions, each set up first (`set_up`), opening a new one when the
    server ends one. What came back is read meanwhile. Returns counts: ``sent``,
    ``sessions``, and each reply's op."""
    rng = random.Random(seed)
    tally: collections.Counter[str] = collections.Counter()
    conn: Connection | None = None
    reader: asyncio.Task[None] | None = None

    async def read(conn: Connection) -> None:
        try:
            while True:
                message, _buffers = await conn.recv()
                tally[message.op] += 1
        except DispynbError:
            pass

    try:
        for index in range(count):
            if conn is None or conn.closed:
                if reader is not None:
                    await reader
                conn, _ = await connect(
                    "127.0.0.1", port, secret=secret, max_message_size=1 << 24
                )
                reader = asyncio.create_task(read(conn))
                set_up(conn)
                tally["sessions"] += 1
            message = fuzzed_message(rng)
            buffers = [b"junk"] * rng.choice((0, 0, 0, 1, 2))
            try:
                conn.write(message, buffers)
                tally["sent"] += 1
                if index % pause_every == pause_every - 1:
                    await conn.flush()
                    await asyncio.sleep(0.01)  # the server answers, or ends it
            except DispynbError:
                conn.close()
    finally:
        if conn is not None:
            conn.close()
        if reader is not None:
            await reader
    return tally


class HonestNode(ScriptedNode):
    """Each job's result: the square of its key (a cluster's keys are 1, 2...)."""

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, attempt, *_rest in message.jobs:
            conn.write(
                JobResults(comp_id=message.comp_id, results=[finished(key, attempt)]),
                [pickle.dumps(key * key)],
            )


class FuzzingNode(HonestNode):
    """``per_job`` fuzzed messages naming each job (drawn from ``seed``), then its
    result; as `HonestNode` once ``fuzzing`` is set False."""

    def __init__(self, seed: int, per_job: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.per_job = per_job
        self.fuzzing = True

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, _attempt, *_rest in message.jobs:
            for _ in range(self.per_job if self.fuzzing else 0):
                fuzzed = fuzzed_message(self.rng, message.comp_id, key)
                buffers = [pickle.dumps(1)] * self.rng.randint(0, 2)
                with contextlib.suppress(DispynbError):  # written after a drop
                    conn.write(fuzzed, buffers)
        await super().jobs(conn, message)


def footprint(pid: int) -> tuple[int, int]:
    """A process's open descriptors and resident memory (bytes)."""
    process = psutil.Process(pid)
    return process.num_fds(), process.memory_info().rss
