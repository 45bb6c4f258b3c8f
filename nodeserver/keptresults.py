"""`Kept`: one computation kept for its client's recovery, and where its results go.

A result of a computation whose client may come back (`nodeserver.keeper`) is held
in memory while its client has not acknowledged it as journaled (`PENDING_BYTES`),
written to the spool (`nodeserver.spool`), or, for want of a spool or when its disk
fails, held in memory within `Kept.memory_cap`; the jobs whose results could not be
kept are remembered compactly (`NotKept`), so that recovery says they ran.
"""

from __future__ import annotations

import array
import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispynb.errors import SerializationError
from dispynb.protocol import shm
from dispynb.protocol.messages import ABANDONED
from dispynb.protocol.records import Utf8Text
from nodeserver.computation import Computation
from nodeserver.spool import ResultSpool, SpoolDir

#: The keeper's logger (its log lines keep the name they had there).
logger = logging.getLogger("nodeserver.keeper")


_NOT_KEPT_REASON = (
    "the node ran the job but could not keep its result for recovery (its "
    "kept-results spool was full or could not be written: see the node's log; "
    "dispynb-node --kept-results-size)"
)


#: Why a job's kept result is not sent: its file could not be read, or failed the
#: node's check (`nodeserver.spoolcheck`).
LOST_REASON = (
    "the node ran the job but its kept result was lost: its file could not be read, "
    "or failed the node's check (torn as the node's machine stopped, or changed "
    "since the node wrote it: its jobs can write there); see the node's log"
)


def _not_kept(
    key: int, attempt: int, start: float, end: float, reason: str = _NOT_KEPT_REASON
) -> list[Any]:
    """A job's end in place of its result entry, which could not be kept."""
    return [key, attempt, ABANDONED, start, end, "", "", reason, 0]


def lost_entry(key: int, attempt: int) -> list[Any]:
    """The end of a job whose kept result's file cannot be read: it ran (it must
    not be taken for one that never did)."""
    return _not_kept(key, attempt, 0.0, 0.0, LOST_REASON)


@dataclass(eq=False)
class NotKept:
    """The jobs whose results could not be kept (the spool full): key, attempt,
    start and end time each, in arrays, about 32 bytes a job. A computation that
    runs on once the spool is full ends a job after another without a result to
    keep; a `KeptResult` and entry list each cost ~380 bytes, which grew a node's
    memory with every job while the computation lived."""

    keys: array.array[int] = field(default_factory=lambda: array.array("q"))
    times: array.array[float] = field(default_factory=lambda: array.array("d"))
    #: Those whose key or attempt a 64-bit array cannot hold (a client's own
    #: numbers: any msgpack integer), kept as they are.
    others: list[list[Any]] = field(default_factory=list)

    def add(self, entry: list[Any]) -> None:
        key, attempt, _outcome, start, end = entry[:5]
        if _INT64_MIN <= key <= _INT64_MAX and _INT64_MIN <= attempt <= _INT64_MAX:
            self.keys.extend((key, attempt))
            self.times.extend((float(start or 0.0), float(end or 0.0)))
        else:
            self.others.append(_not_kept(key, attempt, start, end))

    def results(self) -> list[KeptResult]:
        """Each job's end, saying why its result was not kept."""
        keys, times = self.keys, self.times
        ends = [
            KeptResult(None, _not_kept(keys[i], keys[i + 1], times[i], times[i + 1]))
            for i in range(0, len(keys), 2)
        ]
        return ends + [KeptResult(None, entry) for entry in self.others]


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

#: Bytes of results one kept computation holds in memory while its client has not
#: acknowledged them as journaled (a round trip and a commit, normally); the
#: others are written to the spool at once, as without acknowledgements.
PENDING_BYTES = 16 << 20
#: The same for all the node's computations together (one client may set up many).
PENDING_NODE_BYTES = 64 << 20
#: What a held result costs besides its buffers and output (its entry, copies).
_HELD_OVERHEAD = 512


def _held_size(entry: list[Any], buffers: list[memoryview]) -> int:
    """Bytes of memory a held result takes: its buffers and its output (stdout,
    stderr, traceback: all of it, without ``max_output``) count."""
    size = _HELD_OVERHEAD + sum(b.nbytes for b in buffers)
    return size + sum(sys.getsizeof(text) for text in entry[5:8] if text)


def _own_texts(entry: list[Any]) -> list[Any]:
    """``entry`` whose output held as views of the worker's message (`Utf8Text`)
    is copied, as its buffers are: a result held for long must not keep that
    whole message alive."""
    if not any(
        type(text) is Utf8Text and type(text.data) is memoryview for text in entry[5:8]
    ):
        return entry
    return [
        Utf8Text(bytes(item.data))
        if type(item) is Utf8Text and type(item.data) is memoryview
        else item
        for item in entry
    ]


