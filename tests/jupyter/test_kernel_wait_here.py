"""Stop (JupyterLab's interrupt: SIGINT to the kernel's process group) while a cell's
main thread waits for its jobs one at a time with dispy's ``job()``, sending each job
itself in the I/O loop's place (`LoopRunner.enter`, d66f24c; reading results there,
3fcde4f, was taken out again): the cell gets its KeyboardInterrupt, the next cell's
jobs run on the same nodes, and no job was lost or done twice."""

from __future__ import annotations

import ast
import time

import pytest

from tests.jupyter.kernel import kernel

pytestmark = pytest.mark.slow

SETUP = """
from dispynb import DispyNode, JobCluster, LocalCluster
def sq(x):
    return x * x
lost = []
local = LocalCluster(cpus=1)
def status(s, n, j):
    if s == DispyNode.Closed:
        lost.append(str(n))
cluster = JobCluster(sq, nodes=local, pulse_interval=0.2, cluster_status=status)
"""

LOOP = """
import os
submitted = []
stopped = None
try:
    for x in range(1_000_000):
        job = cluster.submit(x)
        submitted.append((x, job))
        job()
        if x == 200:
            open(MARK + ".tmp", "w").close()
            os.replace(MARK + ".tmp", MARK)
except KeyboardInterrupt:
    stopped = x
"""

CHECK = """
later = [(10**6 + x, cluster.submit(10**6 + x)) for x in range(20)]
ok_later = [job() for _x, job in later] == [(10**6 + x) ** 2 for x in range(20)]
finished = cluster.wait(timeout=30)
every = [(x, job.status.name, job.result == x * x) for x, job in submitted + later]
print(repr((stopped, ok_later, finished, lost,
            all(s == "Finished" and r for _x, s, r in every),
            len({x for x, _s, _r in every}) == len(every),
            [n.jobs_done for n in cluster.status().nodes], len(every))))
"""


def test_stop_while_the_cell_waits_for_one_job_at_a_time(tmp_path):
    mark = tmp_path / "running"
    with kernel(tmp_path) as k:
        k.run_ok(SETUP)
        k.run_ok(f"MARK = {str(mark)!r}")
        msg_id = k.submit(LOOP)
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline, "the cell's jobs never ran"
            time.sleep(0.02)
        k.stop_button()
        out = k.collect(msg_id)
        assert out.status == "ok", out.text
        checked = k.run_ok(CHECK)
        stopped, ok_later, finished, lost, all_ok, unique, done, count = (
            ast.literal_eval(checked.stdout.strip().splitlines()[-1])
        )
        assert isinstance(stopped, int) and stopped >= 200, checked.text
        assert ok_later and finished and all_ok and unique, checked.text
        assert lost == [], checked.text
        # A job whose submit() was interrupted may have gone out: done once, too.
        assert done in ([count], [count + 1]), checked.text
        k.run_ok("cluster.close(); local.close()")
