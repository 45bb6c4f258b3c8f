"""`LocalCluster`: node servers on this machine (127.0.0.1) for a `JobCluster`.

The embedded default: it starts dispynb's node server processes (`_NODE_MAIN`)
bound to 127.0.0.1 with a fresh random secret, and hands `JobCluster` their
addresses and the secret through ``nodes=``. It never imports ``nodeserver`` itself.

Each node runs in its own session (process group), so that a signal sent to this
process's group never reaches it: JupyterLab's Stop button interrupts the kernel with
``os.killpg(SIGINT)``, and Ctrl-C in a terminal signals the foreground group. The
nodes still die with this process, however it ends (``close``, exit, SIGKILL): each
inherits the read end of a pipe whose write end only this process holds, and stops
when it reads end of file (``--parent-pipe``); ``--exit-with-parent`` (re-parenting)
backs that up when a forked child of this process holds a copy of the write end.

``engine="dask"`` (or ``$DISPYNB_LOCAL_ENGINE=dask``) starts a Dask cluster on this
machine instead, with the same API, run through `dispynb.backends.dask.DaskEngine`
(see ``docs/howto/choose-engine.md``): the same programs and notebooks then run on
the Dask engine.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from dispynb import lockeddirs
from dispynb._interruptible import HeldInterrupts
from dispynb.defaults import LOCAL_ENGINE_ENV, SECRET_ENV, SECRET_FILE_ENV
from dispynb.errors import ClusterError, ConfigurationError
from dispynb.secret import random_secret
from dispynb.transport import localsockets
from dispynb.wording import counted

#: Runs dispynb's own node server (``python -P -c _NODE_MAIN ROOT ARGS``, ROOT the
#: directory holding dispynb and nodeserver, put first on the path). With ``-P``,
#: as the launchers start nodes (`dispynb.deploy.base.NODE_MAIN`), the directory
#: the node starts in (the notebook's, the program's current directory) is not on
#: its path. Its jobs never had it (their process puts the computation's directory
#: in its place: `nodeserver.compute.lead_path`); on the node it only put the
#: user's files there before the node's own modules: ``python -m nodeserver`` ran
#: a ``nodeserver`` package of the user's, a ``msgpack.py`` stopped the node at its
#: start, a ``multiprocessing.py`` was imported for the computations' names. (The
#: packages imported with ``nodeserver.cli`` were so kept from such files; they
#: still are imported there, before the node forks its zygote, which shares them.)
#: Stop signals are held (`dispynb.startup`) before the node's modules are
#: imported, as ``dispynb-node`` does: a cluster closed as it starts stops cleanly,
#: and silently: its nodes' stderr is the notebook's, where Stop pressed during
#: ``%dispy local`` printed a "stopped by SIGTERM while starting" line per node
#: above the cell's own line saying it (the cluster says why its nodes stopped).
_NODE_MAIN = """\
import sys
sys.path.insert(0, sys.argv.pop(1))
from dispynb.startup import run_held
def node(held):
    import nodeserver.cli, cloudpickle, cryptography, msgpack, psutil
    sys.argv[0] = "dispynb-node"
    return nodeserver.cli.main()
sys.exit(run_held("dispynb-node", node, say_stop=False))
"""

#: Seconds a node gets to start listening.
START_TIMEOUT = 30.0

#: Seconds between looks for a starting node's port file: a node is ready in some
#: 0.2-0.5 s, and each look is one stat (W5 waits half of this on average).
PORT_POLL = 0.005

#: Seconds a node gets to shut down after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0

#: Seconds a node whose main thread has died gets for its other threads to end.
REAP_TIMEOUT = 5.0

#: The prefix of a LocalCluster's directory in the temporary directory (the
#: nodes' ``--dest-path``, port files, sockets). Older ``dispynb-local-*`` without
#: ``flock-`` had no lock, so are left alone.
_DIR_PREFIX = "dispynb-local-flock-"

#: What ``engine=`` (and ``$DISPYNB_LOCAL_ENGINE``) may name.
LOCAL_ENGINES = ("nodes", "dask")

if TYPE_CHECKING:
    from dispynb.backends.base import Engine
    from dispynb.cluster import JobCluster

logger = logging.getLogger(__name__)


def node_name(index: int) -> str:
    """The name of a LocalCluster's node ``index``."""
    return f"local-{index}"


