"""The Ray engine's state: its nodes and actors, and what the parts of `RayBackend`
share (`_RayState`). ``RayBackend`` (`dispynb.backends.ray`) is made of the parts:
`_rayactors` (the actors on the Ray nodes), `_rayjobs` (jobs: queue, dispatch,
completion), `_raycancels` (cancels, skips of jobs waiting on an actor), `_raydeaths`
(jobs whose actor died under them) and `_rayinbox` (what running jobs send before
they end).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dispynb._loop import Coalescer
from dispynb.backends.base import (
    ClusterConfig,
    JobEvents,
    JobRequest,
    NodeInfo,
    Outcome,
)
from dispynb.errors import SerializationError
from dispynb.executorrunner import dispynb_executor
from dispynb.job import JobStatus
from dispynb.protocol import serialize

if TYPE_CHECKING:
    from dispynb.backends.ray import RayEngine

_PLAIN = frozenset({int, float, str, bytes, bytearray, bool, type(None), complex})


@dataclass(eq=False)
class _Node:
    """A Ray node and the actors of this cluster on it."""

    ray_id: str
    host: str
    port: int
    slots: list[_Slot] = field(default_factory=list)
    info: NodeInfo | None = None  # set when its first actor is ready
    closed: bool = False


@dataclass(eq=False)
class _Slot:
    """One actor: a worker running one job at a time."""

    handle: Any
    node: _Node
    #: (key, attempt, ref) of the jobs sent to it, in the order it runs them (the
    #: jobs of a batch share their call's ref).
    inflight: collections.deque[tuple[int, int, Any]] = field(
        default_factory=collections.deque
    )
    ready: bool = False
    dead: bool = False
    pid: int = 0  # of the actor's process, once set up
    #: The key whose cancel killed the actor (its job ends Terminated).
    killed_for: int | None = None
    #: The running job's ``job_timeout`` timer.
    timer: Any = None
    #: When its running call began (``time.monotonic``).
    since: float = 0.0


class _RayState:
    """The state of one `JobCluster`'s computation on Ray, on the façade's loop,
    and the helpers every part uses. The methods declared here and raising
    `NotImplementedError` are the parts' own (one part calls another's)."""

    def __init__(
        self, ray: Any, engine: RayEngine, events: JobEvents, config: ClusterConfig
    ) -> None:
        self._ray = ray
        self._engine = engine
        self._events = events
        self._config = config
        self._runner = config.runner
        opts = config.options
        self._reentrant = opts.reentrant
        #: Whether the jobs are an executor's (their arguments hold its calls').
        self._calls = opts.computation is dispynb_executor
        self._files_dir = opts.files_dir
        self._queue: collections.deque[JobRequest] = collections.deque()
        #: Jobs of ``submit_node`` waiting for their node, by Ray node id.
        self._pinned: dict[str, collections.deque[JobRequest]] = {}
        self._incoming: collections.deque[JobRequest] = collections.deque()
        self._jobs: dict[int, JobRequest] = {}  # queued or in flight
        self._where: dict[int, _Slot] = {}  # in flight
        self._attempts: dict[int, int] = {}
        #: Keys to cancel, killing their actor if they run.
        self._cancelling: set[int] = set()
        #: Keys waiting on an actor whose skip is asked (`JobActor.skip`), and why:
        #: "cancel", "unstarted" (cancel it only if it has not begun), "steal"
        #: (taken back for an idle actor, see `_steal`).
        self._skipping: dict[int, str] = {}
        #: Keys whose skip got no answer (a Ray error other than a lost actor), and
        #: why it was asked: taken as begun, unless their call replies skipped.
        self._unanswered: dict[int, str] = {}
        #: Skips `_ask_skip` gathered for `_send_skips`: ``(key, attempt)`` by actor.
        self._skip_asks: dict[_Slot, list[tuple[int, int]]] = {}
        #: Ray calls that asked actors to skip jobs (`JobActor.skip`).
        self._skip_calls = 0
        #: Keys an actor said had begun when asked to skip them: not asked again.
        self._begun_keys: set[int] = set()
        #: The timer that looks again for calls to take back (`_steal`), if set.
        self._steal_timer: Any = None
        self._timed_out_keys: set[int] = set()
        self._to_cancel: collections.deque[tuple[list[int], bool]] = collections.deque()
        self._started: dict[int, int] = {}  # key: its attempt reported running
        self._sent: dict[int, int] = {}  # inbox messages received per key
        self._held: dict[int, tuple[_Node, Outcome, int, Any]] = {}
        #: Exit status a job's ``os._exit`` sent before its actor died, by key.
        self._exited: dict[int, int] = {}
        #: Jobs whose actor died while they ran, not killed by us: its slot, the
        #: pid of its process then, Ray's reason and whether they were a batch,
        #: until they are settled (`_raydeaths._Deaths._settle_dying`).
        self._dying: dict[int, tuple[_Slot, int, str, bool]] = {}
        #: Keys of `_dying` waiting for the actor's next life to say how it died.
        self._awaiting_life: set[int] = set()
        #: How earlier lives of actors ended, as their next lives said: (signal
        #: number or 0, faulthandler's report) by (Ray node id, pid).
        self._lives: dict[tuple[str, int], tuple[int, str]] = {}
        #: Hosts of a reentrant job's attempts lost with their worker (at most
        #: ``max_attempts``: a job that kills its worker each time is abandoned).
        self._lost_on: dict[int, list[str]] = {}
        self._max_attempts = int(opts.max_attempts)
        self._nodes: dict[str, _Node] = {}
        self._slots: list[_Slot] = []
        #: Why no actor is left to run jobs (all died for good), until a node joins.
        self._no_worker: str | None = None
        #: Calls that ended: (actor, their (key, attempt) jobs, batch?, future).
        self._completions: collections.deque[
            tuple[_Slot, tuple[tuple[int, int], ...], bool, Any]
        ] = collections.deque()
        self._completions_lock = threading.Lock()
        self._pump = Coalescer(self._runner, self._schedule)
        self._closed = False
        self._startup: concurrent.futures.Future[None] = concurrent.futures.Future()
        #: Why actors could not be set up: (reason, setup's traceback or "").
        self._setup_errors: list[tuple[str, str]] = []
        self._inbox: Any = None  # the engine's, shared by its clusters
        self._inbox_name = ""  # its name (for the actors: not a handle)
        #: This cluster's in the shared inbox (its jobs' messages carry it).
        self._token = uuid.uuid4().hex
        self._actor_class: Any = None
        self._strategy: Any = None
        self._max_output: int | str | None = None
        self._args_refs: tuple[Any, ...] = ()
        #: Average seconds a job ran (recent ones weigh more); None before any.
        self._run_time: float | None = None
        #: Ray calls that carried several jobs (`JobActor.run_batch`).
        self._batches_sent = 0
        #: Inbox messages that arrived ahead of an earlier one of their job (an
        #: asynchronous actor does not keep the order of calls): by key, by number.
        self._early: dict[int, dict[int, tuple[str, Any]]] = {}

    def _post(self, fn: Any, *args: Any) -> None:
        """From Ray's threads: run ``fn(*args)`` on the loop, unless closed."""
        if self._closed:
            return
        # RuntimeError: the loop ended with the last cluster, nothing to tell.
        with contextlib.suppress(RuntimeError):
            self._runner.call_soon(fn, *args)

    def _forget(self, key: int) -> None:
        self._jobs.pop(key, None)
        self._attempts.pop(key, None)
        self._cancelling.discard(key)
        self._skipping.pop(key, None)
        self._unanswered.pop(key, None)
        self._begun_keys.discard(key)
        self._timed_out_keys.discard(key)
        self._sent.pop(key, None)
        self._early.pop(key, None)
        self._started.pop(key, None)
        self._exited.pop(key, None)
        self._dying.pop(key, None)
        self._awaiting_life.discard(key)
        self._lost_on.pop(key, None)

    def _view(self, node: _Node) -> NodeInfo:
        """``node``'s `NodeInfo`: the one reported, or one made up before that."""
        if node.info is not None:
            return node.info
        return NodeInfo(node.ray_id, node.host, node.port, "", len(node.slots))

    # -- the parts' methods, declared for the others --

    def _schedule(self) -> None:
        raise NotImplementedError

    def _fail_inflight(self, slot: _Slot, reason: str) -> None:
        raise NotImplementedError

    def _take_incoming(self) -> None:
        raise NotImplementedError

    def _enqueue(self, job: JobRequest, first: bool = False) -> None:
        raise NotImplementedError

    def _abandon_waiting(self) -> None:
        raise NotImplementedError

    def _remove(self, slot: _Slot, key: int) -> None:
        raise NotImplementedError

    def _started_running(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _cancel_queued(self, keys: set[int]) -> set[int]:
        raise NotImplementedError

    def _cancel_sent(self, key: int, unstarted: bool) -> None:
        raise NotImplementedError

    def _cancel_in_batch(self, slot: _Slot, ref: Any, key: int) -> None:
        raise NotImplementedError

    def _ask_skip(self, slot: _Slot, key: int, why: str) -> None:
        raise NotImplementedError

    def _skipped(self, key: int) -> None:
        raise NotImplementedError

    def _cancel_timer(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _release(self, key: int) -> None:
        raise NotImplementedError

    def _kill(self, slot: _Slot, key: int, timed_out: bool = False) -> None:
        raise NotImplementedError

    def _actor_lost(self, slot: _Slot, reason: str) -> None:
        raise NotImplementedError

    def _poll_inbox(self) -> None:
        raise NotImplementedError

    def _read_for_dying(self, keys: list[int]) -> None:
        raise NotImplementedError

    def _settle_dying(self, keys: list[int], final: bool = False) -> None:
        raise NotImplementedError

    def _life_reported(self, value: Any) -> None:
        raise NotImplementedError

    def _settle_lost_slot(self, slot: _Slot) -> None:
        raise NotImplementedError


def _check_picklable(value: Any, what: str) -> None:
    """Raise `SerializationError` naming ``what`` if ``value`` does not pickle."""
    kind = type(value)
    if kind in _PLAIN:
        return
    if (kind is tuple or kind is list) and all(type(v) in _PLAIN for v in value):
        return
    try:
        serialize.dumps(value)
    except SerializationError as exc:
        raise SerializationError(
            serialize.cannot_send_argument(what, exc, "a Ray worker")
        ) from exc


def _terminated(why: str) -> Outcome:
    """The outcome of a job ended now, not by itself (``why`` ends with a newline)."""
    now = time.time()
    return Outcome(JobStatus.Terminated, exception=why, start_time=now, end_time=now)


def _reason(exc: BaseException) -> str:
    """A one-paragraph reason from a Ray error (its first lines); of a call that
    failed in Ray (``RayTaskError``: a result it could not pickle...), the exception
    that failed it: Ray's own text starts with its frames and terminal colours and
    ends with that exception, past the lines kept."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        return "".join(traceback.format_exception_only(exc.cause)).strip()
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    if len(lines) > 12:
        text = "\n".join([*lines[:12], "..."])
    return text
