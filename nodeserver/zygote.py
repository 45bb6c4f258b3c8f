"""Computation processes forked from a zygote instead of started as new interpreters.

A node server used to start each computation as ``python -m nodeserver.compute``: a
new interpreter that imports the protocol, cloudpickle and the worker loop again (some
0.1 s of CPU on the way to a cluster's first job), and whose pages the node shares
with it only for the interpreter's binary. Instead, ``dispynb-node`` imports what a
computation process runs, freezes the garbage collector's view of those objects
(`gc.freeze`: a collection never writes to their pages) and forks one **zygote**
before it reads its secret, configures logging, starts a thread or accepts a client.
The zygote then forks a computation process per request: the fork takes a few
milliseconds, and the node, the zygote, every computation process and its workers
share the imported modules' pages (copy-on-write), so together they take far less
memory (issue 17 item 6).

The node server asks over a Unix ``SOCK_SEQPACKET`` pair: one request is the
computation's directory plus the control socket (``SCM_RIGHTS``), the answer is the
new process's pid. The node follows the process with a pidfd (`os.pidfd_open`, Linux
5.3+), which is readable once it exits and is what `ForkedProcess.kill` signals, so a
reused pid is never hit. The zygote reaps its children; they are not the node's, so
their exit status is not known there (nothing uses it: the control channel's end
says that a computation process is gone). Should the zygote die (kill -9, the OOM
killer), the node notices at once (`ZygoteLauncher.watch`: its pidfd on the node's
loop), reaps it and logs how it died; it adopts the zygote's computation processes
(it is a subreaper): they go on with their jobs and the node reaps them
(`ZygoteLauncher.reap_adopted`). A computation process ends when the node dies, even
in a long setup (`containment.watch_node`). A dead zygote is not made again: the
node would fork it while it holds its secret and runs threads; computations start
as new interpreters instead, and a client sees no difference but a slower setup.

The zygote dies with the node (``PR_SET_PDEATHSIG``, and end of file on its socket),
the node reaps it before it exits (`ZygoteLauncher.stop`: no zombie is left to
whoever adopts it), and it ignores SIGINT and SIGTERM (a terminal's Ctrl-C reaches
the node's whole process group; the node decides). A computation process gets the
signal dispositions, the standard input (``/dev/null``), the working directory and a
freshly seeded `random` of a new process, and its process name (``/proc/PID/comm``)
is ``dispynb-compute``; the zygote's is ``dispynb-zygote``. The zygote overwrites
and drops a ``DISPYNB_SECRET`` it inherited (`dispynb.secret.forget_secret_env`)
before it forks anything, and is non-dumpable as the node is (its user's processes,
jobs among them, cannot read its memory); a computation process holds no secret
and is dumpable again, as a new process is. Where no zygote can run
(not Linux, no pidfd, ``DISPYNB_ZYGOTE=0``, or the zygote died), computations are
started as new interpreters (`nodeserver.launcher.AdoptingLauncher`); so they are
after a zygote did not answer in time (`ANSWER_TIMEOUT`): it is killed, and the
computation whose setup waited for it fails with an error that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys
from typing import NoReturn

from dispynb.daemon import load_prctl, set_dumpable
from dispynb.errors import SetupError
from dispynb.secret import forget_noted_secrets, forget_secret_env
from dispynb.startup import blocked_while_forking
from nodeserver.containment import become_subreaper
from nodeserver.jobreasons import signal_name
from nodeserver.launcher import (
    AdoptingLauncher,
    ComputationProcess,
    compute_log_option,
)

__all__ = [
    "COMPUTE_NAME",
    "ZYGOTE_ENV",
    "ZYGOTE_NAME",
    "ForkedProcess",
    "ZygoteLauncher",
    "start_zygote",
]

logger = logging.getLogger(__name__)

#: Environment variable that turns the zygote off (``0``): new interpreters instead.
ZYGOTE_ENV = "DISPYNB_ZYGOTE"
#: Process names (``/proc/PID/comm``, 15 bytes at most) of the zygote and of the
#: computation processes it forks (their workers inherit it).
ZYGOTE_NAME = "dispynb-zygote"
COMPUTE_NAME = "dispynb-compute"

_PID = struct.Struct("=q")
_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
#: Seconds the zygote gets to exit at the end of its socket before it is killed.
STOP_TIMEOUT = 5.0
#: Seconds the node waits for the zygote's answer to a request (a fork takes
#: milliseconds; under heavy load, a second or so). A zygote that does not answer
#: in time (stopped, stuck) is killed and the setup fails; computations start as
#: new interpreters after that. A shorter ``setup_timeout`` fails the setup
#: sooner, without killing the zygote: one client's bound is not the node's.
ANSWER_TIMEOUT = 10.0
#: Longest request: a computation's directory (a path).
_MAX_REQUEST = 65536


class ForkedProcess:
    """A computation process the zygote forked, followed through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and reaped by the zygote)
            self._pidfd = None

    async def wait(self) -> int:
        """Wait until the process has exited; 0 (its status is the zygote's)."""
        pidfd = self._pidfd
        if pidfd is None:
            return 0
        if not select.select([pidfd], [], [], 0)[0]:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
            try:
                await exited
            except BaseException:
                # Its waiter went (cancelled: a client left while its computation
                # started; or a timed wait ran out): the pidfd is closed once the
                # process exits, not never. A later kill or wait still has it.
                loop.add_reader(pidfd, self._release)
                raise
            loop.remove_reader(pidfd)
        self._pidfd = None
        os.close(pidfd)
        return 0

    def _release(self) -> None:
        """The process exited with nobody waiting for it: close its pidfd."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    def kill(self) -> None:
        """SIGKILL the process now (its workers die with it)."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


