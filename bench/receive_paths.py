"""CPU per megabyte of ways to receive a large argument (issue 17, cross-host W4).

Not dispynb itself: a model of where the bytes of a 10 MB argument are copied and
authenticated, to tell what cross-host W4 / raw TCP can reach before building it.
On network-namespace hosts joined by veths (`crosshost.py`) the "wire" is a memory
copy on the same CPUs as everything else, so W4 / raw TCP is about the ratio of CPU
per byte; here the same paths run over loopback TCP, each in its own processes::

    .venv/bin/python bench/receive_paths.py              # every path, 3 rounds
    .venv/bin/python bench/receive_paths.py --rounds 5 --bodies 40 shm raw

Paths (the sender writes each body with one ``sendall`` and waits for a one-byte
answer, as the raw TCP reference of `crosshost.py` does):

raw
    The receiver reads into a reused 1 MiB buffer: the raw TCP reference.
rawmac
    As raw, with GMAC over every body on both sides (the MAC dispynb's frames
    carry, `dispynb.protocol.auth`): what authentication alone costs.
shm
    dispynb's model: a node receives each body into a 10 MB shared mapping and
    checks its GMAC; a worker process maps it and copies it into the ``bytes`` the
    job receives.
shmview
    As shm, but the worker does not copy: the bound for any path with a separate
    worker process, were the job content with a view of the node's memory.
splice
    The node never touches the bytes: it splices them from the socket into a pipe
    (``splice(2)``), and the worker reads the pipe straight into a new ``bytes``
    object's storage and checks the GMAC there (which needs the MAC key in the
    process that runs jobs).
handoff
    The node passes the connection itself to the worker (``SCM_RIGHTS``) and never
    touches the bytes: the worker receives each body straight into a new ``bytes``
    object's storage and checks its GMAC (the MAC key in the process that runs
    jobs, and two processes sharing one connection's stream). The bound of any
    path with authentication and a separate worker process.

Each line gives MB/s and the user + system CPU of the sender, the node and the
worker (``getrusage``), in ms per MB.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PATHS = ("raw", "rawmac", "shm", "shmview", "splice", "handoff")
#: Bytes per body: W4's argument.
BODY = 10_000_000
#: The receive buffer of raw and rawmac (as `crosshost.py`'s raw receiver).
CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_KEY, _NONCE = os.urandom(32), os.urandom(12)


class _Gmac:
    """GMAC (AES-256-GCM over no plaintext) fed in pieces."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.AES(_KEY), modes.GCM(_NONCE))
        self._encryptor = cipher.encryptor()

    def update(self, data: memoryview | bytes) -> None:
        self._encryptor.authenticate_additional_data(data)

    def tag(self) -> bytes:
        self._encryptor.finalize()
        return bytes(self._encryptor.tag)


def _gmac(data: memoryview | bytes) -> bytes:
    mac = _Gmac()
    mac.update(data)
    return mac.tag()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``size`` bytes and a writable view of its storage (what
    the C API's ``PyBytes_FromStringAndSize(NULL, size)`` gives C code)."""
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    value: bytes = new(None, size)
    storage = (ctypes.c_char * size).from_address(id(value) + bytes.__basicsize__ - 1)
    return value, memoryview(storage).cast("B")


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        got += sock.recv_into(view[got:])


def _worker(path: str, fd: int, control: socket.socket, bodies: int) -> None:
    """A worker process: take each body the node hands over, answer, then report
    its CPU seconds."""
    if path == "handoff":
        _, fds, _, _ = socket.recv_fds(control, 1, 1)
        conn = socket.socket(fileno=fds[0])
        for _ in range(bodies):
            value, storage = _new_bytes(BODY)
            _recv_exactly(conn, storage)
            _gmac(value)
            conn.send(b"k")
    elif path == "splice":
        for _ in range(bodies):
            value, storage = _new_bytes(BODY)
            got = 0
            while got < BODY:
                got += os.readv(fd, [storage[got:]])
            _gmac(value)
            control.send(b"k")
    else:
        shared = mmap.mmap(fd, BODY, prot=mmap.PROT_READ)
        for _ in range(bodies):
            control.recv(1)
            if path == "shm":
                bytes(memoryview(shared))
            control.send(b"k")
    control.send(f"{_cpu():.6f}".encode().ljust(16))
    os._exit(0)


def _receive(path: str, conn: socket.socket, bodies: int) -> float:
    """The node (or raw receiver): receive ``bodies`` bodies on ``conn`` the way of
    ``path``; the CPU seconds of its worker (0 without one)."""
    if path in ("raw", "rawmac"):
        buffer = memoryview(bytearray(CHUNK))
        for _ in range(bodies):
            mac = _Gmac() if path == "rawmac" else None
            left = BODY
            while left:
                n = conn.recv_into(buffer[: min(left, CHUNK)])
                left -= n
                if mac is not None:
                    mac.update(buffer[:n])
            if mac is not None:
                mac.tag()
            conn.send(b"k")
        return 0.0
    node_end, worker_end = socket.socketpair()
    if path == "handoff":
        pid = os.fork()
        if pid == 0:
            _worker(path, -1, worker_end, bodies)
        socket.send_fds(node_end, [b"c"], [conn.fileno()])
    elif path == "splice":
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, CHUNK)
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            _worker(path, read_fd, worker_end, bodies)
        os.close(read_fd)
        for _ in range(bodies):
            left = BODY
            while left:
                left -= os.splice(conn.fileno(), write_fd, left)
            node_end.recv(1)
            conn.send(b"k")
    else:
        fd = os.memfd_create("body")
        os.ftruncate(fd, BODY)
        body = memoryview(mmap.mmap(fd, BODY))
        pid = os.fork()
        if pid == 0:
            _worker(path, fd, worker_end, bodies)
        for _ in range(bodies):
            _recv_exactly(conn, body)
            _gmac(body)
            node_end.send(b"g")
            node_end.recv(1)
            conn.send(b"k")
    worker_cpu = float(node_end.recv(16))
    os.waitpid(pid, 0)
    return worker_cpu


