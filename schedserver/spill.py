"""What the scheduler keeps for clients that went away, within bounds.

A computation with a recovery id (its client keeps a ``recover_file``) has the messages
meant for its client kept (`KeptMessages`) while the client is away (and, with
``keep_sent``, also those it was sent), for `recover_jobs`. Their payloads (and what
their jobs printed, in their headers: counted as payload) stay in memory only while
all computations together keep fewer than ``--kept_memory`` bytes there
(`SpillStore`); the rest, messages and payloads, go to one file per computation in
the scheduler's private spill directory (``mkdtemp`` under ``--dest_path_prefix``:
mode 0700, files 0600 with random names, removed when the scheduler stops), read
back one message at a time as the client collects them.

Each computation may keep ``--max_kept`` bytes at most. Past that, a result is not
kept: its job's entry says so instead (an error the client sees, the job ends
``Terminated``; exactly one entry per job still), provisional results and files a job
sends are dropped (a warning is logged), and the computation gets no more CPUs while
its client is away (its queued jobs wait, nothing more is lost). So it goes for a
result the disk cannot hold (full): the entry says so, and nothing of it stays on disk.

A client that journals its results (``ComputationSetup.ack_journaled``) says which
it has committed (`ResultsJournaled`): a kept message is dropped once every job it
concerns (its results and starts, a chunk's or a provisional result's job) is
acknowledged (`KeptMessages.journaled`; a file a job sent goes with the attempt
that sent it: it reached the client before that attempt's result), its memory given
back, and its disk space freed at once (`SpillFile`: a hole punched in the spill
file), so that a long computation whose client acknowledges as it goes keeps on disk
only what is not acknowledged. On a file system without holes (logged once) the
space comes back when nothing kept is on disk any more, as the spill file is then
closed. What is not acknowledged stays kept, as without acknowledgements. A
computation held over its quota gets CPUs again once acknowledgements bring what it
keeps back under it (logged).

Each user may keep ``--max_user_kept`` bytes at most in all (`UserKept`): what its
computations and its sessions' backlogs keep together, and the files it sent
(`ClientFiles`), so that one user's many computations, sessions and files cannot
fill the disk the other users' kept results need.
Past it, its results are not kept as past ``--max_kept`` (the error names the
option), and its computation is held until its client comes back, or until room
is freed in the user's quota (its other computations' results collected,
acknowledged or dropped, her files released).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import os
import secrets
import shutil
import tempfile
from typing import Any

from dispynb import lockeddirs
from dispynb.protocol.messages import (
    CRASHED,
    FileFromNode,
    JobProvisional,
    JobResults,
    JobsPlaced,
    Message,
    ResultChunk,
    WireMessage,
    pack_header,
    unpack_header,
)
from dispynb.protocol.records import ResultEntry, is_start
from schedserver.spillfile import Place, SpillFile

logger = logging.getLogger(__name__)

#: A kept message: the message (None while on disk), its payload in memory (or
#: None), where on disk they are (``(offset, size)``: the message's header, then
#: each buffer; None while in memory), and the bytes it counts.
_Kept = tuple[Message | None, list[memoryview] | None, list[Place] | None, int]


def _text_size(text: Any) -> int:
    """Length of a str or bytes field (0 for anything else)."""
    return len(text) if isinstance(text, str | bytes) else 0


#: Bytes a kept message counts besides its payload and texts (its objects and its
#: bookkeeping, in memory also while it is on disk), and each job's entry or start
#: in it (as decoded: a result's entry holds some 270 bytes of objects, a start
#: 180): so that many small messages are bounded as a few large ones are.
MESSAGE_COST = 256
ENTRY_COST = 320
#: ... and each of its payload buffers besides its bytes: its view, its place in
#: a list and its length in the frame the view holds (196 bytes), or its place on
#: disk (``(offset, size)``, 130 bytes in memory while the message is there). A
#: message may carry 65,536 of them, 4 bytes each on the wire when empty: a node's
#: message of 260 kB held 12 MiB here, counted as 256 bytes.
BUFFER_COST = 200
#: ... and, where its client acknowledges results (`KeptMessages.tracking`), each
#: job it concerns: the job's place in the tables of what waits for an
#: acknowledgement (some 340 bytes), also while the message is on disk.
TRACK_COST = 320


def _entry_size(item: Any) -> int:
    """What a result entry counts: its cost, what its job printed, its error."""
    if not isinstance(item, list):
        return ENTRY_COST
    return ENTRY_COST + sum(_text_size(part) for part in item[5:8])


def _header_size(message: Message) -> int:
    """What a kept message counts besides its payload: its cost and its header's
    texts (what jobs printed, their errors, a file's path), so that a job printing
    megabytes is kept within the bounds as one returning them."""
    if isinstance(message, JobResults):
        return (
            MESSAGE_COST
            + sum(_entry_size(item) for item in message.results)
            + ENTRY_COST * len(message.started)
        )
    if isinstance(message, FileFromNode):
        return MESSAGE_COST + _text_size(message.path)
    return MESSAGE_COST


def _kept_size(message: Message, buffers: list[memoryview]) -> int:
    """What a kept message counts while in memory: its payload and
    `BUFFER_COST` per buffer, its cost and texts (`_header_size`)."""
    return (
        sum(b.nbytes for b in buffers)
        + BUFFER_COST * len(buffers)
        + _header_size(message)
    )


def _jobs_of(message: Message) -> set[tuple[int, int]]:
    """The jobs ``(key, attempt)`` a kept message concerns (empty: it is never
    dropped by acknowledgements; so a file a job sent, which names no attempt,
    unless its attempt is given to `KeptMessages.add`)."""
    if isinstance(message, JobResults):
        jobs = {
            (item[0], item[1])
            for item in message.results
            if isinstance(item, list)
            and len(item) > 1
            and type(item[0]) is int
            and type(item[1]) is int
        }
        jobs.update((s[0], s[1]) for s in message.started if is_start(s))
        return jobs
    if isinstance(message, ResultChunk | JobProvisional):
        return {(message.key, message.attempt)}
    if isinstance(message, JobsPlaced):
        return set(zip(message.keys, message.attempts, strict=False))
    return set()


class UserKept:
    """What one user holds at the scheduler in all: what its computations and
    sessions keep (bytes counted as `KeptMessages.size` counts them) and the files
    it sent (`ClientFiles`); and its quota (``--max_user_kept``; 0: no limit)."""

    def __init__(self, user: str, quota: int) -> None:
        self.user = user
        self.quota = quota
        self.size = 0
        #: Something of it was held over the quota when last looked at
        #: (`KeptMessages.full`): room freed in it is to be handed out at once
        #: (`_ServerState.room_freed`), not at the next dispatch.
        self.holding = False

    def room(self) -> float:
        """Bytes the user may still have kept."""
        return self.quota - self.size if self.quota else math.inf


class SpillStore:
    """The scheduler's budget of kept payload bytes in memory, and its directory for
    the rest (made on first use, removed by `close`); ``user_quota``: what each
    user may keep in all (`UserKept`; 0: no limit)."""

    def __init__(self, prefix: str, memory: int, user_quota: int = 0) -> None:
        self.prefix = prefix
        self.memory = memory
        self.in_memory = 0
        self.user_quota = user_quota
        #: Per user, what it keeps (an entry per user ever seen: users are few).
        self._users: dict[str, UserKept] = {}
        self._dir: str | None = None
        #: The shared lock on ``prefix`` while this scheduler runs (`hold`).
        self._held: int | None = None
        #: The shared lock on the spill directory while it exists (`directory`).
        self._dir_held: int | None = None
        #: Holes are punched in spill files (`SpillFile.free`): none failed yet.
        self.holes = True

    def user(self, name: str) -> UserKept:
        """What user ``name`` keeps in all."""
        account = self._users.get(name)
        if account is None:
            account = self._users[name] = UserKept(name, self.user_quota)
        return account

    def clean(self) -> int:
        """Remove the spill directories left by schedulers that were killed (their
        files were unlinked already: only empty directories remain), not those of
        schedulers running on the same prefix (`directory` holds its lock: one
        removed under a running scheduler left it unable to spill); return how
        many."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.prefix):
                if (
                    entry.name.startswith("spill-")
                    and entry.is_dir(follow_symlinks=False)
                    and not lockeddirs.held(entry.path)
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        return removed

    def hold(self) -> None:
        """Lock ``prefix`` (shared) until `close`: a ``dispynb-node --clean`` of a
        directory around it, the node's default ``<tmp>/dispynb`` holding the
        scheduler's default, leaves it to this scheduler (`lockeddirs.held`)."""
        if self._held is None:
            self._held = lockeddirs.hold(self.prefix)

    def directory(self) -> str:
        """The private spill directory (mode 0700), made now if needed."""
        if self._dir is None:
            os.makedirs(self.prefix, mode=0o700, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="spill-", dir=self.prefix)
            # Held while it runs: another scheduler's --clean leaves it (`clean`).
            self._dir_held = lockeddirs.hold(self._dir)
        return self._dir

    def new_file(self) -> int:
        """A new spill file (mode 0600, a random name); its descriptor."""
        path = os.path.join(self.directory(), secrets.token_hex(16))
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        os.unlink(path)  # only its descriptor reaches it: gone with the process
        return fd

    def hole_failed(self, code: int) -> None:
        """Punching a hole in a spill file gave ``code`` (0: it did not fail):
        past a failure, none is tried again (each would fail the same), and the
        space of what is not kept comes back as its spill file closes."""
        if not code:
            return
        self.holes = False
        logger.warning(
            "cannot free parts of spill files under %s (%s): the disk space of "
            "acknowledged results comes back only once nothing kept for their "
            "computation is on disk%s",
            self.prefix,
            os.strerror(code),
            "; give --dest_path_prefix on ext4, xfs, btrfs or tmpfs"
            if code in (errno.EOPNOTSUPP, errno.ENOSYS)
            else "",
        )

    def close(self) -> None:
        """Remove the spill directory; let go of ``prefix``'s lock (`hold`)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        for fd in (self._held, self._dir_held):
            if fd is not None:
                os.close(fd)
        self._held = self._dir_held = None


class KeptMessages:
    """One computation's messages kept for its client, in order (see the module
    docstring); ``quota`` bytes of payload at most, and within what ``user`` may
    keep in all (`SpillStore.user`), if named."""

    def __init__(
        self,
        store: SpillStore,
        name: str,
        quota: int,
        whose: str = "a client that went away",
        user: str | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.quota = quota
        #: Whom the messages wait for, as a dropped result's reason names it.
        self.whose = whose
        self.account = store.user(user) if user is not None else None
        #: Payload bytes kept (in memory and on disk); `_count` changes it.
        self.size = 0
        #: Results, provisional results and files not kept (over the quota).
        self.dropped = 0
        #: Kept messages by their number, oldest first (one may leave from the
        #: middle: `journaled`).
        self._items: dict[int, _Kept] = {}
        self._numbers = itertools.count()
        self._file: SpillFile | None = None
        self._in_memory = 0
        #: Streamed results whose chunks were not kept: why (their entry says it).
        self._dropped_streams: dict[tuple[int, int], str] = {}
        # Something was not kept (`_warn`), and acknowledgements have not brought
        # what it keeps back under its quota since; ``_disk``: because the disk
        # was full (not the quota).
        self._over = False
        self._disk = False
        #: ... because its user keeps all it may (--max_user_kept): lifted once
        #: the user has room again for the largest message not kept (``_wanted``
        #: bytes; `full`), so that it is not lifted only to drop the next result.
        self._by_user = False
        self._wanted = 0
        #: With acknowledgements (`track`): per job ``(key, attempt)`` the kept
        #: messages that concern it, and per message how many of its jobs are not
        #: acknowledged yet.
        self.tracking = False
        self._waiting: dict[tuple[int, int], list[int]] = {}
        self._unacked: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def on_disk(self) -> int:
        """Bytes counted for what is kept on disk (messages, payloads, their cost)."""
        return self.size - self._in_memory

    @property
    def tracked(self) -> int:
        """Jobs whose acknowledgement drops a kept message (with `tracking`)."""
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """Something was not kept (over the quota) since the client last collected,
        and acknowledgements have not brought what is kept back under it since (nor,
        over its user's quota, has room been freed in it: the user's other
        computations are collected, acknowledged or closed, of which this one
        hears nothing, hence the check here)."""
        if self._by_user and self._room() >= self._needed():
            self._over = self._by_user = False
            self._wanted = 0
            logger.info(
                "%s: room freed in the --max_user_kept quota of its user: its jobs "
                "run again (their results kept for %s)",
                self.name,
                self.whose,
            )
        elif self._by_user:
            assert self.account is not None
            self.account.holding = True
        return self._over

    def _needed(self) -> int:
        """The room that lifts its hold: any under its own quota; over its user's,
        enough for what was not kept (its user's room comes back as her other
        computations are collected, a little at a time)."""
        return max(1, self._wanted) if self._by_user else 1

    def _room(self) -> float:
        """Bytes this computation may still keep (its quota, its user's)."""
        room = self.quota - self.size
        return room if self.account is None else min(room, self.account.room())

    def user_room(self) -> float:
        """Bytes its user may still have kept in all (inf: no user, or no limit)."""
        return math.inf if self.account is None else self.account.room()

    def _count(self, size: int) -> None:
        """``size`` bytes more are kept (fewer, if negative)."""
        self.size += size
        if self.account is not None:
            self.account.size += size

    def add(
        self,
        message: Message,
        buffers: list[memoryview],
        job: tuple[int, int] | None = None,
        within_quota: bool = True,
    ) -> None:
        """Keep ``message`` (its payload in memory, or on disk) within the quota;
        ``job``: the job ``(key, attempt)`` it concerns, for a message that does not
        name it (a file a job sent), to drop it with that job's acknowledgement.
        ``within_quota`` False: kept whatever the quota (its client is back and
        takes it next, after what the replay sends before it)."""
        size = _kept_size(message, buffers)
        if within_quota and size > self._room():
            self._wanted = max(self._wanted, size)
        if (
            (within_quota and size > self._room())
            or (isinstance(message, JobResults) and self._dropped_streams)
            or (
                isinstance(message, ResultChunk)
                and (message.key, message.attempt) in self._dropped_streams
            )
        ):
            message, buffers = self._over_quota(
                message, buffers, room=None if within_quota else math.inf
            )
            if message is None:
                return
            size = _kept_size(message, buffers)
        store = self.store
        places = None
        if store.in_memory + size > store.memory:
            # The message too: what jobs printed is not held in memory either.
            try:
                places = self._spill(message, buffers)
            except OSError as exc:  # a full disk: as over the quota, saying so
                message, buffers = self._over_quota(message, buffers, exc)
                if message is None:
                    return
                size = _kept_size(message, buffers)
        number = next(self._numbers)
        jobs: set[tuple[int, int]] = set()
        if self.tracking:
            jobs = _jobs_of(message) if job is None else {job}
        if places is None:
            size += TRACK_COST * len(jobs)
            store.in_memory += size
            self._in_memory += size
            self._items[number] = (message, list(buffers), None, size)
        else:
            size = MESSAGE_COST + sum(BUFFER_COST + n for _offset, n in places)
            size += TRACK_COST * len(jobs)
            self._items[number] = (None, None, places, size)
        self._count(size)
        if jobs:
            self._unacked[number] = len(jobs)
            for one in jobs:
                self._waiting.setdefault(one, []).append(number)

    def _spill(self, message: Message, buffers: list[memoryview]) -> list[Place]:
        """Write ``message`` and its payload to the spill file; their places.
        Raises OSError (nothing of them left on disk) if the disk is full."""
        if self._file is None:
            self._file = SpillFile(self.store, self.name)
        header = memoryview(pack_header(message.to_header()))
        return self._file.write([header, *buffers])

    def journaled(self, jobs: list[Any]) -> int:
        """The client journaled these jobs (``[key, attempt]`` each): drop the
        kept messages that concern only jobs it journaled; how many were dropped.
        Anything else (a job not kept, garbage) is ignored."""
        dropped = 0
        for item in jobs:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and all(type(n) is int for n in item)
            ):
                continue
            for number in self._waiting.pop((item[0], item[1]), ()):
                left = self._unacked.get(number)
                if left is None:
                    continue  # sent to a recovering client already
                if left > 1:
                    self._unacked[number] = left - 1
                    continue
                del self._unacked[number]
                self._drop(number)
                dropped += 1
        if dropped and self._file is not None and self.size == self._in_memory:
            self._close_file()  # nothing kept on disk any more: its space freed
        if dropped and self._over and self._room() >= self._needed():
            logger.info(
                "%s: %s (%.1f MiB kept once its client acknowledged results): its "
                "jobs run again while its client is away",
                self.name,
                "room freed on the disk"
                if self._disk
                else "room freed in its user's --max_user_kept quota"
                if self._by_user
                else "back under its --max_kept quota",
                self.size / 2**20,
            )
            self._over = self._by_user = False
            self._wanted = 0
        return dropped

    def _drop(self, number: int) -> None:
        _message, _buffers, places, size = self._items.pop(number)
        if places is None:
            self._in_memory -= size
            self.store.in_memory -= size
        else:
            assert self._file is not None
            self._file.free(places)
        self._count(-size)

    def pop(self) -> tuple[Message, list[memoryview]]:
        """The oldest kept message and its payload (read back from disk if there)."""
        number = next(iter(self._items))
        message, buffers, places, size = self._items.pop(number)
        self._unacked.pop(number, None)
        self._count(-size)
        if places is None:
            self._in_memory -= size
            self.store.in_memory -= size
        else:
            assert self._file is not None
            header, *buffers = [self._file.read(offset, n) for offset, n in places]
            self._file.free(places)  # in memory now, on its way out
            message = WireMessage.from_header(unpack_header(header, trusted=True))
        assert message is not None and buffers is not None
        if not self._items:
            self._reset()
        return message, buffers

    def clear(self) -> None:
        """Drop everything kept (the computation closed)."""
        self._items.clear()
        self._count(-self.size)
        self._reset()

    def _reset(self) -> None:
        self.store.in_memory -= self._in_memory
        self._in_memory = 0
        self.dropped = 0
        self._over = self._disk = self._by_user = False
        self._wanted = 0
        self._dropped_streams.clear()
        self._waiting.clear()
        self._unacked.clear()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _over_quota(
        self,
        message: Message,
        buffers: list[memoryview],
        disk: OSError | None = None,
        room: float | None = None,
    ) -> tuple[Any, list[memoryview]]:
        """What is kept of a message that does not fit (``disk``: the disk is full,
        nothing with a payload fits; ``room``: what may be kept, if not what the
        quota leaves): results become an error entry each, other payloads are
        dropped (None)."""
        account = self.account
        by_user = account is not None and account.room() < self.quota - self.size
        if disk is None and by_user:
            assert account is not None
            reason = (
                "its result was not kept: the scheduler keeps at most "
                f"{account.quota / 2**20:.0f} MiB of results for user "
                f"{account.user!r} in all, its computations, sessions and files "
                "sent together (--max_user_kept); collect them sooner "
                "(recover_jobs), close the computations you no longer need, or "
                "have it raised"
            )
        elif disk is None:
            reason = (
                "its result was not kept: the scheduler keeps at most "
                f"{self.quota / 2**20:.0f} MiB of results for {self.whose} "
                "(--max_kept); collect them sooner, or have it raised"
            )
        else:
            reason = f"its result was not kept for {self.whose}: {_unwritten(disk)}"
        if isinstance(message, ResultChunk):
            stream = (message.key, message.attempt)
            if stream not in self._dropped_streams:  # the rest of one follows it
                self._warn("a large result", disk, by_user)
                self._dropped_streams[stream] = reason
            return None, []
        if isinstance(message, JobProvisional | FileFromNode):
            self._warn("a provisional result or a file a job sent", disk, by_user)
            self.dropped += 1
            return None, []
        if not isinstance(message, JobResults):
            return message, buffers
        if not message.results:  # starts only: what matters is the results after
            self._warn("the start of a job", disk, by_user)
            return None, []
        results: list[Any] = []
        kept: list[memoryview] = []
        offset = 0
        if disk is not None:
            room = 0
        elif room is None:
            room = self._room()
        for item in message.results:
            entry, streamed = ResultEntry.from_wire(item)
            count = 0 if streamed else entry.buffer_count
            own = buffers[offset : offset + count]
            offset += count
            size = sum(b.nbytes for b in own) + _entry_size(item)
            size += BUFFER_COST * len(own)
            stream = (entry.key, entry.attempt)
            if stream not in self._dropped_streams and size <= room:
                results.append(item)
                kept.extend(own)
                room -= size
                continue
            # Its chunks were not kept: nor is it, for the same reason.
            why = self._dropped_streams.pop(stream, None)
            if why is None:
                self._warn("a result", disk, by_user)
            self.dropped += 1
            results.append(
                entry._replace(
                    outcome=CRASHED,
                    exception=why or reason,
                    buffer_count=0,
                    stdout=entry.stdout[:0],  # (str or bytes) not kept either
                    stderr=entry.stderr[:0],
                ).to_wire()
            )
        return dataclasses.replace(message, results=results), kept

    def _warn(
        self, what: str, disk: OSError | None = None, by_user: bool = False
    ) -> None:
        if self._over:
            return
        self._over, self._disk = True, disk is not None
        self._by_user = by_user and disk is None
        if self._by_user:
            assert self.account is not None
            self.account.holding = True
            logger.warning(
                "%s: %s was not kept for its client: user %r keeps %.1f MiB already "
                "in all its computations and sessions (--max_user_kept); its queued "
                "jobs wait for the client, or for room in that quota",
                self.name,
                what,
                self.account.user,
                self.account.size / 2**20,
            )
        elif disk is None:
            logger.warning(
                "%s: %s was not kept for its client: it keeps %.1f MiB already "
                "(--max_kept); its queued jobs wait for the client",
                self.name,
                what,
                self.size / 2**20,
            )
        elif disk.errno in _NO_ROOM:
            logger.warning(
                "%s: %s was not kept for its client: the disk under %s "
                "(--dest_path_prefix) is full (%s); its queued jobs wait for the "
                "client; make room there",
                self.name,
                what,
                self.store.prefix,
                disk.strerror or disk,
            )
        else:
            logger.warning(
                "%s: %s was not kept for its client: %s; its queued jobs wait for "
                "the client",
                self.name,
                what,
                _unwritten(disk, self.store.prefix),
            )


#: Errors of a write that room on the disk may cure.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


def _unwritten(exc: OSError, prefix: str | None = None) -> str:
    """Why the scheduler could not write what it keeps to its spill directory (under
    ``prefix``, if named), and what cures it: a full disk is not the only cause."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_ROOM:
        return (
            f"the scheduler's disk is full ({reason}); have room made under its "
            "--dest_path_prefix, or collect results sooner"
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return (
            f"the scheduler is out of file descriptors ({reason}); have its limit "
            "raised (LimitNOFILE=, ulimit -n), or collect results sooner"
        )
    if exc.errno == errno.EFBIG:
        return (
            f"the scheduler may not write a file that large ({reason}: its file "
            "size limit, ulimit -f); have that limit raised, or collect results "
            "sooner"
        )
    where = f"under {prefix} (--dest_path_prefix)" if prefix else "to its disk"
    return f"the scheduler cannot write {where}: {reason}"


__all__ = ["KeptMessages", "SpillStore", "UserKept"]
