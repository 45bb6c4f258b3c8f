"""A TLS peer that does not read: what the sender holds for it is counted, and small.

asyncio's TLS transport encrypts whatever it is given at once and moves it all to its
socket's buffer, where its own size no longer counts it: a node's back-pressure
(`Connection.unsent`, `Connection.flush`) was blind to it, and a client that did not
read its results over TLS grew a node by 227 MiB (the same attack over plain TCP:
+47 MiB). `dispynb.transport.links.TransportLink` now feeds the transport in slices.
"""

from __future__ import annotations

import asyncio
import socket
import tracemalloc

from dispynb.protocol.messages import JobCancel
from dispynb.transport.connection import Connection
from dispynb.transport.tls import client_context, server_context
from tests.asyncutil import run

MiB = 1 << 20

#: As a node's outbox does (`nodeserver.outbox.OUT_HIGH`): write while the
#: connection holds at most this much unsent, then wait for `flush`.
HIGH = 32 * MiB
MESSAGE = 16 * MiB
COUNT = 12


async def _pair(cert: tuple[str, str]) -> tuple[Connection, Connection]:
    """A TLS connection pair on 127.0.0.1: (sender, the peer that reads)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    near = socket.socket()
    near.setblocking(False)
    with listener:
        _, (far, _) = await asyncio.gather(
            loop.sock_connect(near, listener.getsockname()),
            loop.sock_accept(listener),
        )
    sender, reader = await asyncio.gather(
        Connection.over_tls(far, "reader", server_context(*cert), server_side=True),
        Connection.over_tls(
            near,
            "sender",
            client_context(cafile=cert[0]),
            server_side=False,
            server_hostname="127.0.0.1",
        ),
    )
    reader.decoder.max_size = 2 * MESSAGE
    return sender, reader


async def _never_read_then_read(
    sender: Connection, reader: Connection
) -> tuple[int, int, int]:
    """Write as a node's outbox does to ``reader``, which reads nothing; then read
    it all. Messages written, the sender's traced allocation peak meanwhile, and
    what it said it held unsent."""
    payload = bytes(range(256)) * (MESSAGE // 256)  # shared: costs no copy
    reader.hold_reading(True)  # the peer reads nothing
    tracemalloc.start()
    try:
        written = 0
        for _ in range(COUNT):
            if sender.unsent > HIGH:
                break  # as the outbox holds its workers
            sender.write(JobCancel(comp_id=1, key=written, attempt=1), [payload])
            written += 1
            await asyncio.sleep(0.01)  # the loop sends what the socket takes
        # The sender's copies of what it sent (beyond the caller's own buffer).
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    unsent = sender.unsent
    reader.hold_reading(False)
    flushed = asyncio.ensure_future(sender.flush())
    for key in range(written):
        message, buffers = await reader.recv()
        assert isinstance(message, JobCancel)
        assert message.key == key
        assert buffers[0] == payload
    await flushed
    return written, peak, unsent


def test_a_tls_peer_that_does_not_read_costs_the_sender_little(cert) -> None:
    async def attack() -> tuple[int, int, int]:
        sender, reader = await _pair(cert)
        try:
            return await _never_read_then_read(sender, reader)
        finally:
            sender.close()
            reader.close()
            await asyncio.sleep(0.1)  # asyncio closes the sockets in a callback

    written, peak, unsent = run(attack(), timeout=60)
    assert written == 3  # 16 MiB messages until over HIGH: the kernel takes little
    assert unsent > HIGH  # what waits is counted...
    assert peak < 4 * MiB  # ...and not copied (was: 42 MiB of ciphertext copies)
