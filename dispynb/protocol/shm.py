"""Large job arguments through POSIX shared memory, for nodes on the client's machine.

A job's pickled arguments normally travel over the node's socket: the client frames
them, the node server reads them and writes them again to the worker. For a node on
the client's own machine, a payload of at least `MIN_SIZE` bytes is instead written
once into a shared memory object (``/dev/shm/dnb-<32 hex digits>``, mode 0600) taken
from the client's pool (`dispynb.protocol.shmpool`); the job's one buffer is then a
small *reference* (`MAGIC` + JSON name and sizes) that travels inside the existing
authenticated job message. The worker reads each buffer out of the object with one
``pread`` straight into the ``bytes`` or ``bytearray`` the unpickler keeps, and
unpickles the arguments from those (`load_reference`): one copy, no mapping, and
nothing of the job keeps pointing into the client's pages, which the client reuses
for a later job.

Names come from `secrets.token_hex` (128 bits), so they cannot be guessed, and each job
gets a new one; a worker only opens a well-formed name, a regular file of its own user
of at least the announced size. Nothing is left behind: the client holds an ``flock``
on every object it created until it unlinks it (at the job's end beyond the pool's
bounds, at close); an object whose lock nobody holds belongs to a dead client and
`sweep` removes it: the node server sweeps when a client's session ends (a client
killed by SIGKILL), and every new pool sweeps once.

Results come back the same way: a worker whose job's arguments came through shared
memory writes a result of at least `MIN_SIZE` bytes once into
``/dev/shm/dnr-<16 hex of its computation's directory><its pid, 8 hex><32 random
bits>`` (`write_result`); the node server passes the reference on, and the client
reads it and unlinks it. The node unlinks a result it does not pass on, those a
worker that died abruptly left unsent (`unlink_worker_results`: the out-of-memory
killer struck between the object's rename and its report), and, when the client's
session ends, those it passed on that the client never read (killed first); a node
started where a killed one ran unlinks those of its computations (`unlink_results`,
from `nodeserver.leftovers`).

`same_machine` decides whether a node may be sent references; when it says no, or
below `MIN_SIZE`, or when ``/dev/shm`` cannot hold them, arguments and results go
over the socket as before. dispynb never fills ``/dev/shm``: a write that would leave
it less than `ROOM_KEPT_SHARE` of its size free (`check_room`) goes over the socket
too, since another program writing through a mapping there (PyTorch's DataLoader,
say) dies of SIGBUS when the file system is full. Linux only (``/dev/shm``). Setting
the environment variable ``DISPYNB_SHARED_MEMORY=0`` in the client turns it off
(`enabled`): for comparisons, or where ``/dev/shm`` is small.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import ipaddress
import json
import mmap
import os
import re
import resource
import secrets
import stat
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

from dispynb.errors import SerializationError
from dispynb.protocol.framing import Buffer

__all__ = [
    "MAGIC",
    "MIN_SIZE",
    "SHM_DIR",
    "boot_id",
    "check_room",
    "enabled",
    "is_reference",
    "load_reference",
    "make_reference",
    "open_reference",
    "read_reference",
    "reference_name",
    "same_machine",
    "sweep",
    "unlink",
]

#: The shared memory file system (POSIX shm_open's objects on Linux).
SHM_DIR = Path("/dev/shm")
#: Payloads (all buffers of one job) from this size on use shared memory.
MIN_SIZE = 1024 * 1024
#: What dispynb leaves free of /dev/shm: this fraction of its size (docker's 64 MB:
#: 8 MiB), at most `ROOM_KEPT_MAX`; the rest of its jobs go over the socket.
ROOM_KEPT_SHARE = 1 / 8
ROOM_KEPT_MAX = 64 * 1024 * 1024
#: First bytes of a reference; a pickle never starts with them (it starts with 0x80).
MAGIC = b"dispynb-shm-1\n"
#: Longest reference accepted (a name and a few sizes).
MAX_REFERENCE = 4096
#: Names of the client's (pooled) argument objects, and of workers' result objects.
_NAME = re.compile(r"dnb-[0-9a-f]{32}")
_RESULT_NAME = re.compile(r"dnr-[0-9a-f]{32}")
#: A result object its worker is still writing: ``dnr-<prefix>.<the worker's pid>``.
_PARTIAL_NAME = re.compile(r"dnr-[0-9a-f]{16}\.[0-9]+")
_ANY_NAME = re.compile(r"dn[br]-[0-9a-f]{32}")


@functools.cache
def boot_id() -> str:
    """This machine's boot id (changes at every boot), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@functools.cache
