"""A few trivial jobs through the worker's loop, in the process that forks workers.

On CPython 3.11 a process writes to memory of what it runs the first times, not only
to the objects it creates: the bytecode of each function is specialised in place,
caches and lazily made objects fill. A worker forked from a process that never ran
a job makes these writes itself, and each write copies a page that was shared
(copy-on-write): about 0.6 MiB per worker by its first jobs. `rehearse`, called
before the node forks its zygote, makes them once: their pages stay shared by the
node, the zygote, every computation process and every worker (issue 17 item 6).

The jobs run through the real `nodeserver.jobrunner.worker_loop`, fed from a socket
pair in this process (no thread, no process): the messages are written before the
loop runs, the loop returns at their end, and what it changed in the process (its
SIGINT handler, the job context) is put back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket

from dispynb.errors import DispynbError
from dispynb.protocol import serialize
from dispynb.protocol.messages import FINISHED
from nodeserver.channel import MessageSocket
from nodeserver.ipc import Done, Run
from nodeserver.jobapi import CONTEXT
from nodeserver.jobrunner import worker_loop

__all__ = ["REHEARSAL_JOBS", "rehearse"]

logger = logging.getLogger(__name__)

#: Jobs rehearsed: a handful specialise the path (3.11 specialises an instruction
#: after a few runs); more cost start-up time and save nothing more.
REHEARSAL_JOBS = 16
#: Seconds the rehearsal may wait for an answer (it never should).
REHEARSAL_TIMEOUT = 5.0


def _rehearsal_job(x: int) -> int:
    return x + 1


def rehearse(jobs: int = REHEARSAL_JOBS) -> bool:
    """Run ``jobs`` trivial jobs through `worker_loop` in this process; whether they
    all finished.

    Call it in a single-threaded process about to fork workers (or their parents),
    before `gc.freeze`. It does nothing where the process has children: the worker
    loop ends the processes a job left, and they would be this process's.
    """
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return False  # a child exists (running or not yet reaped)
    sigint = signal.getsignal(signal.SIGINT)
    node_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    node, worker = MessageSocket(node_end), MessageSocket(worker_end, fds=True)
    node_end.settimeout(REHEARSAL_TIMEOUT)  # never a hang at a node's start
    finished = 0
    try:
        # The answers (a few hundred bytes each) fit in the socket's buffer. None
        # is sent ahead: that path reads on to the end of the socket first.
        for key in range(1, jobs + 1):
            node.send(Run(key=key, attempt=0), serialize.dumps(((key,), {})))
        node_end.shutdown(socket.SHUT_WR)
        worker_loop(worker, _rehearsal_job)
        worker_end.close()  # the answers are read up to the end
        for _ in range(jobs):
            done, buffers = node.recv()
            if (
                isinstance(done, Done)
                and done.outcome == FINISHED
                and serialize.loads(buffers) == done.key + 1
            ):
                finished += 1
    except (
        OSError,
        ValueError,
        DispynbError,
    ) as exc:  # never worth failing a node's start for
        logger.debug("rehearsal of the job path failed: %s", exc)
    finally:
        node_end.close()
        worker_end.close()
        signal.signal(signal.SIGINT, sigint)
        CONTEXT.sock, CONTEXT.key, CONTEXT.attempt = None, 0, 0
    return finished == jobs
