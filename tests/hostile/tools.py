"""Instruments for attack tests: CPU over a window, log lines, limited nodes, attackers.

Everything is bounded in time. Attackers on loopback bind to their own source address
(`ATTACKER`, 127.0.0.2) so a node can tell them from the victim client (127.0.0.1).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.protocol.auth import MAC_SIZE, MessageSigner, MessageVerifier
from dispynb.protocol.framing import (
    PREFIX_SIZE,
    encode_frames,
    parse_prefix,
    split_body,
)
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import Welcome, WireMessage, pack_header, unpack_header
from dispynb.secret import random_secret
from tests.nodeproc import CliNode, start_node

#: Source address of attackers' sockets (the victim client uses 127.0.0.1).
ATTACKER = "127.0.0.2"

#: Seconds any wait of an attack test allows before it fails.
WAIT = 20.0


#: A command prefix that runs a program as nobody (another user of the machine),
#: still able to read root's files (the code and its interpreter). Needs root.
AS_NOBODY = [
    "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
    "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
]  # fmt: skip


def memory_regions(pid: int | str = "self") -> Iterator[bytes]:
    """The readable memory of process ``pid`` (or this one), region by region;
    a region that cannot be read is skipped. `OSError` if its memory cannot be
    opened (another user's, or not dumpable). For jobs that look for a secret."""
    with (
        open(f"/proc/{pid}/maps") as maps,
        open(f"/proc/{pid}/mem", "rb", buffering=0) as mem,
    ):
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vsyscall]"):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(low)
                data = mem.read(high - low)
            except OSError:  # a region that cannot be read (a guard page)
                continue
            yield data


def lowest_free_descriptor(pid: int) -> int:
    """The number the next descriptor process ``pid`` opens would get (a soft
    ``RLIMIT_NOFILE`` of it leaves the process none to open)."""
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(taken) + 1)) - taken)


def strong_secret() -> str:
    """A secret as `dispynb secret` makes one (256 random bits)."""
    return random_secret()


def wait_for(
    condition: Callable[[], object], what: str, timeout: float = WAIT
) -> float:
    """Poll ``condition`` until true; return the seconds it took (fail at timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds used so far by ``pid`` (and its live children)."""
    procs = [psutil.Process(pid)]
    if children:
        procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def cpu_percent(pid: int, window: float, children: bool = False) -> float:
    """CPU used by ``pid`` over the next ``window`` seconds, in % of one core."""
    before, start = cpu_seconds(pid, children), time.monotonic()
    time.sleep(window)
    return 100 * (cpu_seconds(pid, children) - before) / (time.monotonic() - start)


def count_lines(path: Path, pattern: str = "") -> int:
    """Lines of the text file ``path`` matching the regex ``pattern`` (all if empty)."""
    regex = re.compile(pattern)
    with open(path, errors="replace") as handle:
        return sum(1 for line in handle if regex.search(line))


def attacker_socket(
    port: int, source: str = ATTACKER, host: str = "127.0.0.1", timeout: float = 5.0
) -> socket.socket:
    """A blocking TCP connection to ``host:port`` from the address ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def limited_node(
    directory: Path, *args: str, nofile: int | None = None, **kwargs: object
) -> Iterator[CliNode]:
    """A real ``dispynb-node`` subprocess, optionally under ``prlimit --nofile``.

    Keyword arguments go to `tests.nodeproc.start_node` (secret, cpus, name...).
    """
    launcher = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
    kwargs.setdefault("secret", strong_secret())
    node = start_node(directory, *args, launcher=launcher, **kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        node.stop()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


class RawSession:
    """A client made of dispynb's sans-IO pieces on a blocking socket.

    `open` authenticates as a real client would (from ``source``); then `send` can
    sign anything, including what a real client never sends (``send_header`` takes a
    raw header map).
    """

    def __init__(self, sock: socket.socket, handshake: ClientHandshake) -> None:
        self.sock = sock
        send_key, receive_key = handshake.keys()
        self.signer = MessageSigner(send_key)
        self.verifier = MessageVerifier(receive_key)

    @classmethod
    def open(
        cls,
        port: int,
        secret: str | bytes,
        source: str = "127.0.0.1",
        name: str = "hostile",
        timeout: float = 5.0,
    ) -> RawSession:
        """Connect from ``source`` and authenticate; `NodeBusyError` if refused."""
        key = secret.encode() if isinstance(secret, str) else secret
        sock = attacker_socket(port, source, timeout=timeout)
        try:
            handshake = ClientHandshake(key, name)
            send_unsigned(sock, handshake.hello())
            send_unsigned(sock, handshake.on_challenge(recv_unsigned(sock)))
            handshake.on_confirm(recv_unsigned(sock))
            session = cls(sock, handshake)
            welcome = session.recv()
            assert isinstance(welcome, Welcome), welcome
        except BaseException:
            sock.close()
            raise
        return session

    def send_header(
        self, header: dict[str, object], buffers: tuple[bytes, ...] = ()
    ) -> None:
        """Sign and send a message made of ``header`` (any map) and ``buffers``."""
        head, parts = encode_frames([pack_header(header), *buffers], MAC_SIZE)
        mac = self.signer.sign([head, *parts])
        self.sock.sendall(b"".join([head, *parts, mac]))

    def send(self, message: WireMessage) -> None:
        self.send_header(message.to_header())

    def recv(self) -> WireMessage:
        """The next message from the node (its MAC checked)."""
        prefix = _recv_exactly(self.sock, PREFIX_SIZE)
        size, count = parse_prefix(prefix, 1 << 30, MAC_SIZE)
        body = _recv_exactly(self.sock, size)
        buffers, signed, mac = split_body(body, count, MAC_SIZE)
        self.verifier.verify((prefix, signed), mac)
        return WireMessage.from_header(unpack_header(buffers[0], trusted=True))

    def close(self) -> None:
        self.sock.close()


def send_unsigned(sock: socket.socket, message: WireMessage) -> None:
    """Send a handshake message (unsigned)."""
    head, parts = encode_frames([pack_header(message.to_header())])
    sock.sendall(b"".join([head, *parts]))


def recv_unsigned(sock: socket.socket) -> WireMessage:
    """Receive a handshake message (unsigned, decoded with the pre-auth limits)."""
    prefix = _recv_exactly(sock, PREFIX_SIZE)
    size, count = parse_prefix(prefix, PRE_AUTH_MAX_FRAME)
    buffers, _signed, _mac = split_body(_recv_exactly(sock, size), count)
    return WireMessage.from_header(unpack_header(buffers[0], trusted=False))


def give_by_acl(path: Path, uid: int, perms: int) -> None:
    """Give user ``uid`` the permissions ``perms`` (4 read, 2 write) on ``path`` by a
    POSIX access ACL (``setfacl -m u:<uid>:<perms>``, in the kernel's format:
    version 2, then tag, permissions and id of each entry); the mode then shows the
    ACL's mask as its group bits. Skips the test where the file system has none."""
    undefined = 0xFFFFFFFF
    entries = [  # user::rw- user:<uid>:<perms> group::--- mask::<perms> other::---
        (0x01, 6, undefined), (0x02, perms, uid), (0x04, 0, undefined),
        (0x10, perms, undefined), (0x20, 0, undefined),
    ]  # fmt: skip
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on {path.parent}: {exc}")