def pid_namespace() -> int:
    """This process's pid namespace (the inode of ``/proc/self/ns/pid``), 0 where it
    cannot be told: a pid names the same process only inside one namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def enabled() -> bool:
    """Whether the client may use shared memory (``DISPYNB_SHARED_MEMORY`` != "0")."""
    return os.environ.get("DISPYNB_SHARED_MEMORY", "1").strip() != "0"


def same_machine(
    peer_ip: str, node_boot_id: str, node_pid: int, node_pid_namespace: int
) -> bool:
    """Whether a node can be sent shared memory references.

    All must hold: the connection is over loopback (a node in another network
    namespace or on another host has another address), the node reports this
    machine's boot id (a loopback tunnel to another machine does not) and our pid
    namespace (`pid_namespace`: its pid names another process here, or none, when it
    runs in another, a container sharing the host's network), its process
    is visible here and belongs to our user (it can open our 0600 objects), and its
    ``/dev/shm`` is ours, not a private one (`_mount_of`: what its
    ``/proc/<pid>/mountinfo`` says, which a node's user reads although the node is
    not dumpable, unlike its ``/proc/<pid>/root``).
    """
    try:
        if not ipaddress.ip_address(peer_ip.split("%", 1)[0]).is_loopback:
            return False
    except ValueError:
        return False
    mine = boot_id()
    if not mine or node_boot_id != mine or node_pid <= 0:
        return False
    if not node_pid_namespace or node_pid_namespace != pid_namespace():
        return False
    try:
        with open(f"/proc/{node_pid}/status") as status:
            uids = next(line for line in status if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return False
    if int(uids.split()[2]) != os.geteuid():  # its effective uid
        return False
    # The node's view of /dev/shm (its mount namespace) is the very directory we
    # write to.
    ours = _mount_of("self", SHM_DIR)
    return ours is not None and _mount_of(node_pid, SHM_DIR) == ours


def _mount_of(pid: int | str, path: Path) -> tuple[str, str, str] | None:
    """Where ``path`` is as process ``pid`` sees it, by its /proc/PID/mountinfo:
    the device of the mount that holds it (``major:minor``, one per tmpfs), the
    directory of that device mounted there, and ``path`` below the mount point;
    None if that cannot be read. Two processes that see the same are in the same
    directory."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = str(path)
    found: tuple[str, str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").rstrip("/")
        if target != point and not target.startswith(point + "/"):
            continue
        # The deepest mount point holds it; of two on one point, the later hides
        # the earlier.
        if found is None or len(point) >= len(found[2]):
            found = (fields[2], fields[3], point)
    if found is None:
        return None
    device, root, point = found
    return device, root, target[len(point) :]


def is_reference(buffers: Sequence[Buffer]) -> bool:
    """Whether a job's buffers are one shared memory reference."""
    if len(buffers) != 1:
        return False
    view = memoryview(buffers[0])
    return view.nbytes <= MAX_REFERENCE and bytes(view[: len(MAGIC)]) == MAGIC


def reference_name(reference: Buffer) -> str:
    """The object name in a reference; `SerializationError` if malformed."""
    return _parse(reference)[0]


def make_reference(name: str, buffers: Sequence[memoryview]) -> bytes:
    """The reference to the object ``name`` holding ``buffers`` one after the other.

    Besides the sizes it says which buffers were writable (a ``bytearray``, a
    writable NumPy array's memory): the reader gives those a ``bytearray`` and the
    others ``bytes``, which the unpickler takes as they are, so each buffer is copied
    exactly once, by the kernel, out of the object (`load_reference`).
    """
    fields = {
        "name": name,
        "sizes": [view.nbytes for view in buffers],
        "writable": [not view.readonly for view in buffers],
    }
    return MAGIC + json.dumps(fields).encode()


def _parse(reference: Buffer) -> tuple[str, list[int], list[bool] | None]:
    view = memoryview(reference)
    try:
        fields = json.loads(bytes(view[len(MAGIC) :]))
        name, sizes = fields["name"], fields["sizes"]
        writable = fields.get("writable")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SerializationError(f"malformed shared memory reference: {exc}") from exc
    if not isinstance(name, str) or not _ANY_NAME.fullmatch(name):
        raise SerializationError(
            f"refused shared memory name {str(name)[:80]!r}: not one dispynb creates"
        )
    if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes):
        raise SerializationError("malformed shared memory reference: bad sizes")
    if writable is not None and (
        not isinstance(writable, list)
        or len(writable) != len(sizes)
        or not all(type(w) is bool for w in writable)
    ):
        raise SerializationError("malformed shared memory reference: bad writable")
    return name, sizes, writable


def _open_checked(name: str, total: int) -> int:
    """A file descriptor of the object ``name``, checked: a regular object of this
    user holding at least ``total`` bytes (`SerializationError` otherwise)."""
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SerializationError(
            f"cannot open the job's shared memory {name}: {_why_not_opened(exc)}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise SerializationError(
                f"refused shared memory {name}: not a regular object of this user"
            )
        if info.st_size < total:
            raise SerializationError(
                f"refused shared memory {name}: {info.st_size} bytes, {total} announced"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why_not_opened(exc: OSError) -> str:
    """The cause of a failed open of a shared memory object, for the user: a
    process out of descriptors is not a missing object."""
    if exc.errno == errno.EMFILE:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"{exc.strerror}: this process has used all of its {soft} file "
            "descriptors (a job that ran here before and left files or sockets "
            "open?); close them in the job, or raise the node's limit (ulimit -n)"
        )
    if exc.errno == errno.ENFILE:
        return (
            f"{exc.strerror}: the system's table of open files is full "
            "(fs.file-max); close files elsewhere on this machine"
        )
    return f"{exc.strerror} (gone, or not created by this node's client)"


def open_reference(reference: Buffer) -> tuple[mmap.mmap | None, list[memoryview]]:
    """Open and map (copy-on-write) the object a reference names; the mapping and
    the buffers in it.

    Raises `SerializationError` for a malformed or refused name, an object that is
    gone, not a regular file of this user, or smaller than announced.
    """
    name, sizes, _writable = _parse(reference)
    total = sum(sizes)
    fd = _open_checked(name, total)
    try:
        if total == 0:
            return None, [memoryview(b"") for _ in sizes]
        # Private and writable: a job's write never reaches the client's pages.
        # (No MAP_POPULATE: on a private writable mapping it copies every page.)
        mapped = mmap.mmap(fd, total, flags=mmap.MAP_PRIVATE)
    finally:
        os.close(fd)
    whole = memoryview(mapped)
    views = []
    offset = 0
    for size in sizes:
        views.append(whole[offset : offset + size])
        offset += size
    whole.release()
    return mapped, views


def read_reference(reference: Buffer) -> list[bytes | bytearray]:
    """The buffers a reference names, read into this process's own memory.

    Each buffer is read with one ``pread`` into the object the unpickler keeps: a
    ``bytes`` for one the sender had read-only (a ``bytes`` argument), a
    ``bytearray`` for a writable one. No mapping (whose page faults and unmapping
    cost more than the copy), nothing of the job points into the sender's pages
    (the client rewrites them for later jobs), and one copy per buffer. A reference
    without writability (an older sender) gets ``bytearray`` for every out-of-band
    buffer, which keeps every argument writable as it was.

    Raises `SerializationError` as `open_reference` does, and if the object shrank.
    """
    name, sizes, writable = _parse(reference)
    if writable is None:
        writable = [index > 0 for index in range(len(sizes))]
    fd = _open_checked(name, sum(sizes))
    try:
        buffers: list[bytes | bytearray] = []
        offset = 0
        for size, into in zip(sizes, writable, strict=True):
            buffers.append(_read(fd, name, size, offset, into))
            offset += size
    finally:
        os.close(fd)
    return buffers


def _read(fd: int, name: str, size: int, offset: int, into: bool) -> bytes | bytearray:
    """``size`` bytes at ``offset``: a new ``bytearray`` if ``into``, else ``bytes``."""
    data: bytes | bytearray
    if into:
        data = bytearray(size)
        with memoryview(data) as view:
            done = 0
            while done < size:
                count = os.preadv(fd, [view[done:]], offset + done)
                if count <= 0:
                    break
                done += count
    else:
        data = os.pread(fd, size, offset)  # one read into a new bytes: no zeroing
        while len(data) < size:  # reads of 2 GiB or more come in parts
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                break
            data += more
        done = len(data)
    if done < size:
        raise SerializationError(
            f"shared memory {name} ended before {offset + size} bytes (truncated)"
        )
    return data


def load_reference(reference: Buffer, loads: Callable[[list[Buffer]], Any]) -> Any:
    """Unpickle (with ``loads``) the arguments a reference names, from this process's
    own copy of them (`read_reference`): the client reuses the object for later
    jobs."""
    return loads(list(read_reference(reference)))


def check_room(size: int) -> None:
    """Raise `OSError` (ENOSPC) if writing ``size`` more bytes to /dev/shm would leave
    it less than its share kept free for other programs (`ROOM_KEPT_SHARE`)."""
    stats = os.statvfs(SHM_DIR)
    free = stats.f_bavail * stats.f_frsize
    kept = min(int(stats.f_blocks * stats.f_frsize * ROOM_KEPT_SHARE), ROOM_KEPT_MAX)
    if free - size < kept:
        mib = 1024 * 1024
        raise OSError(
            errno.ENOSPC,
            f"{SHM_DIR} has {free / mib:.1f} MiB free, too little for "
            f"{size / mib:.1f} MiB more while leaving {kept / mib:.1f} MiB to other "
            "programs",
        )


def result_prefix(job_path: str) -> str:
    """The first 16 hex digits of the names of one computation's result objects
    (from its directory, which its node server and its workers both know)."""
    return hashlib.sha256(os.fsencode(job_path)).hexdigest()[:16]


def write_result(buffers: Sequence[Buffer], prefix: str) -> tuple[str, bytes]:
    """Write a job's pickled result into a new object (a worker, for a client on
    this machine); its name and the reference to send instead.

    The name is ``prefix`` (`result_prefix`), the worker's pid (`worker_tag`) and
    32 random bits. The client unlinks it once it has read it; the node server
    unlinks it if it does not pass it on, and, if the worker dies abruptly, every
    object of its tag not passed on (`unlink_worker_results`): killed after the
    rename, before its report, it leaves one that only its name tells of.
    It is written under the worker's own name (`partial_result_name`) and renamed
    once whole, so that what a worker killed meanwhile (the out-of-memory killer:
    the object's pages count against its memory) leaves is known as its own and
    unlinked as it is reaped (`unlink_partial_result`).
    """
    views = [memoryview(b).cast("B") for b in buffers]
    check_room(sum(v.nbytes for v in views))
    name = f"dnr-{prefix}{worker_tag(os.getpid())}{secrets.token_hex(4)}"
    partial = SHM_DIR / partial_result_name(prefix, os.getpid())
    with contextlib.suppress(FileNotFoundError):  # a dead process's of this pid
        os.unlink(partial)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(partial, flags, 0o600)
    try:
        for view in views:
            while view:
                view = view[os.write(fd, view) :]
        os.rename(partial, SHM_DIR / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    finally:
        os.close(fd)
    return name, make_reference(name, views)


def worker_tag(pid: int) -> str:
    """The 8 hex digits of a worker's pid in the names of its result objects."""
    return f"{pid & 0xFFFFFFFF:08x}"


def partial_result_name(prefix: str, pid: int) -> str:
    """The name of the result object the worker ``pid`` of the computation of
    ``prefix`` is writing (one at a time: renamed once whole)."""
    return f"dnr-{prefix}.{pid}"


def unlink_partial_result(prefix: str, pid: int) -> bool:
    """Unlink what the worker ``pid`` (dead now) was writing of a result, if
    anything; whether there was something."""
    try:
        os.unlink(SHM_DIR / partial_result_name(prefix, pid))
    except OSError:
        return False
    return True


def unlink_results(
    prefix: str | tuple[str, ...],
    keep: Container[str] = (),
    *,
    only_dead_writers: bool = False,
) -> int:
    """Unlink the result objects whose names start with ``dnr-`` and ``prefix``
    (a computation's `result_prefix`, whole or partly written; or that and a
    worker's `worker_tag`), except those named in ``keep``: their writers are gone
    and nobody will read them (``prefix``: a tuple of them, scanned for at
    once). ``only_dead_writers``: not those whose writer (the pid in their name)
    still runs, either (where the caller cannot tell whose they are). Returns how
    many were unlinked."""
    # A set, not startswith: a tuple of many (a directory's thousands) costs
    # each name a comparison with every one.
    wanted = {prefix} if isinstance(prefix, str) else set(prefix)
    lengths = {len(one) for one in wanted}
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        if (
            entry.name.startswith("dnr-")
            and any(entry.name[4 : 4 + size] in wanted for size in lengths)
            and (
                _RESULT_NAME.fullmatch(entry.name)
                or _PARTIAL_NAME.fullmatch(entry.name)
            )
            and entry.name not in keep
            and not (only_dead_writers and _writer_runs(entry.name))
        ):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == os.geteuid():
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _writer_runs(name: str) -> bool:
    """Whether the worker that wrote the result object ``name`` (its pid in the
    name: `worker_tag`, or after the dot of a partly written one) may still run
    (so may its node, which may yet pass it on)."""
    try:
        if "." in name:
            pid = int(name.rpartition(".")[2])
        else:
            pid = int(name[4 + 16 : 4 + 24], 16)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True  # another user's process, or no pid: not to be touched
    try:  # a zombie (killed, not reaped yet: its parent was killed too) is gone
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def unlink_worker_results(prefix: str, pid: int, keep: Container[str]) -> int:
    """Unlink what the worker ``pid`` of the computation of ``prefix``, dead now,
    wrote of results (whole or partly) that is not named in ``keep`` (those its
    node passed on: its client reads and unlinks them). How many were unlinked."""
    removed = unlink_results(prefix + worker_tag(pid), keep)
    return removed + unlink_partial_result(prefix, pid)


def is_result_reference(reference: Buffer) -> bool:
    """Whether a reference names a worker's result object (not an argument one)."""
    try:
        return _RESULT_NAME.fullmatch(reference_name(reference)) is not None
    except SerializationError:
        return False


def unlink(name: str) -> None:
    """Remove a shared memory object's name (already gone is fine)."""
    if not _ANY_NAME.fullmatch(name):
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


def sweep() -> int:
    """Unlink the objects of clients that died: dispynb names of this user whose
    ``flock`` nobody holds (a live client holds one on each of its objects). Returns
    how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return 0
    locked = _flocked_files()
    for entry in entries:
        if not _NAME.fullmatch(entry.name):
            continue
        try:
            # A live client's segment (its flock listed) is not even opened.
            info = entry.stat(follow_symlinks=False)
            if (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino) in locked:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: its client is alive
            continue
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def _flocked_files() -> set[tuple[int, int, int]]:
    """``(major, minor, inode)`` of the files ``/proc/locks`` lists with a ``flock``
    (those of lock holders visible in this pid namespace; empty if unreadable)."""
    found: set[tuple[int, int, int]] = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (waiters have "->")
        fields = line.split()
        if len(fields) > 1 and fields[1] == "->":
            continue
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            found.add((int(major, 16), int(minor, 16), int(inode)))
        except ValueError:
            continue
    return found
