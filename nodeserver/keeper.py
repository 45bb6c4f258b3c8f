"""`ResultKeeper`: computations whose client may crash, kept for its recovery.

A client that keeps a recovery journal gives each computation a random recovery id.
If its connection is lost, the node does not kill that computation: its jobs go on,
their results are kept for ``keep`` seconds, and a client that presents the recovery id
on an authenticated connection (``dispynb.recover_jobs``) gets them.

Results are kept on disk (`nodeserver.spool`), not in memory, so a large backlog costs
no memory and survives a restart of the node: a node that starts again offers the
results its previous process kept, until they expire. Jobs still running when a node
stops are lost with it.
"""

from __future__ import annotations

import array
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispynb.errors import SerializationError
from dispynb.protocol import shm
from dispynb.protocol.messages import ABANDONED
from dispynb.protocol.records import Utf8Text
from dispynb.wording import counted
from nodeserver.computation import Computation
from nodeserver.spool import ResultSpool, SpoolDir

logger = logging.getLogger(__name__)


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


class ResultKeeper:
    """Recoverable computations of this node and their results, by recovery id.

    Every result of such a computation is recorded (whether or not it reached the
    client, which may have died before it wrote the result to its journal), for
    ``keep`` seconds after the computation ends, unless the client closes it cleanly
    or collects the results (`release`).

    Parameters
    ----------
    spool:
        Where results are kept; None keeps them in memory (tests).
    """

    def __init__(self, spool: ResultSpool | None = None) -> None:
        self._spool = spool
        self._kept: dict[str, Kept] = {}  # by spool key (a digest of the id)
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = PendingBudget()

    def _key(self, recovery_id: str) -> str:
        return ResultSpool.key(recovery_id)

    def load(self) -> int:
        """Offer the results kept by an earlier process of this node; return how many
        computations there were."""
        if self._spool is None:
            return 0
        for key, spool in self._spool.load().items():
            kept = Kept(None, spool, self._spool)
            kept.finished.set()
            self._kept[key] = kept
            expires = spool.expires or time.time() + spool.keep
            if spool.expires is None:  # its node was killed while it ran
                spool.expires = expires
                spool.cut_short = True
                self._spool.write_meta(spool)
            left = max(expires - time.time(), 0.0)
            self._spawn(self._expire(key, kept, left))
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
            if spool.files:
                what = (
                    f"{counted(len(spool.files), 'kept result')} offered to its client"
                )
            else:
                # Nothing to offer, but what its client's recover_jobs hears: its
                # jobs were lost with the node, not "never reached" it.
                what = "no result kept; its client's recover_jobs is told"
            logger.info(
                "computation %s%s: %s until %s (%.0f s from now), then removed",
                spool.name,
                " (its node was killed while it ran)" if spool.cut_short else "",
                what,
                until,
                left,
            )
        return len(self._kept)

    def kept(self, recovery_id: str) -> Kept | None:
        """The kept computation of ``recovery_id``, if any."""
        return self._kept.get(self._key(recovery_id))

    def register(self, recovery_id: str, computation: Computation) -> Kept:
        """A recoverable computation starts."""
        replaced = self._kept.get(self._key(recovery_id))
        if replaced is not None:  # the same id again: the first is not recoverable
            self._forget(replaced)
            self._end_replaced(replaced)
        kept = Kept(computation, budget=self._budget, name=computation.name)
        if self._spool is None:
            kept.no_spool = (
                "the node has no spool for them: it found none it could claim in "
                "its --dest-path (another node holds it, said as it started); give "
                "each node a --dest-path of its own it can write to"
            )
        else:
            kept.memory_cap = memory_cap(self._spool.max_bytes)
            try:
                kept.spool = self._spool.create(recovery_id, computation.name)
                kept.owner = self._spool
            except OSError as exc:
                logger.warning(
                    "cannot spool results of %s (%s): kept in memory",
                    computation.name,
                    exc,
                )
                kept.no_spool = (
                    f"its spool could not be made: {exc}; free space in the node's "
                    "--dest-path, or let the node write there"
                )
        self._kept[self._key(recovery_id)] = kept
        return kept

    @staticmethod
    def record(
        kept: Kept, entry: list[Any], buffers: list[memoryview], kinds: str = ""
    ) -> None:
        """One of its results (also sent to the client, if connected); ``kinds``:
        its buffers' kinds (`nodeserver.ipc.Done.kinds`), if known."""
        if kept.provisional:
            ResultKeeper._drop_provisional(kept, entry[0])  # superseded
        if kept.dropped and kept.deliver is None:
            return  # nobody can claim it any more
        if len(buffers) == 1 and shm.is_reference(buffers):
            entry, buffers = _from_shared_memory(entry, buffers, kept.adopted)
        if kept.acked and not kept.adopted and kept.deliver is None:
            size = _held_size(entry, buffers)
            job = (entry[0], entry[1])
            if (
                kept.pending_bytes + size <= PENDING_BYTES
                and kept.budget.used + size <= PENDING_NODE_BYTES
                and job not in kept.pending  # a client's duplicate: kept for good
            ):
                # Copied: the buffers are the worker's message's, reused after.
                copies = [memoryview(bytes(b)) for b in buffers]
                kept.pending[job] = KeptResult(None, _own_texts(entry), copies, kinds)
                kept.pending_bytes += size
                kept.budget.used += size
                return
        ResultKeeper._keep(kept, entry, buffers, kinds)

    @staticmethod
    def _keep(
        kept: Kept, entry: list[Any], buffers: list[memoryview], kinds: str
    ) -> None:
        """Keep a result for good: in the spool (or in memory without one, or when
        the spool's disk fails, within `Kept.memory_cap`)."""
        result = KeptResult(None, entry, buffers, kinds)
        failed = kept.spool.failed if kept.spool is not None else 0
        if kept.spool is None or kept.owner is None:
            held = ResultKeeper._hold(kept, entry, buffers, kinds)
            if held is not None:
                result = held
            elif kept.deliver is None:
                logger.warning(
                    "result of job %d not kept: the node has no spool for it and "
                    "keeps %.0f MiB at most in memory (--kept-results-size, at "
                    "most %d MiB)",
                    entry[0],
                    kept.memory_cap / 2**20,
                    PENDING_NODE_BYTES >> 20,
                )
                kept.not_kept.add(entry)  # recovery says so, not that it never ran
        elif kept.owner.write(kept.spool, entry, buffers, kinds):
            # A recovering client reads it from the file when its turn comes.
            result = KeptResult(kept.spool.files[-1][0])
            if kept.acked:
                kept.spooled[(entry[0], entry[1])] = kept.spool.files[-1][0]
        elif kept.spool.failed > failed and (
            held := ResultKeeper._hold(kept, entry, buffers, kinds)
        ):
            # The disk failed it (full: a job filled the node's --dest-path), not
            # the spool's size: held in memory, as without a spool (before, it was
            # lost, its job reported to the recovering client as not kept).
            result = held
        elif kept.deliver is None:
            # Not on disk (the spool is full, or the disk): the job's end is kept
            # without its result, so recovery says so, not that it never ran.
            kept.not_kept.add(entry)
        if kept.deliver is not None:
            kept.deliver(result)

    @staticmethod
    def _hold(
        kept: Kept, entry: list[Any], buffers: list[memoryview], kinds: str
    ) -> KeptResult | None:
        """Keep a result in memory, if it fits in `Kept.memory_cap` (None if not)."""
        size = _held_size(entry, buffers)
        if kept.budget.used + size > kept.memory_cap:
            return None
        # Copied: the buffers are the worker's message's, reused after.
        copies = [memoryview(bytes(b)) for b in buffers]
        result = KeptResult(None, _own_texts(entry), copies, kinds)
        kept.results.append(result)
        kept.memory_bytes += size
        kept.budget.used += size
        return result

    @staticmethod
    def keep_provisional(
        kept: Kept, key: int, attempt: int, buffers: list[memoryview]
    ) -> None:
        """A provisional result of a running job: the latest is kept (a copy)."""
        if kept.dropped and kept.deliver is None:
            return
        ResultKeeper._drop_provisional(kept, key)
        size = sum(b.nbytes for b in buffers)
        if (
            kept.provisional_bytes + size > PENDING_BYTES
            or kept.budget.used + size > PENDING_NODE_BYTES
        ):
            logger.info("provisional result of job %d not kept: too large", key)
            return
        copies = [memoryview(bytes(b)) for b in buffers]
        result = KeptResult(None, [PROVISIONAL, key, attempt], copies)
        kept.provisional[key] = result
        kept.provisional_bytes += size
        kept.budget.used += size  # the node's, with the results held
        if kept.deliver is not None:
            kept.deliver(result)

    @staticmethod
    def _drop_provisional(kept: Kept, key: Any) -> None:
        old = kept.provisional.pop(key, None)
        if old is not None:
            size = sum(b.nbytes for b in old.buffers)
            kept.provisional_bytes -= size
            kept.budget.used -= size

    @staticmethod
    def keep_file(
        kept: Kept, key: int, path: str, buffers: list[memoryview]
    ) -> str | None:
        """A file a job sent once its client was gone: kept for a recovering
        client (in the spool, or in memory without one, within `Kept.memory_cap`).
        What its job is told: `FILE_KEPT`, or `FILE_NOT_KEPT` (no room: logged);
        None if nobody can claim it any more."""
        if kept.dropped and kept.deliver is None:
            return None
        entry: list[Any] = [FILE, key, path]
        if kept.spool is None or kept.owner is None:
            size = _HELD_OVERHEAD + sum(b.nbytes for b in buffers)
            if kept.budget.used + size > kept.memory_cap:
                logger.warning(
                    "file %r of job %d not kept: the node has no spool for it and "
                    "keeps %.0f MiB at most in memory (--kept-results-size, at "
                    "most %d MiB)",
                    path,
                    key,
                    kept.memory_cap / 2**20,
                    PENDING_NODE_BYTES >> 20,
                )
                return FILE_NOT_KEPT
            result = KeptResult(None, entry, [memoryview(bytes(b)) for b in buffers])
            kept.results.append(result)
            kept.memory_bytes += size
            kept.budget.used += size
        elif kept.owner.write(kept.spool, entry, buffers):
            result = KeptResult(kept.spool.files[-1][0])
        else:
            return FILE_NOT_KEPT  # the spool full, or its disk: logged
        if kept.deliver is not None:
            kept.deliver(result)
        return FILE_KEPT

    def journaled(self, recovery_id: str, jobs: list[tuple[Any, Any]]) -> None:
        """Its client has these results (``(key, attempt)``) in its journal: they
        are no longer kept (a pending one is dropped, a spooled one removed)."""
        kept = self._kept.get(self._key(recovery_id))
        if kept is None or not kept.acked:
            return
        written: list[str] = []
        for job in jobs:
            result = kept.pending.pop(job, None)
            if result is not None:
                size = _held_size(result.entry, result.buffers)
                kept.pending_bytes -= size
                kept.budget.used -= size
            elif (path := kept.spooled.pop(job, None)) is not None:
                written.append(path)
        # Not while another client collects them (`claim`): it reads those files.
        if written and kept.deliver is None and kept.owner is not None:
            assert kept.spool is not None
            kept.owner.discard(kept.spool, written)

    @staticmethod
    def _write_pending(kept: Kept) -> None:
        """Keep for good what its client has not acknowledged (in their order)."""
        kept.budget.used -= kept.pending_bytes
        pending, kept.pending, kept.pending_bytes = kept.pending, {}, 0
        for result in pending.values():
            ResultKeeper._keep(kept, result.entry, result.buffers, result.kinds)

    @staticmethod
    def _forget(kept: Kept) -> None:
        """A computation no longer kept: what it held goes, and it holds no more."""
        kept.dropped = True
        kept.budget.used -= kept.pending_bytes + kept.provisional_bytes
        kept.budget.used -= kept.memory_bytes
        kept.pending, kept.pending_bytes = {}, 0
        kept.provisional, kept.provisional_bytes = {}, 0
        kept.memory_bytes = 0

    def adopt(
        self, recovery_id: str, keep: float, computation: Computation | None = None
    ) -> bool:
        """Its client's connection is lost: let the jobs finish, keep the results
        (those it had not acknowledged as journaled too).

        False if ``recovery_id`` is kept for another computation than
        ``computation``: its client came back on a new connection before the node
        saw this one end, and set it up again there; this one is for nobody."""
        key = self._key(recovery_id)
        kept = self._kept.get(key)
        if (
            computation is not None
            and kept is not None
            and kept.computation is not computation
        ):
            return False
        if kept is None or kept.computation is None:
            return True
        self._write_pending(kept)
        logger.info(
            "client of computation %s gone: its jobs go on, results kept %.0f s",
            kept.computation.name,
            keep,
        )
        if kept.spool is not None and kept.owner is not None:
            kept.spool.keep = keep
            kept.owner.write_meta(kept.spool)
        kept.adopted = True
        kept.finisher = self._spawn(self._finish(key, kept, keep))
        return True

    def _end_replaced(self, kept: Kept) -> None:
        """Its client set the computation up again on a new connection: it gave up
        on the jobs it left here when it lost this node (they ended Abandoned, or
        run elsewhere). If adopted, those would run on for nobody (queued ones
        would even start): they are terminated. (Not adopted yet, its session
        closes it when it ends: see `adopt`.)"""
        computation, finisher = kept.computation, kept.finisher
        if not kept.adopted or computation is None:
            return
        kept.computation = None
        logger.info(
            "computation %s: its client set it up again: the jobs it left are "
            "terminated",
            computation.name,
        )
        if finisher is not None:
            # It stops waiting for them (a shutdown of the process already under
            # way runs to its end, and the close below waits for it).
            finisher.cancel()

        async def terminate() -> None:
            if finisher is not None:
                await asyncio.wait({finisher})
            await computation.close(terminate=True)

        self._spawn(terminate())

    async def _finish(self, key: str, kept: Kept, keep: float) -> None:
        assert kept.computation is not None
        try:
            await asyncio.wait_for(kept.computation.close(terminate=False), keep)
        except TimeoutError:
            logger.info(
                "computation %s: its client did not come back in %.0f s: the jobs "
                "still running are terminated (their results could not be kept)",
                kept.computation.name,
                keep,
            )
            await kept.computation.close(terminate=True)
        kept.finished.set()
        # Its jobs are over: what is kept is its results. The computation holds its
        # client's ended session (connection, outbox, tasks' frames): freed now,
        # not when the results expire (an hour by default).
        kept.computation = None
        if kept.spool is not None and kept.owner is not None:
            kept.spool.expires = time.time() + keep
            kept.owner.write_meta(kept.spool)
        await self._expire(key, kept, keep)

    async def _expire(self, key: str, kept: Kept, after: float) -> None:
        await asyncio.sleep(after)
        if self._kept.get(key) is kept:
            self._drop(key)
            name = kept.spool.name if kept.spool else "?"
            logger.info("results of computation %s dropped (expired)", name)

    def claim(
        self, recovery_id: str, deliver: Deliver
    ) -> tuple[Kept, list[KeptResult]] | None:
        """The kept computation and every result recorded so far (spooled ones are
        read only when `Kept.open` is called: none is in memory); results recorded
        from now on go to ``deliver``."""
        kept = self._kept.get(self._key(recovery_id))
        if kept is None:
            return None
        if kept.spool is not None and kept.spool.key is None and kept.owner:
            # Left by an earlier process: its files are checked with the id now.
            kept.owner.check_names(kept.spool, recovery_id)
        self._write_pending(kept)
        recorded = list(kept.results) + kept.not_kept.results()
        recorded += kept.provisional.values()  # of jobs still running
        if kept.spool is not None:
            recorded[:0] = [KeptResult(path) for path, _size in kept.spool.files]
        kept.deliver = deliver
        return kept, recorded

    def release(self, recovery_id: str) -> None:
        """Its client closed it, or collected its results: forget them."""
        self._drop(self._key(recovery_id))

    def _drop(self, key: str) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._forget(kept)
        if kept is not None and kept.spool is not None and kept.owner is not None:
            kept.owner.remove(kept.spool)

    @property
    def running(self) -> bool:
        """Whether a computation whose client is gone may still run jobs."""
        return any(k.adopted and not k.finished.is_set() for k in self._kept.values())

    async def drain(self) -> None:
        """Wait until the jobs of computations whose client is gone have ended (the
        node drains; the others are its sessions' to wait for)."""
        await asyncio.gather(
            *(k.finished.wait() for k in list(self._kept.values()) if k.adopted)
        )

    async def close(self) -> None:
        """Node shutdown: stop the kept computations; spooled results stay on disk
        (a restarted node offers them until they expire)."""
        for task in self._tasks:
            task.cancel()
        kept, self._kept = list(self._kept.values()), {}
        now = time.time()
        for entry in kept:
            self._write_pending(entry)  # its client may be connected still
            spool, owner = entry.spool, entry.owner
            if spool is not None and owner is not None and spool.expires is None:
                spool.expires = now + spool.keep
                owner.write_meta(spool)
        await asyncio.gather(
            *(k.computation.close(terminate=True) for k in kept if k.computation),
            return_exceptions=True,
        )
        for entry in kept:  # with the ends of the jobs just terminated
            if entry.spool is not None:
                ResultSpool.report_failures(entry.spool, "the node stops")
            _report_lost_from_memory(entry)
        if self._spool is not None:  # what was written since the last flush
            await asyncio.to_thread(self._spool.sync)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _report_lost_from_memory(kept: Kept) -> None:
    """Log what ``kept`` held in memory for its client's recovery (the disk refused
    it, or the node has no spool): the node stops, so it is lost. The line about
    the results the disk refused only counted them, as if they were safe; it named
    a computation gone with its jobs "?", and advised on the disk whatever the
    cause."""
    if kept.dropped or not kept.results:
        return
    files = sum(1 for r in kept.results if r.entry and r.entry[0] == FILE)
    what = counted(len(kept.results) - files, "result")
    if files:
        what += f" and {counted(files, 'file')} its jobs sent"
    if kept.spool is None or kept.owner is None:
        why = kept.no_spool or "the node has no spool for them"
    else:
        why = (
            f"its disk refused them: {kept.spool.failure or 'see above'}; free "
            "space in the node's --dest-path, or let the node write there"
        )
    logger.warning(
        "computation %s: %s held in memory for its client's recover_jobs %s lost "
        "as the node stops (%s)",
        kept.name or (kept.spool.name if kept.spool is not None else "unnamed"),
        what,
        "is" if len(kept.results) == 1 else "are",
        why,
    )


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
