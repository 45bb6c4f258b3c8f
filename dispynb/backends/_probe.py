"""What listens at an address given as a Ray head or a Dask scheduler.

A user who gives the wrong port (a dashboard's, another service's) meets a server
that accepts the connection but does not speak the engine's protocol: Ray's
``ray.init`` then retries for many minutes, Dask's client fails with whatever the
stranger's bytes decode to (an HTTP answer read as a frame length: ``MemoryError:
Unable to allocate 3.07 EiB``). `probe` greets the server as an HTTP/2 client
would (Ray's GCS and Ray Client are gRPC servers, gRPC runs on HTTP/2) and says in
words what answered, so that the error can tell the user what is there.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

#: An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server
#: answers with a SETTINGS frame, an HTTP/1 server with an error status line.
HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

#: Bytes of an HTTP/2 frame header (length 3, type 1, flags 1, stream 4).
FRAME_HEADER = 9

#: The type of HTTP/2's SETTINGS frame.
SETTINGS = 0x4


@dataclass(frozen=True)
class Answer:
    """What the server at the address did when greeted."""

    http2: bool
    """It answered as an HTTP/2 server does (a gRPC server: Ray's GCS, Ray Client)."""

    found: str
    """What answered, in words: ``"an HTTP server (it answered 'HTTP/1.1 400 Bad
    Request')"``, ``"it accepted the connection but sent nothing within 10 s"``..."""


def probe(host: str, port: int, timeout: float) -> Answer:
    """Connect to ``host:port``, greet it as an HTTP/2 client, and tell what comes
    back within ``timeout`` seconds. Raises `OSError` if no connection opens."""
    with socket.create_connection((host, port), timeout) as sock:
        deadline = time.monotonic() + timeout
        data = b""
        closed = False
        try:
            sock.sendall(HELLO)
            while not _enough(data):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(4096)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except TimeoutError:
            pass
        except OSError:  # reset, broken pipe: it closed on us
            closed = True
    return _describe(data, closed, timeout)


def _enough(data: bytes) -> bool:
    """``data`` says what the server is: a SETTINGS frame, a line, 64 bytes."""
    if len(data) < FRAME_HEADER:
        return False
    return _is_settings(data) or b"\n" in data or len(data) >= 64


def _is_settings(data: bytes) -> bool:
    """``data`` starts with an HTTP/2 SETTINGS frame of the connection (stream 0)."""
    return (
        len(data) >= FRAME_HEADER
        and data[3] == SETTINGS
        and int.from_bytes(data[5:9], "big") & 0x7FFFFFFF == 0
    )


def _describe(data: bytes, closed: bool, timeout: float) -> Answer:
    if _is_settings(data):
        return Answer(True, "an HTTP/2 (gRPC) server")
    if data.startswith(b"HTTP/"):
        line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        status = line[:60].decode("ascii", "replace")
        return Answer(False, f"an HTTP server (it answered {status!r})")
    if not data:
        if closed:
            return Answer(False, "it closed the connection without answering")
        return Answer(
            False, f"it accepted the connection but sent nothing within {timeout:g} s"
        )
    return Answer(False, f"a server that answered {data[:40]!r}")
