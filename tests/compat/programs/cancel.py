"""Cancelling jobs as dispy does (dispy's examples/longrun.py).

A queued job becomes Cancelled (8); a running job first gets KeyboardInterrupt: if it
catches it and returns, it is Finished with that value; if not, it is Terminated (9);
a job that ignores it is killed after a grace period, and the node runs later jobs.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(kind):  # executed on nodes
    import time

    best = 0
    started = False
    while True:
        # when a job is cancelled, KeyboardInterrupt is first raised in it, so it can
        # send its best result before it is terminated. The provisional result is
        # sent inside the try: the client cancels as soon as it sees it, and the
        # interrupt may land before the call has returned (so in dispy too).
        try:
            if not started:
                started = True
                dispy_provisional_result("started")
            best += 1
            time.sleep(0.1)
            if kind == "quick":
                return best
        except KeyboardInterrupt:
            if kind == "catches":
                return "interrupted"
            if kind == "raises":
                raise
            # "ignores": keep going until killed


def job_status(job):  # executed at the client, for provisional and final results
    if job.status == dispy.DispyJob.ProvisionalResult:
        with cond:
            provisional[job.id] = job.result
            cond.notify_all()


def started(job):
    """The job's provisional result: it has started (job() waits for the final one)."""
    with cond:
        cond.wait_for(lambda: job.id in provisional, timeout=30)
        return provisional.get(job.id)


if __name__ == "__main__":
    cond = threading.Condition()
    provisional = {}
    host, port = NODES[0].rsplit(":", 1)
    # one node, one CPU: jobs run one after the other
    node = dispy.NodeAllocate(host, port=int(port), cpus=1)
    cluster = dispy.JobCluster(compute, nodes=[node], job_status=job_status)
    running = cluster.submit("catches")
    queued = cluster.submit("catches")
    print("running job: %s" % started(running))
    print("cancel queued job: %s" % cluster.cancel(queued))
    print("cancel running job: %s" % cluster.cancel(running))
    result = running()
    print("running job: status %s, result %s" % (running.status, result))
    result = queued()
    print("queued job: status %s, result %s" % (queued.status, result))
    print("cancel finished job: %s" % cluster.cancel(running))
    for kind in ("raises", "ignores"):
        job = cluster.submit(kind)
        print("%s job: %s" % (kind, started(job)))
        print("cancel %s job: %s" % (kind, cluster.cancel(job)))
        job()
        print("%s job: status %s" % (kind, job.status))
    # the node replaced the killed job's process: it runs the next job
    job = cluster.submit("quick")
    print("next job: %s" % started(job))
    result = job()
    print("next job: status %s, result %s" % (job.status, result))
    cluster.close()