def memory_cap(spool_bytes: int) -> int:
    """Bytes of memory a node whose spool holds ``spool_bytes`` at most
    (``--kept-results-size``) keeps for clients that may come back, when it cannot
    write them to its spool: as much, within `PENDING_NODE_BYTES`."""
    return min(spool_bytes, PENDING_NODE_BYTES)


@dataclass(eq=False)
class PendingBudget:
    """Bytes held for clients that have not acknowledged them yet, node-wide."""

    used: int = 0


@dataclass(eq=False)
class KeptResult:
    """One kept result: a spooled file (``path``, read only when it is sent), or, if
    it is not on disk, the result itself (``entry``, ``buffers``, ``kinds``)."""

    path: str | None = None
    entry: list[Any] = field(default_factory=list)
    buffers: list[memoryview] = field(default_factory=list)
    #: The buffers' `ResultChunk.kind` letters, when known.
    kinds: str = ""


#: ``deliver(result)``: hand one kept result to the recovering client.
Deliver = Callable[[KeptResult], None]

#: First item of the entry of a kept file a job sent (``[FILE, key, path]``) and of
#: a kept provisional result (``[PROVISIONAL, key, attempt]``): a result's entry
#: starts with its job's key, an integer.
FILE = "file"
PROVISIONAL = "provisional"

#: What a job that sends a file once its client is gone is told (-1: the client
#: did not write it; `recover_jobs` will).
FILE_KEPT = (
    "the client's connection to the node ended (the client stopped or was cut off): "
    "the file was not saved; the node keeps it for the client's recover_jobs"
)
#: What it is told when the node could not keep it (no room: see the node's log).
FILE_NOT_KEPT = (
    "the client's connection to the node ended (the client stopped or was cut off): "
    "the file was not saved, and the node could not keep it for the client's "
    "recover_jobs (no room; see the node's log, dispynb-node --kept-results-size)"
)