class _NoAnswer(Exception):
    """The zygote did not answer within `ANSWER_TIMEOUT` seconds."""


class ZygoteLauncher(AdoptingLauncher):
    """The node server's launcher while its zygote lives; new interpreters after."""

    def __init__(
        self,
        sock: socket.socket,
        pid: int,
        adopting: bool = False,
        log_level: str | None = None,
    ) -> None:
        self.pid = pid
        self._sock: socket.socket | None = sock
        self._lock: asyncio.Lock | None = None
        self._reaped = False  # waitpid has collected the zygote
        #: Readable once the zygote has exited, while `watch` follows it.
        self._pidfd: int | None = None
        self._said_gone = False  # its end is in the log
        #: The node is a subreaper: a dead zygote's computation processes (and
        #: whatever else is orphaned below the node) come back to it, and are
        #: reaped by `reap_adopted` on SIGCHLD.
        super().__init__(adopting, log_level)
        #: The computation processes the zygote made (the node's once adopted).
        self._forked: set[int] = set()

    async def start(
        self, control: socket.socket, cwd: str, timeout: float | None = None
    ) -> ComputationProcess:
        """Have the zygote fork a computation process in ``cwd`` talking over
        ``control`` (or start a new interpreter if the zygote is gone).

        Raises `SetupError` if the zygote does not answer within ``timeout``
        seconds (``setup_timeout``), or `ANSWER_TIMEOUT`: then it is killed;
        `OSError` if it could not fork (the user's process limit, say).
        """
        # The request reads its own answer even if this caller is cancelled (its
        # client went away during the setup) or gives up (its setup_timeout): an
        # answer left unread would be the next request's, which would then follow,
        # contain and kill another computation's process instead of its own.
        self._watch_orphans()
        request = asyncio.ensure_future(self._request_in_turn(control, cwd))
        try:
            if timeout is not None and timeout < ANSWER_TIMEOUT:
                pid = await asyncio.wait_for(asyncio.shield(request), timeout)
            else:
                pid = await asyncio.shield(request)
        except (asyncio.CancelledError, TimeoutError) as exc:
            # Not sent yet: it never is. Sent: the zygote has its own copy, and the
            # process exits at the end of its control socket (the caller's end).
            control.close()
            request.add_done_callback(_retrieve)
            if isinstance(exc, TimeoutError):
                raise SetupError(
                    f"the node's process maker (its zygote, pid {self.pid}) did "
                    f"not answer in {timeout:g} s (setup_timeout)"
                ) from None
            raise
        except OSError:  # it could not fork (the process limit): nothing made
            control.close()
            raise
        except _NoAnswer:
            control.close()  # a process it made after all exits at its end
            raise SetupError(
                f"the node's process maker (its zygote, pid {self.pid}) did not "
                f"answer in {ANSWER_TIMEOUT:g} s; the node stopped it and starts "
                "computations as new processes from now on: try again"
            ) from None
        if pid is None:
            return await self._start_interpreter(control, cwd)
        control.close()  # the process has its own copy
        return ForkedProcess(pid)

    def watch(self) -> None:
        """On the node's running loop: reap the zygote as soon as it exits (killed
        from outside, the OOM killer) and log how it ended, rather than leave a
        zombie until the next computation's request; reap adopted processes as
        they exit too."""
        self._watch_orphans()
        self._follow()

    def _follow(self) -> None:
        """Reap the zygote once its pidfd is readable (it exited)."""
        if self._reaped or self._pidfd is not None:
            return
        try:
            self._pidfd = os.pidfd_open(self.pid)  # a child not reaped: its pid
        except ProcessLookupError:
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._unfollow()
        status = 0
        with contextlib.suppress(ChildProcessError):
            status = os.waitpid(self.pid, 0)[1]  # it has exited: no wait
        self._reaped = True
        if self._sock is not None:  # not let go by this node: killed
            # Its socket stays open: a request waiting for an answer reads its
            # end (closing it under that read would leave the read waiting).
            self._gone(_exit_text(status))

    def _unfollow(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _gone(self, how: str) -> None:
        """Log, once, that the zygote ended and what that changes."""
        if not self._said_gone:
            self._said_gone = True
            logger.warning(
                "the zygote process (pid %d) %s: computations start as new "
                "processes from now on",
                self.pid,
                how,
            )

    def _reaped_elsewhere(self) -> set[int]:
        """The zygote (`_on_exit`) and the new interpreters (asyncio's watcher)."""
        return {self.pid, *self._own}

    def _known(self) -> set[int]:
        self._forked = {pid for pid in self._forked if os.path.exists(f"/proc/{pid}")}
        return {self.pid, *self._own, *self._forked}

    def _busy(self) -> bool:
        return super()._busy() or (self._lock is not None and self._lock.locked())

    def _forget(self, pid: int) -> None:
        self._forked.discard(pid)

    async def _request_in_turn(self, control: socket.socket, cwd: str) -> int | None:
        """`_request`, one at a time (answers come in order); None, without a
        request, if its caller went away while it waited for its turn."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with self._lock:
                if control.fileno() == -1:
                    return None
                return await self._request(control, cwd)
        finally:
            self._launched()  # the lock is free: what was put off meanwhile

    async def _request(self, control: socket.socket, cwd: str) -> int | None:
        sock = self._sock
        if sock is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            socket.send_fds(sock, [os.fsencode(cwd)], [control.fileno()])
            answer = await asyncio.wait_for(
                loop.sock_recv(sock, _PID.size), ANSWER_TIMEOUT
            )
        except TimeoutError:
            # Its answer may never come, or come late: then it would be taken for
            # the next request's. The requests waiting go to new interpreters.
            logger.warning(
                "the zygote process did not answer in %g s: killing it; "
                "computations start as new processes",
                ANSWER_TIMEOUT,
            )
            self._kill()
            raise _NoAnswer from None
        except OSError as exc:
            answer = b""
            logger.debug("zygote request failed: %s", exc)
        if len(answer) != _PID.size:
            self._gone("is gone")
            self.close()
            return None
        pid = int(_PID.unpack(answer)[0])
        if pid < 0:  # it could not fork (-errno): this computation fails
            raise OSError(-pid, os.strerror(-pid))
        self._forked.add(pid)  # under the lock: `sweep_orphans` knows it from now
        return pid

    def _kill(self) -> None:
        """Kill the zygote (stopped or stuck: it would not exit at the end of its
        socket), and reap it once it is gone, without blocking the loop."""
        self.close()
        self._follow()  # reaped by `_on_exit` once gone
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        """Let the zygote go (it exits at the end of its socket); reap it if it
        has exited already (it is this process's child)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if not self._reaped:
            with contextlib.suppress(ChildProcessError):
                self._reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Let the zygote go and reap it before the node exits (SIGKILL after
        ``timeout`` seconds): an exited child the node leaves unreaped stays a
        zombie of whichever process adopts it (a subreaper such as a benchmark
        driver, or an init that does not reap), seen as a leftover process."""
        self._unfollow()
        self.close()
        super().stop()  # those that ended after the node's loop did
        if self._reaped:
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already gone
            pidfd = None
        if pidfd is not None:
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    logger.warning("the zygote process did not exit: killing it")
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._reaped = True


def _exit_text(status: int) -> str:
    """How a process with wait status ``status`` ended, in words."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal_name(-code)}"
    return f"exited with status {code}"


def _retrieve(request: asyncio.Future[int | None]) -> None:
    """A request whose caller went away ended: its error, if any, is logged here
    (not as an exception never retrieved)."""
    if not request.cancelled() and request.exception() is not None:
        logger.debug("zygote request failed: %s", request.exception())


def _import_what_is_imported_later() -> None:
    """Import now, before the zygote's fork, what the node server imported only once
    serving, the zygote once forked and each computation process as it loaded its
    computation: the ``idna`` codec (``getaddrinfo`` of a host name given as text:
    ``encodings.idna``, ``stringprep``, ``unicodedata``), the threads of the event
    loop's default executor (asyncio's ``getaddrinfo`` runs in one), the zygote's
    `dispynb.memscrub` (`forget_noted_secrets`) and the modules dispy's names give
    every computation (`dispynb.jobenv.implicit_modules`: ``multiprocessing``).

    A module imported after the fork is not shared, and worse: its objects fill the
    free slots of memory pools the process shares with the others, so it copies
    those pages and the one it was forked from keeps the originals alone: 1.4 MiB
    of PSS at rest and 1.8 after W1 in all (issue 17 item 6).
    """
    import codecs
    import concurrent.futures.thread  # noqa: F401 - for what it imports

    import dispynb.memscrub  # noqa: F401
    from dispynb.jobenv import implicit_modules

    codecs.lookup("idna")  # imports it, and caches the lookup here too
    implicit_modules()


def start_zygote(log_level: str | None = None) -> ZygoteLauncher | None:
    """Import what a computation process runs, then fork the zygote; its launcher.

    Call it early, while this process has one thread and nothing secret in memory.
    None where no zygote can run (then computations start as new interpreters).
    ``log_level``: the node's (`ProcessLauncher`), which the computation processes
    log at; the zygote is forked before the node configures its logging.
    """
    if (
        not sys.platform.startswith("linux")
        or not hasattr(os, "pidfd_open")
        or os.environ.get(ZYGOTE_ENV, "1") == "0"
    ):
        return None
    import nodeserver.compute  # noqa: F401 - imported once here, shared by all
    from nodeserver.rehearsal import rehearse

    _import_what_is_imported_later()

    rehearse()  # the job path's first writes, made once for every worker
    node, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gc.collect()
    gc.freeze()  # collections never write to the imported objects' pages
    _flush_std()
    try:
        # A stop signal meanwhile raises its `StopSignal` once forked, in the
        # node, not lost in the at-fork callbacks (`dispynb.startup`).
        with blocked_while_forking():
            pid = os.fork()
    except OSError as exc:
        logger.warning(
            "cannot fork a zygote (%s): computations start as processes", exc
        )
        node.close()
        zygote.close()
        return None
    if pid == 0:
        node.close()
        _serve(zygote, os.getppid(), compute_log_option(log_level))
    zygote.close()
    node.setblocking(False)
    # Adopt the zygote's computation processes should it die (killed, OOM): they
    # go on serving their jobs, and end with the node (`containment.watch_node`).
    return ZygoteLauncher(node, pid, adopting=become_subreaper(), log_level=log_level)


def _serve(sock: socket.socket, node_pid: int, options: list[str]) -> NoReturn:
    """The zygote: fork a computation process per request until the node is gone;
    ``options`` are added to each one's command line (its logging)."""
    code = 1
    try:
        # Forked before the node withdrew DISPYNB_SECRET, after it parsed
        # --secret or --config: what it forks runs jobs.
        forget_secret_env()
        forget_noted_secrets()
        prctl = load_prctl()
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _set_name(ZYGOTE_NAME)
        if os.getppid() != node_pid:  # the node died before prctl
            os._exit(1)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        while True:
            ready = select.select([sock.fileno(), wake_r], [], [])[0]
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                _reap()
            if sock.fileno() in ready and not _fork_one(
                sock, (wake_r, wake_w), node_pid, options
            ):
                code = 0
                break
    except BaseException:  # never return into the node's code
        import traceback

        traceback.print_exc()
    finally:
        _flush_std()
        os._exit(code)


def _reap() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork_one(
    sock: socket.socket, pipe: tuple[int, int], node_pid: int, options: list[str]
) -> bool:
    """Serve one request; False at the end of the node's socket."""
    request, fds, _flags, _addr = socket.recv_fds(sock, _MAX_REQUEST, 1)
    if not request and not fds:
        return False
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        sock.send(_PID.pack(-1))
        return True
    control = fds[0]
    _flush_std()
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:  # the user's process limit, say: this request fails,
        os.close(control)  # the zygote serves on (answered with -errno)
        sock.send(_PID.pack(-(exc.errno or errno.EAGAIN)))
        return True
    if pid == 0:
        parents = ["--node-pid", str(node_pid), "--parent-pid", str(zygote)]
        _become_computation(
            sock, pipe, control, os.fsdecode(request), [*parents, *options]
        )
    os.close(control)
    sock.send(_PID.pack(pid))
    return True


def _become_computation(
    sock: socket.socket,
    pipe: tuple[int, int],
    control: int,
    cwd: str,
    options: list[str],
) -> NoReturn:
    """In the forked child: look like a new process, then run the computation."""
    code = 1
    try:
        sock.close()
        signal.set_wakeup_fd(-1)
        for fd in pipe:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _set_name(COMPUTE_NAME)
        # It holds no secret: dumpable again, as a new process (the flag came
        # from the node through the zygote), so that its jobs can be profiled
        # and dump core, and its workers read their own /proc/self/pagemap.
        set_dumpable(True)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        try:
            os.chdir(cwd)
            here = os.getcwd()
        except FileNotFoundError:
            # The node closed the computation (its client left: a notebook's Stop)
            # and removed its directory while this process waited to be made (or
            # just after it went there); nobody waits for it now: end quietly.
            raise SystemExit(1) from None
        from nodeserver import compute

        # As ``python -P -m nodeserver.compute`` started there.
        compute.lead_path(here)
        if "random" in sys.modules:
            import random

            random.seed()
        if "multiprocessing" in sys.modules:  # imported before the zygote's fork
            import multiprocessing

            # Its key for connections between processes is each computation's own.
            multiprocessing.current_process().authkey = os.urandom(32)

        argv = ["--control-fd", str(control), *options]
        sys.argv = [compute.__file__, *argv]
        code = compute.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # never back into the zygote's loop
        import traceback

        traceback.print_exc()
    finally:
        _flush_std()
        os._exit(code)


def _set_name(name: str) -> None:
    """Set this process's name (``/proc/PID/comm``, what ``ps -o comm`` shows)."""
    prctl = load_prctl()
    if prctl is not None:
        buffer = ctypes.create_string_buffer(name.encode()[:15])
        prctl(_PR_SET_NAME, ctypes.addressof(buffer), 0, 0, 0)


def _flush_std() -> None:
    """Flush Python's buffers before a fork, so no output is written twice."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