def measure(path: str, bodies: int) -> dict[str, float]:
    """Send ``bodies`` bodies to a receiver of ``path`` (forked, loopback); MB/s and
    the CPU ms per MB of each process."""
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:
        conn, _ = listener.accept()
        start = _cpu()
        worker_cpu = _receive(path, conn, bodies)
        conn.send(f"{_cpu() - start:.6f} {worker_cpu:.6f}".encode())
        os._exit(0)
    sender = socket.create_connection(listener.getsockname())
    payload = os.urandom(BODY)
    start_cpu, start = _cpu(), time.perf_counter()
    for _ in range(bodies):
        if path != "raw":
            _gmac(payload)
        sender.sendall(payload)
        sender.recv(1)
    elapsed, sender_cpu = time.perf_counter() - start, _cpu() - start_cpu
    node_cpu, worker_cpu = map(float, sender.recv(64).split())
    os.waitpid(pid, 0)
    listener.close()
    megabytes = bodies * BODY / 1e6
    per_mb = {
        "sender": sender_cpu,
        "node": node_cpu,
        "worker": worker_cpu,
    }
    result = {key: value / megabytes * 1e3 for key, value in per_mb.items()}
    result["total"] = sum(per_mb.values()) / megabytes * 1e3
    result["mb_s"] = megabytes / elapsed
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the chosen paths, alternated, and print each run and the medians."""
    parser = argparse.ArgumentParser(prog="bench/receive_paths.py")
    parser.add_argument("paths", nargs="*", metavar="PATH", help=", ".join(PATHS))
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path")
    parser.add_argument("--bodies", type=int, default=40, help="10 MB bodies a run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        parser.error(
            f"unknown path {', '.join(unknown)}: choose from {', '.join(PATHS)}"
        )
    args.paths = args.paths or list(PATHS)
    runs: dict[str, list[dict[str, float]]] = {path: [] for path in args.paths}
    for _ in range(args.rounds):
        for path in args.paths:  # alternated: the machine's load hits every path
            result = measure(path, args.bodies)
            runs[path].append(result)
            print(
                f"{path:8s} {result['mb_s']:6,.0f} MB/s   CPU ms/MB: sender "
                f"{result['sender']:.3f}  node {result['node']:.3f}  worker "
                f"{result['worker']:.3f}  total {result['total']:.3f}",
                flush=True,
            )
    print("medians (CPU total ms/MB; raw's total / the path's: the W4 / raw TCP a")
    print("CPU-bound veth allows):")
    raw = statistics.median(r["total"] for r in runs["raw"]) if "raw" in runs else None
    for path, results in runs.items():
        total = statistics.median(r["total"] for r in results)
        mb_s = statistics.median(r["mb_s"] for r in results)
        ratio = f"   {raw / total:.2f}x" if raw else ""
        print(f"{path:8s} {mb_s:6,.0f} MB/s   {total:.3f} ms/MB{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