def local_engine(engine: str | None) -> str:
    """``engine``, else ``$DISPYNB_LOCAL_ENGINE``, else ``'nodes'``; checked."""
    chosen = engine or os.environ.get(LOCAL_ENGINE_ENV) or "nodes"
    if chosen not in LOCAL_ENGINES:
        where = "engine=" if engine else f"${LOCAL_ENGINE_ENV}="
        raise ConfigurationError(
            f"{where}{chosen!r}: use 'nodes' (dispynb's node servers) or 'dask' (a "
            "Dask cluster on this machine)"
        )
    return chosen


def cpus_per_node(nodes: Any, cpus: Any) -> int:
    """``cpus``, checked; by default this machine's CPUs shared among ``nodes``
    (checked too). More CPUs than the machine has are taken, with a warning that
    names the machine's count: dispynb-node takes them too (its jobs then share
    the CPUs), for jobs that mostly wait."""
    count = _count(nodes, "nodes", "node server processes to start")
    available = os.cpu_count() or 1
    if cpus is None:
        return max(available // count, 1)
    each = _count(cpus, "cpus", "CPUs of each node (or None: this machine's shared)")
    if each > available:
        logger.warning(
            "LocalCluster(cpus=%d): this machine has %s; each node runs up to %s "
            "at once, which share them (leave out cpus= to share the machine's "
            "CPUs among the nodes)",
            each,
            counted(available, "CPU"),
            counted(each, "job"),
        )
    return each


def _count(value: Any, name: str, what: str) -> int:
    """``value``; a `ConfigurationError` unless it is a whole number >= 1 (not a
    bool, not text: ``nodes="2"`` failed inside with a bare TypeError)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"LocalCluster's {name} must be a whole number, at least 1 ({what}); "
            f"got {value!r}"
        )
    return value


class LocalCluster:
    """Node servers on 127.0.0.1, started now and stopped by `close`.

    Also stopped at exit, and once nothing refers to it: a notebook cell ``local =
    LocalCluster()`` run again stops the first one's nodes, unless a `JobCluster`
    made with ``nodes=`` it is still kept (it keeps its LocalCluster).

    Parameters
    ----------
    nodes:
        How many node-server processes to start.
    cpus:
        CPUs of each node (jobs it runs at once); default: this machine's CPUs
        shared among the nodes. More than this machine has are taken, with a
        warning (their jobs share its CPUs).
    secret:
        Shared secret; default: a new random one (see the ``secret`` attribute).
    loglevel:
        The nodes' log level (their logs go to this process's stderr).
    engine:
        ``"nodes"`` (dispynb's node servers) or ``"dask"`` (a Dask cluster on this
        machine, used through `dispynb.backends.dask.DaskEngine`; its ``engine``
        attribute is that engine, its ``scheduler_address`` the Dask scheduler's).
        Default: ``$DISPYNB_LOCAL_ENGINE``, else ``"nodes"``.
    max_message_size:
        The largest message the nodes take, and so the largest result they send
        (as the node's ``--max-message-size``); default 1 GiB. A client's own
        ``max_message_size`` over it needs it raised too. Unused by Dask.

    Examples
    --------
    >>> with LocalCluster(cpus=2) as local:  # doctest: +SKIP
    ...     cluster = JobCluster(compute, nodes=local)
    """

    #: The engine ``JobCluster(nodes=this)`` runs on (None: dispynb's node servers).
    engine: Engine | None = None
    #: What `inspect.signature`, ``help()``, IPython's ``LocalCluster?`` and the
    #: API reference show: ``__init__``'s parameters, not ``__new__``'s catch-all.
    __signature__: ClassVar[inspect.Signature]

    def __new__(cls, *args: Any, engine: str | None = None, **kwargs: Any) -> Any:
        if cls is LocalCluster and local_engine(engine) == "dask":
            from dispynb.backends._dasklocal import DaskLocalCluster

            return super().__new__(DaskLocalCluster)
        return super().__new__(cls)

    def __init__(
        self,
        nodes: int = 1,
        cpus: int | None = None,
        *,
        secret: str | None = None,
        loglevel: str = "warning",
        engine: str | None = None,
        max_message_size: int | None = None,
    ) -> None:
        cpus = cpus_per_node(nodes, cpus)
        self._max_message_size = max_message_size
        self.secret = secret or random_secret()
        self.cpus = cpus
        self.tls = False
        #: What `exit_reason` says to do about a node that exited (a notebook's
        #: ``%dispy local`` says its own way).
        self.restart_hint = (
            "start a new LocalCluster (an Executor without nodes starts its own)"
        )
        # Locked while this process or one of its nodes runs: a LocalCluster made
        # after all were killed at once (SIGKILL to a batch job's cgroup) removes
        # it, with the nodes' copies of the jobs' files (`dispynb.lockeddirs`).
        self._nodes = _NodeProcesses(*lockeddirs.make(_DIR_PREFIX))
        self._dir = self._nodes.directory
        self._procs = self._nodes.procs
        self.addresses = self._nodes.addresses
        self._closed = False  # `node_specs` then says so, not "nothing listens"
        # The clusters given nodes=self (`serving`), closed first by `close`.
        self._clusters: weakref.WeakSet[JobCluster] = weakref.WeakSet()
        # Closed at exit if still in use; stopped once no longer referenced (a
        # notebook's cell ``local = LocalCluster()`` run again drops the first
        # one): neither holds it, or nothing would ever let it go. A JobCluster
        # on it holds it (its options), so it stays while the JobCluster does.
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        self._dropped = weakref.finalize(
            self, _stop_dropped, self._nodes, self._at_exit
        )
        self._dropped.atexit = False  # at exit: `_at_exit`, the clusters first
        atexit.register(self._at_exit)
        try:
            for index in range(nodes):
                # Held: a Stop between its start and here would leave it untracked.
                with HeldInterrupts():
                    self._nodes.procs.append(self._spawn(index, cpus, loglevel))
            for index, proc in enumerate(self._nodes.procs):
                port = self._wait_port(index, proc)
                self.addresses.append(("127.0.0.1", port))
                path = self._socket_path(index)
                if localsockets.usable(path):
                    localsockets.register("127.0.0.1", port, path)
        except BaseException:
            self.close()
            raise

    def _spawn(self, index: int, cpus: int, loglevel: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != SECRET_FILE_ENV}
        env[SECRET_ENV] = self.secret  # the environment, not argv: argv is public
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH")) if p
        )
        command = [
            sys.executable, "-P", "-c", _NODE_MAIN, root,
            "--host", "127.0.0.1",
            "--port", "0",
            "--cpus", str(cpus),
            "--name", node_name(index),
            "--dest-path", os.path.join(self._dir, f"node-{index}"),
            "--port-file", self._port_file(index),
            *self._unix_option(index),
            "--loglevel", loglevel,
            "--exit-with-parent",
            "--remove-when-orphaned",  # a killed kernel leaves no files either
            "--drain-timeout", "0",  # close() means now: no draining
        ]  # fmt: skip
        if self._max_message_size is not None:
            command += ["--max-message-size", str(self._max_message_size)]
        # os.pipe() is close-on-exec: other children never inherit the write end.
        read_end, write_end = os.pipe()
        self._nodes.pipes.append(write_end)
        try:
            return subprocess.Popen(
                [*command, "--parent-pipe", str(read_end)],
                env=env,
                stdin=subprocess.DEVNULL,
                # The directory's lock too: held till the last node ends.
                pass_fds=(read_end, self._nodes.lock),
                start_new_session=True,  # out of reach of killpg(SIGINT): Stop
            )
        finally:
            os.close(read_end)

    def _socket_path(self, index: int) -> str:
        return os.path.join(self._dir, f"node-{index}.sock")

    def _unix_option(self, index: int) -> list[str]:
        """The node also listens on a Unix socket in our private directory, which
        this process connects to instead of loopback TCP (`dispynb.transport.
        localsockets`): some 15-20 us less per round trip."""
        path = self._socket_path(index)
        return ["--unix-socket", path] if localsockets.usable(path) else []

    def _port_file(self, index: int) -> str:
        return os.path.join(self._dir, f"node-{index}.port")

    def _wait_port(self, index: int, proc: subprocess.Popen[bytes]) -> int:
        path = self._port_file(index)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as handle:
                    return int(handle.read())
            if proc.poll() is not None:
                raise ClusterError(
                    f"local node {index} exited with status {proc.returncode} while "
                    "starting; its error is printed above"
                )
            time.sleep(PORT_POLL)
        raise ClusterError(f"local node {index} did not start in {START_TIMEOUT} s")

    def node_specs(self) -> list[str]:
        """Node specs for ``JobCluster(nodes=...)``; `ClusterError` once closed."""
        if self._closed:
            # A JobCluster made after the with block (one indentation short) was
            # told that nothing listens at the ports, and to start dispynb-node.
            raise ClusterError(
                "this LocalCluster is closed (its with block has ended, or close() "
                "was called): its nodes are stopped. Make the JobCluster inside the "
                "LocalCluster's with block, or start a new LocalCluster"
            )
        return [f"{host}:{port}" for host, port in self.addresses]

    @property
    def closed(self) -> bool:
        """Whether `close` has run (its with block ended): its nodes are stopped."""
        return self._closed

    @property
    def names(self) -> list[str]:
        """The node servers' names (``local-0``, ...), as `addresses` orders them:
        known from the start, before any client has heard a node say it."""
        return [node_name(index) for index in range(len(self.addresses))]

    @property
    def pids(self) -> list[int]:
        """Process ids of the node servers."""
        return [proc.pid for proc in self._procs]

    def exited(self) -> list[str]:
        """``"host:port (status N)"`` of each node that has exited (none while all
        serve)."""
        return [
            f"{host}:{port} (status {code})"
            for proc, (host, port) in zip(self._procs, self.addresses, strict=False)
            if (code := _exit_status(proc)) is not None
        ]

    def exit_reason(self, host: str, port: int) -> str | None:
        """Why the node at ``host:port`` will not serve again: it is one of these
        nodes and its process has exited (None while it runs, or if it is not
        one of ours). Does not block: a client's I/O loop asks it."""
        for index, (proc, address) in enumerate(
            zip(self._procs, self.addresses, strict=False)
        ):
            if address != (host, port):
                continue
            code = proc.poll()
            if code is None:
                return None
            how = (
                f"killed by {_signal_name(-code)}"
                if code < 0
                else f"exit status {code}"
            )
            return (
                f"local node {node_name(index)} ({host}:{port}) has exited ({how}): "
                f"its jobs cannot run there any more; {self.restart_hint}"
            )
        return None

    def serving(self, cluster: JobCluster) -> None:
        """Note a cluster that runs on these nodes (`JobCluster` calls this when
        given ``nodes=`` this): `close` closes it first if it is still open."""
        self._clusters.add(cluster)

    def _close_clusters(self) -> None:
        """Close the clusters still open on these nodes (`serving`), their jobs not
        done cancelled: else they would wait for ever for nodes that never come
        back."""
        from dispynb._live import live_clusters

        for cluster in list(getattr(self, "_clusters", ())):  # (a failed start)
            if cluster in live_clusters() and getattr(cluster, "_outstanding", 1) == 0:
                # Its jobs are all done (a notebook's cluster left open to the
                # end): nothing is cut short, nothing to warn of.
                try:
                    cluster.close()
                except Exception:
                    logger.exception("closing cluster %r failed", cluster.name)
            elif cluster in live_clusters():
                logger.warning(
                    "LocalCluster closed before cluster %r, which ran on it: the "
                    "cluster is closed now and its jobs not done are cancelled "
                    "(close the cluster first, or nest its 'with' inside the "
                    "LocalCluster's)",
                    cluster.name,
                )
                try:
                    cluster.close(terminate=True)
                except Exception:  # the nodes stop anyway; its jobs end abandoned
                    logger.exception("closing cluster %r failed", cluster.name)
        self._clusters = weakref.WeakSet()

    def close(self) -> None:
        """Stop the nodes (SIGTERM, then SIGKILL if they linger); idempotent.

        A cluster still open on them is closed first, its jobs not done cancelled:
        else they would wait for ever for nodes that never come back.
        """
        if self._nodes.forgotten:
            # Closed already (its with block, then atexit or a second close): its
            # ports may be a newer LocalCluster's now, their sockets registered.
            return
        self._closed = True
        self._close_clusters()
        self._dropped.detach()
        atexit.unregister(self._at_exit)
        self._nodes.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        nodes = [f"{host}:{port}" for host, port in self.addresses]
        closed = " closed" if self._closed else ""
        return f"<LocalCluster nodes={nodes} cpus={self.cpus}{closed}>"


class _NodeProcesses:
    """A `LocalCluster`'s node processes and what they hold (the pipes they stop
    on, their directory and its lock, their sockets): apart from the LocalCluster,
    so that they can be stopped once it is gone (`_stop_dropped`)."""

    def __init__(self, directory: str, lock: int) -> None:
        self.directory = directory
        self.lock = lock
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pipes: list[int] = []  # write ends: the nodes stop when they close
        self.addresses: list[tuple[str, int]] = []
        self.forgotten = False  # `stop` has let go of the nodes (`_forget`)

    def stop(self) -> None:
        """SIGTERM the nodes, SIGKILL those that linger; then let them go."""
        if self.forgotten:
            return
        try:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        except KeyboardInterrupt:
            # Stop while the nodes stop (pressed twice: the first one's close is
            # this one): end them now rather than leave them running, or dead and
            # unreaped, with their directory, until the program ends.
            with HeldInterrupts():
                self._kill()
            raise
        finally:
            with HeldInterrupts():
                self._forget()

    def _kill(self) -> None:
        """SIGKILL the nodes still running and reap them all."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def _forget(self) -> None:
        """Once the nodes have ended: their sockets, pipes, the directory and its
        lock let go."""
        self.forgotten = True
        self.procs.clear()
        for host, port in self.addresses:
            localsockets.unregister(host, port)
        for write_end in self.pipes:
            with contextlib.suppress(OSError):
                os.close(write_end)
        self.pipes.clear()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)
        if self.lock >= 0:
            os.close(self.lock)
            self.lock = -1


def _close_at_exit(ref: weakref.ref[LocalCluster]) -> None:
    """Close the LocalCluster at exit, if it is still there."""
    local = ref()
    if local is not None:
        local.close()


def _stop_dropped(nodes: _NodeProcesses, at_exit: Callable[[], None]) -> None:
    """A LocalCluster no longer referenced (a notebook cell that made it run
    again): its nodes would serve no one till the program ends. A JobCluster
    that used it holds it, so none runs on them any more."""
    atexit.unregister(at_exit)
    if nodes.procs and not nodes.forgotten:
        logger.debug(
            "a LocalCluster no longer used (%s): its nodes are stopped",
            ", ".join(f"{host}:{port}" for host, port in nodes.addresses),
        )
    nodes.stop()


_INIT = inspect.signature(LocalCluster.__init__)
LocalCluster.__signature__ = _INIT.replace(
    parameters=list(_INIT.parameters.values())[1:],
    return_annotation=inspect.Signature.empty,
)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """``proc``'s exit status, or None while it runs.

    A killed multi-threaded process shows as a zombie (its main thread has ended) a
    moment before its other threads have ended and ``waitpid`` can collect it:
    ``poll()`` alone still says it runs then, and a run started at that moment fails
    with "connection refused" instead of saying that the node has exited. Its status
    comes as soon as the other threads end, which killed ones do within moments.
    """
    code = proc.poll()
    if code is not None:
        return code
    import psutil  # lazily: ``import dispynb`` stays light

    try:
        if psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:
        return proc.poll()
    try:
        return proc.wait(REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None  # its other threads go on: it may still serve
