"""Futures, the Executor and recover_jobs in a real kernel's cells, where the
kernel's event loop is running: ``await`` on jobs and futures, as people type it."""

from __future__ import annotations

import pytest

from tests.jupyter.kernel import kernel

pytestmark = pytest.mark.slow


def test_await_jobs_and_executor_futures_in_notebook_cells(tmp_path):
    with kernel(tmp_path) as k:
        k.run_ok(
            "from dispynb import Executor, JobCluster, LocalCluster\n"
            "local = LocalCluster(cpus=2)\n"
            "executor = Executor(nodes=local)\n"
            "def square(x):\n"
            "    return x * x\n"
            "cluster = JobCluster(square, nodes=local)"
        )
        try:
            out = k.run_ok("job = cluster.submit(7)\n(await job, await job.future)")
            assert out.data[-1]["text/plain"] == "(49, 49)"
            out = k.run_ok("await executor.submit(pow, 2, 10)")
            assert out.data[-1]["text/plain"] == "1024"
            failed = k.execute("await executor.submit(divmod, 1, 0)")
            assert failed.ename == "ZeroDivisionError", failed.text
            assert "RemoteError" in failed.error_text, failed.text  # its cause
            failed = k.execute("await cluster.submit('x').future")
            assert failed.ename == "RemoteError", failed.text
            assert "TypeError" in failed.error_text and "in square" in failed.error_text
        finally:
            k.run_ok("cluster.close(); executor.shutdown(); local.close()")
