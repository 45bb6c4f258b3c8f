"""dispy's examples/provisional_results.py: stop every job once one is good enough.

The callback cancels all jobs when a provisional result is acceptable. The computation
uses `os.getpid()` without importing os, as dispy's example does.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading
import time

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import time

    # os is in the node's globals (dispy's example does not import it either)
    name = "%s/%s" % (dispy_node_name, os.getpid())  # noqa: F821
    cur_best = 1.0
    for i in range(300):  # 30 s unless cancelled
        # job 0 converges to 0, the others never get below 0.5
        r = 1.0 / (i + 2) if n == 0 else 0.5 + 1.0 / (i + 2)
        if r <= cur_best:
            dispy_provisional_result((name, r))  # possible result
            cur_best = r
        time.sleep(0.1)
    return (name, cur_best)


def job_status(job):  # executed at the client
    if job.status not in (dispy.DispyJob.ProvisionalResult, dispy.DispyJob.Finished):
        return
    if job.result[1] < 0.05 and not found.is_set():
        # acceptable result: terminate jobs
        print("job %s computed %.4f on %s" % (job.id, job.result[1], job.result[0]))
        found.set()
        for j in jobs:
            if j.status in (
                dispy.DispyJob.Created,
                dispy.DispyJob.Running,
                dispy.DispyJob.ProvisionalResult,
            ):
                cluster.cancel(j)


if __name__ == "__main__":
    found = threading.Event()
    jobs = []
    cluster = dispy.JobCluster(compute, nodes=NODES, job_status=job_status)
    start = time.time()
    for n in range(5):
        job = cluster.submit(n)
        if job is None:
            print("creating job %s failed!" % n)
            continue
        jobs.append(job)
    cluster.wait()
    for job in jobs:
        print("job %s: status %s" % (job.id, job.status))
    print("stopped early: %s" % (time.time() - start < 20))
    cluster.close()