@dataclass(eq=False)
class Kept:
    """One kept computation and its undelivered results.

    ``computation`` is None for results a previous node process kept, and once its
    jobs ended (they are gone); ``results`` holds only what could not be spooled (a
    disk error).
    """

    computation: Computation | None
    spool: SpoolDir | None = None
    owner: ResultSpool | None = None
    results: list[KeptResult] = field(default_factory=list)
    #: Jobs that ended with no result kept (compactly: there may be millions).
    not_kept: NotKept = field(default_factory=NotKept)
    deliver: Deliver | None = None  # a recovering client's session
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    adopted: bool = False  # its client is gone; the keeper closes it
    #: Its connected client says which results it journaled (`ResultsJournaled`):
    #: those need not be kept. Until it does, a result waits in ``pending`` (in
    #: memory, ``PENDING_BYTES`` at most, by ``(key, attempt)``), written to the
    #: spool only if its client goes away first (`ResultKeeper.adopt`), another
    #: claims it, the node closes, or ``pending`` is full.
    acked: bool = False
    #: No longer kept (its client closed it, collected its results, or used its
    #: recovery id again): what it still records is not kept, only delivered.
    dropped: bool = False
    pending: dict[tuple[Any, Any], KeptResult] = field(default_factory=dict)
    pending_bytes: int = 0
    #: The node's (shared by its computations), set by `ResultKeeper.register`.
    budget: PendingBudget = field(default_factory=PendingBudget)
    #: Once adopted: the task that waits for its jobs, then keeps the results.
    finisher: asyncio.Task[None] | None = field(default=None, repr=False)
    #: With ``acked``: the spool file of each result written there, to remove
    #: once it is acknowledged.
    spooled: dict[tuple[Any, Any], str] = field(default_factory=dict)
    #: The latest provisional result of each job still running (by key), in
    #: memory (`PENDING_BYTES` at most, and counted in ``budget``): a recovering
    #: client gets it.
    provisional: dict[Any, KeptResult] = field(default_factory=dict)
    provisional_bytes: int = 0
    #: Bytes of the results and files kept in ``results`` for want of a spool
    #: (counted in ``budget``), and the most ``budget`` may hold with them
    #: (`memory_cap`).
    memory_bytes: int = 0
    memory_cap: int = PENDING_NODE_BYTES
    #: Its computation's name, as its client named it (kept once the computation
    #: is gone: what the node's log calls it).
    name: str = ""
    #: Without a spool: why, and what gives it one (`_report_lost_from_memory`).
    no_spool: str = ""
    #: The recovery sending its results now (its task, and its connection): one
    #: at a time, since each holds a copy of the result it sends; a later one
    #: ends it (`sessionrecovery`).
    sending: tuple[asyncio.Task[None], Any] | None = field(default=None, repr=False)

    def open(self, result: KeptResult) -> tuple[list[Any], list[memoryview], str]:
        """``(entry, buffers, kinds)`` of a kept result: a spooled one's buffers map
        its file (no copy in memory). Raises OSError if it cannot be read."""
        if result.path is None:
            return result.entry, result.buffers, result.kinds
        opened = None
        if self.owner is not None and self.spool is not None:
            opened = self.owner.open(self.spool, result.path)
        if opened is None:
            raise OSError(f"the kept result {result.path} cannot be read")
        return opened

    def record(
        self, entry: list[Any], buffers: list[memoryview], kinds: str = ""
    ) -> None:
        """One of its results (also sent to the client, if connected); ``kinds``:
        its buffers' kinds (`nodeserver.ipc.Done.kinds`), if known."""
        if self.provisional:
            self._drop_provisional(entry[0])  # superseded
        if self.dropped and self.deliver is None:
            return  # nobody can claim it any more
        if len(buffers) == 1 and shm.is_reference(buffers):
            entry, buffers = _from_shared_memory(entry, buffers, self.adopted)
        if self.acked and not self.adopted and self.deliver is None:
            size = _held_size(entry, buffers)
            job = (entry[0], entry[1])
            if (
                self.pending_bytes + size <= PENDING_BYTES
                and self.budget.used + size <= PENDING_NODE_BYTES
                and job not in self.pending  # a client's duplicate: kept for good
            ):
                # Copied: the buffers are the worker's message's, reused after.
                copies = [memoryview(bytes(b)) for b in buffers]
                self.pending[job] = KeptResult(None, _own_texts(entry), copies, kinds)
                self.pending_bytes += size
                self.budget.used += size
                return
        self._keep(entry, buffers, kinds)

    def _keep(self, entry: list[Any], buffers: list[memoryview], kinds: str) -> None:
        """Keep a result for good: in the spool (or in memory without one, or when
        the spool's disk fails, within `Kept.memory_cap`)."""
        result = KeptResult(None, entry, buffers, kinds)
        failed = self.spool.failed if self.spool is not None else 0
        if self.spool is None or self.owner is None:
            held = self._hold(entry, buffers, kinds)
            if held is not None:
                result = held
            elif self.deliver is None:
                logger.warning(
                    "result of job %d not kept: the node has no spool for it and "
                    "keeps %.0f MiB at most in memory (--kept-results-size, at "
                    "most %d MiB)",
                    entry[0],
                    self.memory_cap / 2**20,
                    PENDING_NODE_BYTES >> 20,
                )
                self.not_kept.add(entry)  # recovery says so, not that it never ran
        elif self.owner.write(self.spool, entry, buffers, kinds):
            # A recovering client reads it from the file when its turn comes.
            result = KeptResult(self.spool.files[-1][0])
            if self.acked:
                self.spooled[(entry[0], entry[1])] = self.spool.files[-1][0]
        elif self.spool.failed > failed and (held := self._hold(entry, buffers, kinds)):
            # The disk failed it (full: a job filled the node's --dest-path), not
            # the spool's size: held in memory, as without a spool (before, it was
            # lost, its job reported to the recovering client as not kept).
            result = held
        elif self.deliver is None:
            # Not on disk (the spool is full, or the disk): the job's end is kept
            # without its result, so recovery says so, not that it never ran.
            self.not_kept.add(entry)
        if self.deliver is not None:
            self.deliver(result)

    def _hold(
        self, entry: list[Any], buffers: list[memoryview], kinds: str
    ) -> KeptResult | None:
        """Keep a result in memory, if it fits in `Kept.memory_cap` (None if not)."""
        size = _held_size(entry, buffers)
        if self.budget.used + size > self.memory_cap:
            return None
        # Copied: the buffers are the worker's message's, reused after.
        copies = [memoryview(bytes(b)) for b in buffers]
        result = KeptResult(None, _own_texts(entry), copies, kinds)
        self.results.append(result)
        self.memory_bytes += size
        self.budget.used += size
        return result

    def keep_provisional(
        self, key: int, attempt: int, buffers: list[memoryview]
    ) -> None:
        """A provisional result of a running job: the latest is kept (a copy)."""
        if self.dropped and self.deliver is None:
            return
        self._drop_provisional(key)
        size = sum(b.nbytes for b in buffers)
        if (
            self.provisional_bytes + size > PENDING_BYTES
            or self.budget.used + size > PENDING_NODE_BYTES
        ):
            logger.info("provisional result of job %d not kept: too large", key)
            return
        copies = [memoryview(bytes(b)) for b in buffers]
        result = KeptResult(None, [PROVISIONAL, key, attempt], copies)
        self.provisional[key] = result
        self.provisional_bytes += size
        self.budget.used += size  # the node's, with the results held
        if self.deliver is not None:
            self.deliver(result)

    def _drop_provisional(self, key: Any) -> None:
        old = self.provisional.pop(key, None)
        if old is not None:
            size = sum(b.nbytes for b in old.buffers)
            self.provisional_bytes -= size
            self.budget.used -= size

    def keep_file(self, key: int, path: str, buffers: list[memoryview]) -> str | None:
        """A file a job sent once its client was gone: kept for a recovering
        client (in the spool, or in memory without one, within `Kept.memory_cap`).
        What its job is told: `FILE_KEPT`, or `FILE_NOT_KEPT` (no room: logged);
        None if nobody can claim it any more."""
        if self.dropped and self.deliver is None:
            return None
        entry: list[Any] = [FILE, key, path]
        if self.spool is None or self.owner is None:
            size = _HELD_OVERHEAD + sum(b.nbytes for b in buffers)
            if self.budget.used + size > self.memory_cap:
                logger.warning(
                    "file %r of job %d not kept: the node has no spool for it and "
                    "keeps %.0f MiB at most in memory (--kept-results-size, at "
                    "most %d MiB)",
                    path,
                    key,
                    self.memory_cap / 2**20,
                    PENDING_NODE_BYTES >> 20,
                )
                return FILE_NOT_KEPT
            result = KeptResult(None, entry, [memoryview(bytes(b)) for b in buffers])
            self.results.append(result)
            self.memory_bytes += size
            self.budget.used += size
        elif self.owner.write(self.spool, entry, buffers):
            result = KeptResult(self.spool.files[-1][0])
        else:
            return FILE_NOT_KEPT  # the spool full, or its disk: logged
        if self.deliver is not None:
            self.deliver(result)
        return FILE_KEPT

    def write_pending(self) -> None:
        """Keep for good what its client has not acknowledged (in their order)."""
        self.budget.used -= self.pending_bytes
        pending, self.pending, self.pending_bytes = self.pending, {}, 0
        for result in pending.values():
            self._keep(result.entry, result.buffers, result.kinds)

    def forget(self) -> None:
        """A computation no longer kept: what it held goes, and it holds no more."""
        self.dropped = True
        self.budget.used -= self.pending_bytes + self.provisional_bytes
        self.budget.used -= self.memory_bytes
        self.pending, self.pending_bytes = {}, 0
        self.provisional, self.provisional_bytes = {}, 0
        self.memory_bytes = 0

    def journaled(self, jobs: list[tuple[Any, Any]]) -> None:
        """Its client has these results (``(key, attempt)``) in its journal: they
        are no longer kept (a pending one is dropped, a spooled one removed)."""
        if not self.acked:
            return
        written: list[str] = []
        for job in jobs:
            result = self.pending.pop(job, None)
            if result is not None:
                size = _held_size(result.entry, result.buffers)
                self.pending_bytes -= size
                self.budget.used -= size
            elif (path := self.spooled.pop(job, None)) is not None:
                written.append(path)
        # Not while another client collects them (`ResultKeeper.claim`): it reads
        # those files.
        if written and self.deliver is None and self.owner is not None:
            assert self.spool is not None
            self.owner.discard(self.spool, written)


def _from_shared_memory(
    entry: list[Any], buffers: list[memoryview], orphan: bool
) -> tuple[list[Any], list[memoryview]]:
    """A result a worker wrote to shared memory, for its client on this machine: the
    kept copy holds the bytes themselves (a connected client unlinks the object once
    it has read it; an ``orphan``'s, whose client is gone, is unlinked here), so a
    later client recovering the result reads no reference."""
    try:
        name = shm.reference_name(buffers[0])
        mapped, views = shm.open_reference(buffers[0])
    except SerializationError as exc:
        logger.warning("result of job %s not kept: %s", entry[0], exc)
        return entry, buffers
    copies = [memoryview(bytes(view)) for view in views]
    for view in views:
        view.release()
    if mapped is not None:
        mapped.close()
    if orphan:
        shm.unlink(name)
    entry = list(entry)
    entry[8] = len(copies)  # ResultEntry.buffer_count
    return entry, copies
