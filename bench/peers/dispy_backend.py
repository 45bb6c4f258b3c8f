"""dispy (the PyPI release, 4.15.2 with pycos 4.12.2) as a benchmark backend.

One ``dispynode.py`` process serves W CPUs on 127.0.0.1 (``-i 127.0.0.1 -c W``); the
client names that node explicitly (``nodes=["127.0.0.1"]``, ``host="127.0.0.1"``), so
no discovery broadcast is needed. Ports are dispy's defaults: the client listens on
9700, the node on 9701. Every job is one ``submit``; results come back through
``job()``. Like dispynb, dispy runs one computation per `JobCluster`, so a cluster is
created per task function (during a warm-up) and closed before the next one.

Python 3.11: the release calls ``inspect.getargspec`` (removed in 3.11) only to check
the ``job_status`` and ``cluster_status`` callbacks; the benchmark passes neither, so
the client runs as released, without a shim.

One workaround, in the node: ``dispynode.py`` starts a job's process while the thread
that receives job results may already handle that job's reply: a job as short as
``inc`` can finish before ``Process.start()`` has returned in the node. The node then
either reports the job Terminated (``AttributeError: 'NoneType' object has no
attribute 'pid'``, when the reply thread cleared ``job_info.proc`` first) or its reply
thread dies (``AssertionError: can only join a started process``) and every later
job hangs; in W1 one of the two happened in about every other round. The adapter runs
a copy of ``dispynode.py`` (`NODE_PATCH`, two lines) that starts the process while
holding the node's ``thread_lock`` (which the reply thread takes to look a job up) and
keeps it in a local variable; nothing else is changed.

The node is stopped with SIGINT ("exit after the
current client"): with SIGTERM it lingers for seconds after a client has been served.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import psutil
from backends import BenchmarkError, Task

NODE_PORT = 9701  # dispy.config.DispyPort + 1
START_TIMEOUT = 60.0

#: (old, new) text replacements applied to a copy of ``dispynode.py`` (see above).
NODE_PATCH = (
    (
        "job_info.proc = multiprocessing.Process(target=_dispy_job_func, args=args)\n"
        "                        job_info.proc.start()\n",
        "job_info.proc = _bench_proc = multiprocessing.Process("
        "target=_dispy_job_func, args=args)\n"
        "                        with self.thread_lock: _bench_proc.start()\n",
    ),
    (
        "pickle.dump({'pid': job_info.proc.pid, 'ppid': self.pid}, fd)\n"
        "                except Exception:\n"
        "                    job_info.job_reply.result = serialize(None)\n",
        "pickle.dump({'pid': _bench_proc.pid, 'ppid': self.pid}, fd)\n"
        "                except Exception:\n"
        "                    job_info.job_reply.result = serialize(None)\n",
    ),
)


def patched_node_script(directory: str) -> str:
    """Write the patched copy of ``dispynode.py`` into ``directory``; its path."""
    original = os.path.join(os.path.dirname(sys.executable), "dispynode.py")
    with open(original, encoding="utf-8") as fh:
        text = fh.read()
    for old, new in NODE_PATCH:
        if text.count(old) != 1:
            raise BenchmarkError(
                f"dispynode.py does not contain the patched lines: {old!r}"
            )
        text = text.replace(old, new)
    path = os.path.join(directory, "dispynode.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


class DispyBackend:
    """dispy: a ``dispynode.py`` on 127.0.0.1 and a `dispy.JobCluster` per function."""

    name = "dispy"

    def __init__(self, workers: int) -> None:
        import dispy  # imported before the start-up clock starts

        self._dispy = dispy
        self.workers = workers
        self._node: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._secret = secrets.token_hex(16)
        self._cluster: Any = None
        self._fn: Task | None = None

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="bench-dispy-")
        script = patched_node_script(self._dir)
        command = [
            sys.executable, script,
            "-i", "127.0.0.1",
            "-c", str(self.workers),
            "--daemon", "--clean",
            "--dest_path_prefix", os.path.join(self._dir, "node"),
            "-s", self._secret,
        ]  # fmt: skip
        self._node = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self._dir, "node.log"), "wb"),  # noqa: SIM115
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        """Block until the node listens on its TCP port (read from /proc, no probe)."""
        assert self._node is not None
        deadline = time.monotonic() + START_TIMEOUT
        proc = psutil.Process(self._node.pid)
        while time.monotonic() < deadline:
            if self._node.poll() is not None:
                raise BenchmarkError(f"dispynode exited with {self._node.returncode}")
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == NODE_PORT:
                    return
            time.sleep(0.01)
        raise BenchmarkError(f"dispynode did not listen within {START_TIMEOUT} s")

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        cluster = self._cluster_for(fn)
        jobs = [cluster.submit(*args) for args in arglists]
        return [self._result(job) for job in jobs]

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._result(self._cluster_for(fn).submit(arg))

    def _cluster_for(self, fn: Task) -> Any:
        if self._fn is fn:
            return self._cluster
        self._close_cluster()
        assert self._dir is not None
        self._cluster = self._dispy.JobCluster(
            fn,
            nodes=["127.0.0.1"],
            host="127.0.0.1",
            secret=self._secret,
            loglevel=self._dispy.logger.WARNING,
            recover_file=os.path.join(self._dir, f"recover-{fn.__name__}"),
        )
        self._fn = fn
        return self._cluster

    def _result(self, job: Any) -> Any:
        result = job()
        if job.status != self._dispy.DispyJob.Finished:
            raise BenchmarkError(
                f"dispy job ended with status {job.status} instead of Finished:\n"
                f"{job.exception or '(no traceback)'}"
            )
        return result

    def _close_cluster(self) -> None:
        if self._cluster is not None:
            cluster, self._cluster, self._fn = self._cluster, None, None
            cluster.close()

    def close(self) -> None:
        self._close_cluster()
        if self._node is not None:
            self._node.send_signal(signal.SIGINT)
            try:
                self._node.wait(15)
            except subprocess.TimeoutExpired:
                self._node.kill()
                self._node.wait()
            self._node = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def describe(self) -> dict[str, Any]:
        import pycos

        return {
            "version": f"{self._dispy.__version__} (pycos {pycos.__version__})",
            "config": f"1 dispynode.py -i 127.0.0.1 -c {self.workers} (job-start race"
            " patched, see bench/peers/dispy_backend.py);"
            " JobCluster(nodes=['127.0.0.1'], host='127.0.0.1') per function",
        }
