"""How a worker takes SIGINT: the node's Stop of the job it names, and a SIGINT
handler a job installs of its own.

The node stops a running job as dispy does, with SIGINT: the job gets a
KeyboardInterrupt, which it may catch to clean up or return a value (it has
`nodeserver.jobstops.CANCEL_GRACE` seconds to end). A job that installs a SIGINT
handler (``signal.signal``) has it called first, for its own say (saving its state,
setting a flag, stopping a child); if that handler returns, the KeyboardInterrupt
follows: a Stop stops the job, as dispy's cancel does. Before, such a handler
swallowed the Stop, and the job ran on until the node killed its worker 3 s later,
its ``finally`` blocks never run. A job that ignores or blocks SIGINT gets nothing
and is killed at once (`nodeserver.launcher.ProcessLauncher.interrupt`).

So a worker keeps its own handler (`interrupt_job`) installed, and ``signal.signal``
and ``signal.getsignal`` in it keep a job's handler aside, as if it were installed;
the job's handler goes when the job ends: the next job starts with the node's.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from dispynb.jobenv import node_interrupt
from nodeserver.jobapi import CONTEXT

logger = logging.getLogger(__name__)

#: The ``signal`` module's own functions (a worker's are `_job_signal` and
#: `_job_getsignal` once `install_interrupt_handler` ran).
_install = signal.signal
_lookup = signal.getsignal

_Handler = Callable[[int, FrameType | None], Any]


class _JobHandler:
    """The SIGINT handler the running job installed, if any."""

    handler: _Handler | None = None
    #: The job called ``signal.signal`` for SIGINT: restored as it ends.
    changed = False
    #: Its handler is being called (one that calls the handler it replaced, which
    #: ``signal.getsignal`` gave as `interrupt_job`, is not called again).
    calling = False


_JOB = _JobHandler()


def interrupt_job(signum: int, frame: FrameType | None) -> None:
    """SIGINT handler of workers: interrupt the job's code, never the worker loop.

    The node sends SIGINT to cancel a running job, as dispy does: the job gets a
    KeyboardInterrupt (and may catch it and return a value). The node names the
    job first in the worker's interrupt page (`nodeserver.ipc.InterruptPage`): a
    SIGINT that finds another job running is ignored, as it was meant for the job
    before it, which ended just as the node signalled (the next job, sent ahead,
    runs on). One that lands before its job's code runs (its arguments still
    arriving or being unpickled) takes effect as that code starts (`run_job`), as
    if it had come at its first instruction. Without a page (none sent), a SIGINT
    interrupts whatever job code runs. A handler the job installed is called
    first, for every SIGINT, as Python would (see the module docstring).
    """
    own = _JOB.handler
    if own is not None and not _JOB.calling:
        _JOB.calling = True
        try:
            own(signum, frame)  # it may raise: the job ends its own way
        finally:
            _JOB.calling = False
    if CONTEXT.running and (CONTEXT.target is None or CONTEXT.interrupt_for_this_job()):
        raise node_interrupt()


def _job_signal(signalnum: Any, handler: Any) -> Any:
    """``signal.signal`` in a worker: a job's SIGINT handler is kept aside (called
    by `interrupt_job`); ignoring SIGINT (``SIG_IGN``) or its default action are
    installed as they are (the node sees them, `nodeserver.containment.deaf_to`)."""
    if signalnum != signal.SIGINT:
        return _install(signalnum, handler)
    own = _JOB.handler
    if callable(handler):
        # Checked first: off the main thread this raises, as signal.signal does.
        previous = _install(signal.SIGINT, interrupt_job)
        mine = handler in (interrupt_job, signal.default_int_handler)
        _JOB.handler = None if mine else handler
    else:
        previous = _install(signal.SIGINT, handler)  # TypeError if no handler
        _JOB.handler = None
    _JOB.changed = True
    return previous if own is None else own


def _job_getsignal(signalnum: Any) -> Any:
    """``signal.getsignal`` in a worker: a job's SIGINT handler, as installed."""
    own = _JOB.handler
    if own is not None and signalnum == signal.SIGINT:
        return own
    return _lookup(signalnum)


def install_interrupt_handler() -> Callable[[], None]:
    """Make SIGINT interrupt only job code in this worker (main thread only), and
    keep a job's own SIGINT handler aside (`_job_signal`). Returns what puts the
    process back as it was, called as the worker loop ends: the node rehearses
    jobs in its own process (`nodeserver.rehearsal`), whose SIGINT and
    ``signal`` module must stay its own (a node that ignored Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    previous = _install(signal.SIGINT, interrupt_job)
    signal.signal = _job_signal
    signal.getsignal = _job_getsignal

    def undo() -> None:
        signal.signal, signal.getsignal = _install, _lookup
        _JOB.handler, _JOB.changed = None, False
        if previous is not None:  # None: not set from Python (left as it is)
            _install(signal.SIGINT, previous)

    return undo


def _nothing() -> None:
    pass


def restore_interrupt_handler() -> None:
    """A job ended that installed a SIGINT handler, or ignored SIGINT: the next
    job starts with the worker's (a Stop interrupts it as any job)."""
    if _JOB.changed:
        _JOB.handler = None
        _JOB.changed = False
        if threading.current_thread() is threading.main_thread():
            _install(signal.SIGINT, interrupt_job)


def map_interrupt_page(fd: int) -> memoryview | None:
    """The worker's view of the node's interrupt page ``fd`` (closed here), or None
    if it cannot be mapped (then every SIGINT interrupts the job running)."""
    try:
        page = mmap.mmap(fd, 8)
    except (OSError, ValueError) as exc:
        logger.warning("interrupt page not mapped: %s", exc)
        return None
    finally:
        os.close(fd)
    return memoryview(page).cast("q")
