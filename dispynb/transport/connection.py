"""`Connection`: whole dispynb messages over a tornado stream, signed after auth.

The only module that turns tornado and socket errors into dispynb errors (in
`_stream_errors`); upper layers never see tornado exceptions.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import weakref
from collections.abc import Iterator, Sequence
from typing import ClassVar

from tornado.iostream import IOStream, StreamClosedError

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.errors import (
    ConnectionClosedError,
    DispynbError,
    FramingError,
    TransportError,
)
from dispynb.protocol.auth import MAC_SIZE, MessageSigner, MessageVerifier
from dispynb.protocol.framing import (
    PREFIX_SIZE,
    Buffer,
    encode_frames,
    parse_prefix,
    split_body,
)
from dispynb.protocol.messages import Message, WireMessage, pack_header, unpack_header

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _stream_errors(peer: str) -> Iterator[None]:
    try:
        yield
    except StreamClosedError as exc:
        cause = exc.real_error
        if isinstance(cause, ssl.SSLError):
            raise TransportError(f"TLS failure with {peer}: {cause}") from exc
        detail = f": {cause}" if cause else ""
        raise ConnectionClosedError(f"connection to {peer} closed{detail}") from exc
    except ssl.SSLError as exc:
        raise TransportError(f"TLS failure with {peer}: {exc}") from exc
    except OSError as exc:
        raise ConnectionClosedError(f"connection to {peer} failed: {exc}") from exc


class Connection:
    """One message connection; starts unsigned (handshake), then every message is MAC'd.

    Parameters
    ----------
    stream:
        A connected tornado stream (plain or TLS).
    peer:
        Printable peer address, for messages and logs.
    family:
        The message family decoded on this connection.
    trusted_max_size:
        For a channel between processes of one node (a Unix socket pair): no
        handshake, no MACs, headers decoded without pre-auth limits, this size cap.
    """

    _instances: ClassVar[weakref.WeakSet[Connection]] = weakref.WeakSet()

    def __init__(
        self,
        stream: IOStream,
        peer: str,
        family: type[Message] = WireMessage,
        trusted_max_size: int | None = None,
    ) -> None:
        self.stream = stream
        stream.set_nodelay(True)  # our messages are whole; never wait for more bytes
        self.peer = peer
        self.family = family
        self.max_size = trusted_max_size or PRE_AUTH_MAX_FRAME
        self._trusted = trusted_max_size is not None
        self._signer: MessageSigner | None = None
        self._verifier: MessageVerifier | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        Connection._instances.add(self)

    @property
    def authenticated(self) -> bool:
        """True once messages are signed and checked."""
        return self._verifier is not None

    @property
    def closed(self) -> bool:
        """True once the stream is closed."""
        return self.stream.closed()

    def start_signing(self, send_key: bytes, receive_key: bytes, max_size: int) -> None:
        """Switch to signed messages (after the handshake) and raise the size cap."""
        self._signer = MessageSigner(send_key)
        self._verifier = MessageVerifier(receive_key)
        self.max_size = max_size

    def write(self, message: Message, buffers: Sequence[Buffer] = ()) -> None:
        """Queue ``message`` for sending without waiting (batched by the stream).

        Raises `ConnectionClosedError` if the connection is already closed.
        """
        header = pack_header(message.to_header())
        mac_size = MAC_SIZE if self._signer else 0
        head, parts = encode_frames([header, *buffers], mac_size)
        pieces: list[Buffer] = [head, *parts]
        if self._signer is not None:
            pieces.append(self._signer.sign(pieces))
        with _stream_errors(self.peer):
            if self.stream.closed():
                raise StreamClosedError(self.stream.error)
            _write_coalesced(self.stream, pieces)
        self.bytes_sent += (
            len(head) + sum(memoryview(p).nbytes for p in parts) + mac_size
        )

    async def send(self, message: Message, buffers: Sequence[Buffer] = ()) -> None:
        """Send ``message`` and wait until the stream has flushed it (backpressure)."""
        self.write(message, buffers)
        with _stream_errors(self.peer):
            await self.stream.write(b"")

    async def flush(self) -> None:
        """Wait until everything written so far has gone to the socket."""
        with _stream_errors(self.peer):
            await self.stream.write(b"")

    async def recv(self) -> tuple[Message, list[memoryview]]:
        """Receive the next message and its payload buffers.

        Raises `ConnectionClosedError` at EOF, `FramingError`/`MessageError` for bad
        data, `AuthenticationError` for a bad MAC (the caller must then abort).
        """
        mac_size = MAC_SIZE if self._verifier else 0
        with _stream_errors(self.peer):
            prefix = await self.stream.read_bytes(PREFIX_SIZE)
            size, count = parse_prefix(prefix, self.max_size, mac_size)
            body = bytearray(size)
            await self.stream.read_into(body)
        self.bytes_received += PREFIX_SIZE + size
        buffers, signed, mac = split_body(body, count, mac_size)
        if self._verifier is not None:
            self._verifier.verify((prefix, signed), mac)
        trusted = self._trusted or self._verifier is not None
        header = unpack_header(buffers[0], trusted=trusted)
        message = self.family.from_header(header)
        return message, buffers[1:]

    async def recv_unsigned_single(self) -> Message:
        """Receive a handshake message: unsigned and without payload buffers."""
        message, buffers = await self.recv()
        if buffers:
            raise FramingError("handshake messages carry no payload")
        return message

    def close(self) -> None:
        """Close the connection (idempotent); queued writes are flushed by the OS."""
        self.stream.close()

    def abort(self) -> None:
        """Close at once after an error (idempotent)."""
        self.stream.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self.peer} {state}>"


def stream_buffer_size(max_message_size: int) -> int:
    """Read-buffer limit for a stream that carries messages up to that size."""
    return max_message_size + (1 << 20)


#: Pieces smaller than this are joined before writing: fewer syscalls and segments.
_COALESCE_LIMIT = 64 * 1024


def _write_coalesced(stream: IOStream, pieces: list[Buffer]) -> None:
    small: list[Buffer] = []
    for piece in pieces:
        if memoryview(piece).nbytes < _COALESCE_LIMIT:
            small.append(piece)
            continue
        if small:
            stream.write(b"".join(small))
            small = []
        stream.write(memoryview(piece))
    if small:
        stream.write(b"".join(small) if len(small) > 1 else memoryview(small[0]))


def describe_error(exc: BaseException) -> str:
    """One line for logs: dispynb errors as they are, others with their type."""
    if isinstance(exc, DispynbError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
