"""What a connection tells of its socket, over socket pairs: whether all it wrote
was sent (`all_sent`), descriptors passed with their message, bytes unread in the
kernel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import ssl

import pytest

from dispynb.errors import (
    ConnectionClosedError,
)
from dispynb.protocol.framing import encode_frames
from dispynb.protocol.messages import (
    Error,
    JobCancel,
    pack_header,
)
from dispynb.transport.connection import Connection
from dispynb.transport.tls import client_context, server_context
from tests.asyncutil import run


def test_all_sent_tells_a_peer_that_read_everything_and_hung_up():
    # The node releases kept results once they are sent; a client that read them
    # all may close before the node's flush runs: that is still "sent".
    async def main():
        left, right = socket.socketpair()
        a = Connection.over_socket(left, "a")
        b = Connection.over_socket(right, "b")
        a.write(JobCancel(comp_id=1, key=1, attempt=0), [b"x" * 1000])
        assert a.all_sent  # a small message goes in one sendmsg
        message, buffers = await b.recv()
        assert message.key == 1 and bytes(buffers[0]) == b"x" * 1000
        b.close()
        with pytest.raises(ConnectionClosedError):
            await a.recv()
        assert a.all_sent
        with pytest.raises(ConnectionClosedError):
            await a.flush()

    run(main())


def test_all_sent_is_false_when_bytes_were_dropped():
    async def main():
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a = Connection.over_socket(left, "a")
        a.write(JobCancel(comp_id=1, key=1, attempt=0), [os.urandom(4 << 20)])
        assert not a.all_sent  # the kernel took only part of 4 MB
        right.close()
        a.close()
        assert not a.all_sent

    run(main())


def _same_file(fd: int, other: int) -> bool:
    one, two = os.fstat(fd), os.fstat(other)
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def test_descriptors_travel_with_their_message_even_behind_unsent_bytes():
    # A node hands a job's memfd to its worker: the descriptor must reach the worker
    # with that job's message, also when the message waits behind a large one the
    # worker's socket could not take yet.
    from nodeserver.channel import MessageSocket
    from nodeserver.ipc import Run

    files = [os.memfd_create(f"f{i}") for i in range(2)]

    async def main() -> list[tuple[int, int, bool]]:
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        right.settimeout(10)
        conn = Connection.over_socket(left, "worker", trusted_max_size=64 << 20)
        reader = MessageSocket(right, fds=True)
        conn.write(Run(key=0, attempt=0), (), (files[0],))  # sent at once
        conn.write(Run(key=1, attempt=0), [os.urandom(8 << 20)])
        assert conn.unsent  # the rest waits for the reader
        conn.write(Run(key=2, attempt=0), (), (files[1],))  # queued behind it
        got = []
        loop = asyncio.get_running_loop()
        for _ in range(3):
            message, _buffers = await loop.run_in_executor(None, reader.recv)
            fd = reader.take_fd() if message.key != 1 else None
            got.append((message.key, fd))
        await conn.flush()
        conn.close()
        reader.close()
        out = []
        for key, fd in got:
            same = fd is not None and _same_file(fd, files[key // 2])
            if fd is not None:
                os.close(fd)
            out.append((key, fd is not None, same))
        return out

    try:
        assert run(main()) == [(0, True, True), (1, False, False), (2, True, True)]
    finally:
        for fd in files:
            os.close(fd)


def test_descriptors_are_refused_on_a_signed_connection():
    async def main():
        left, right = socket.socketpair()
        a = Connection.over_socket(left, "a")
        a.start_signing(b"k" * 32, b"k" * 32, 1 << 20)
        with pytest.raises(ValueError, match="descriptors"):
            a.write(JobCancel(comp_id=1, key=1, attempt=0), (), (0,))
        a.close()
        right.close()

    run(main())


def test_unread_bytes_counts_what_waits_in_the_kernel_until_the_loop_reads_it():
    """What the pulse watchdogs ask before declaring a peer dead: bytes the peer
    sent that the loop has not read yet (its check may come first in a turn)."""

    async def body() -> None:
        ours, theirs = socket.socketpair()
        conn = Connection.over_socket(ours, "peer")
        try:
            assert conn.unread_bytes() == 0
            theirs.sendall(b"\x00" * 5)  # part of a frame header: never a message
            assert conn.unread_bytes() == 5  # the loop had no turn since
            reads = conn.reads
            for _ in range(100):
                if conn.reads != reads:
                    break
                await asyncio.sleep(0.01)
            assert conn.reads == reads + 1
            assert conn.unread_bytes() == 0  # read into the decoder
        finally:
            conn.close()
            theirs.close()
        assert conn.unread_bytes() == 0  # closed: nothing to ask

    run(body())


async def _over_tls(
    client: socket.socket, server: socket.socket, cert: tuple[str, str]
) -> tuple[Connection, ssl.SSLSocket]:
    """A TLS connection over ``client``, and ``server`` as a raw TLS peer of it."""
    peer = server_context(*cert).wrap_socket(
        server, server_side=True, do_handshake_on_connect=False
    )
    peer.settimeout(10)
    conn, _ = await asyncio.gather(
        Connection.over_tls(client, "server", client_context(), server_side=False),
        asyncio.to_thread(peer.do_handshake),
    )
    return conn, peer


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_reason_sent_before_a_reset_is_read_when_a_write_meets_the_reset(cert, tls):
    """A server that refuses a session says why and closes, with what the client
    sent meanwhile unread: its kernel resets the connection. The client's next
    write meets the reset; the reason, already received, still comes out of
    `recv` (a scheduler's refusal 'over --max_sessions' came out as 'Broken pipe'
    when the client was sending its computation; over TLS, as 'Connection reset
    by peer', the reason never decrypted)."""

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.socket()
            # Room for all the server sends before its reset, on any kernel.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            client.connect(listener.getsockname())
            server, _ = listener.accept()
        # As asyncio's sockets: else the server's last bytes may wait for our ACK,
        # and its reset drops them.
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            conn, server = await _over_tls(client, server, cert)
        else:
            conn = Connection.over_socket(client, "server")
        job = JobCancel(comp_id=1, key=1, attempt=0)
        conn.write(job, [b"x" * 1000])  # the server never reads it
        # Before the reason, more than the reader's buffer takes at once (64 KiB).
        said = [encode_frames([pack_header(job.to_header()), b"y" * 40_000])] * 2
        said.append(
            encode_frames(
                [pack_header(Error(code="quota", message="over quota").to_header())]
            )
        )
        server.sendall(b"".join(b"".join([head, *parts]) for head, parts in said))
        server.close()  # with unread bytes: a reset
        # The reset is there, and the reason before it, unread: the loop has not
        # run since. The next write meets the reset.
        arrived = select.poll()
        arrived.register(client, select.POLLERR)
        assert arrived.poll(10_000), "no reset came"
        with contextlib.suppress(ConnectionClosedError):
            conn.write(job, [b"x" * 1000])
        for _ in range(2):
            message, buffers = await conn.recv()
            assert isinstance(message, JobCancel) and len(buffers[0]) == 40_000
        message, _ = await conn.recv()
        assert isinstance(message, Error) and message.message == "over quota"
        with pytest.raises(ConnectionClosedError, match="reset"):
            await conn.recv()
        assert conn.closed

    run(main())
