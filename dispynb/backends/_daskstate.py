"""The state of one `JobCluster`'s computation on Dask, on the façade's loop, and
the helpers every part of `DaskBackend` uses (its parts: `_dasknodes`, the workers;
`_daskjobs`, the jobs)."""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import itertools
import logging
import secrets
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from dispynb._loop import Coalescer
from dispynb.backends._daskselect import _host_port, _wanted_workers
from dispynb.backends.base import ClusterConfig, JobEvents, NodeInfo
from dispynb.protocol import serialize

if TYPE_CHECKING:
    from dispynb.backends.dask import DaskEngine

#: The engine's logger, whichever part of it logs.
logger = logging.getLogger("dispynb.backends.dask")

#: Seconds to connect to the scheduler.
CONNECT_TIMEOUT = 10.0

#: Seconds the connection to the scheduler may take, its handshake included.
HANDSHAKE_TIMEOUT = 2 * CONNECT_TIMEOUT

#: Seconds to find out what answered at an address where Dask's handshake failed.
PROBE_TIMEOUT = 5.0

#: Seconds `open` waits for the workers present to report their setup (a longer
#: setup goes on; jobs wait for it on that worker).
SETUP_WAIT = 15.0

#: Seconds `close` may take (cleanup on the workers, then the client).
CLOSE_TIMEOUT = 60.0

#: Largest file a job may send back with ``dispy_send_file`` on Dask (bytes): it
#: travels through the Dask scheduler as an event (which `_daskfence.Fence` keeps
#: the scheduler from storing).
MAX_SENT_FILE = 32 << 20


class _DaskState:
    """The state of one cluster's computation on Dask. The methods declared here
    and raising `NotImplementedError` are the parts' own (one part calls another's).
    """

    def __init__(self, engine: DaskEngine, events: JobEvents, config: ClusterConfig):
        opts = config.options
        self.engine = engine
        self.events = events
        self.config = config
        self.runner = config.runner
        self.uid = secrets.token_hex(6)
        self.reentrant = bool(opts.reentrant)
        self.max_attempts = int(opts.max_attempts) if self.reentrant else 1
        self.prefix = f"dispynb-{self.uid}-"
        self.plugin_name = f"dispynb-{self.uid}"
        self.fence_name = f"dispynb-fence-{self.uid}"
        self.client: Any = None
        self.workers: dict[str, NodeInfo] = {}
        #: Workers where setup failed: (why, setup's traceback or "").
        self.failed: dict[str, tuple[str, str]] = {}
        self.unwanted: set[str] = set()  # set up, but not among nodes=
        self.futures: dict[int, Any] = {}
        self.started: dict[int, tuple[NodeInfo, float]] = {}
        self.running: defaultdict[str, set[int]] = defaultdict(set)
        self.lost: dict[int, int] = {}
        #: Bytes of each submitted job's pickled arguments, until it is reported.
        self.sizes: dict[int, int] = {}
        #: Bytes sent to and received from each worker, by address (`traffic`): the
        #: jobs' pickled arguments and files sent; the jobs' results, output,
        #: provisional results and files. Not Dask's own messages, nor the
        #: computation (a plugin the scheduler gives every worker).
        self.sent: defaultdict[str, int] = defaultdict(int)
        self.received: defaultdict[str, int] = defaultdict(int)
        self.attempts = itertools.count(1)
        self.finished: list[tuple[int, Any]] = []
        #: Outcomes the workers sent as events (small ones), by Dask key, until
        #: the task's future settles.
        self.pushed: dict[str, bytes] = {}
        self.gathering = False
        self.cancelling: list[Any] = []
        #: Jobs handed over by other threads, taken on the loop by `_take_handed`
        #: (one loop wake-up per burst): ``(key, payload, node, limits)`` for the
        #: loop to submit, or ``(key, future)`` submitted already.
        self.handed: collections.deque[tuple[Any, ...]] = collections.deque()
        self.take_handed = Coalescer(self.runner, self._take_handed)
        self.closed = False
        self.wanted = _wanted_workers(opts.nodes)
        #: The workers a wildcard of ``nodes=`` matched when the cluster opened.
        self.matched: set[str] = set()
        self.files_dir = opts.files_dir
        self.result_types = (
            None
            if opts.result_types is None
            else serialize.AllowList(opts.result_types)
        )
        self._ready_seen: asyncio.Event | None = None

    def _is_wanted(self, address: str, name: str) -> bool:
        """Whether ``nodes=`` lets jobs run on the worker at ``address``."""
        if self.wanted is None:
            return True
        host, port = _host_port(address)
        forms = {address, f"{host}:{port}", f"[{host}]:{port}", host, name}
        return any(
            item in forms
            or ("*" in item and any(fnmatch.fnmatchcase(f, item) for f in forms))
            for item in self.wanted
        )

    def _restriction(self) -> list[str] | None:
        """Dask's ``workers=`` for the jobs: ``nodes=`` as given, each wildcard
        (dispy's ``'192.168.1.*'``, or ``'local-*'``) replaced by the addresses of
        the workers it matches, since Dask takes no patterns (None: any worker)."""
        wanted = self.wanted
        if wanted is None or not any("*" in item for item in wanted):
            return wanted
        exact = [item for item in wanted if "*" not in item]
        return exact + sorted(self.matched.union(self.workers))

    def _key_of(self, dask_key: Any) -> int | None:
        if not isinstance(dask_key, str) or not dask_key.startswith(self.prefix):
            return None
        try:
            return int(dask_key[len(self.prefix) + 1 :].partition("-")[0])
        except ValueError:
            return None

    def _node(self, address: str) -> NodeInfo:
        node = self.workers.get(address)
        if node is None:
            host, port = _host_port(address)
            node = NodeInfo(address, host, port, "", 0)
        return node

    def _forget(self, key: int) -> None:
        seen = self.started.pop(key, None)
        if seen is not None:
            self.running[seen[0].node_id].discard(key)
        self.lost.pop(key, None)
        self.sizes.pop(key, None)

    # -- the parts' methods, declared for the others --

    def _on_event(self, event: tuple[float, Any]) -> None:
        raise NotImplementedError

    def _worker_ready(
        self, uid: str, address: str, nthreads: int, name: str, error: str
    ) -> None:
        raise NotImplementedError

    def _cancel(self, keys: list[int], unstarted: bool = False) -> None:
        raise NotImplementedError

    def _take_handed(self) -> None:
        raise NotImplementedError

    def _flush_cancels(self) -> None:
        raise NotImplementedError


def _as_bytes(buffer: Any) -> bytes:
    """A pickle buffer as bytes, without a copy when it is a whole bytes object."""
    if isinstance(buffer, bytes):
        return buffer
    view = memoryview(buffer)
    if isinstance(view.obj, bytes) and len(view.obj) == view.nbytes:
        return view.obj
    return view.tobytes()
