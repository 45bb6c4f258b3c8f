"""Provisional results: job_status sees 7, 7, 7, 11 for each job, and a program that
loops on job() gets every final result (provisional ones do not wake job())."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import time

    for i in range(3):
        dispy_provisional_result((n, i))  # status ProvisionalResult (7) at the client
        time.sleep(0.2)
    return n * 10


def job_status(job):  # executed at the client
    with cond:
        statuses.setdefault(job.id, []).append(job.status)
        if job.status == dispy.DispyJob.ProvisionalResult:
            provisional.append(job.result)
        cond.notify()


if __name__ == "__main__":
    cond = threading.Condition()
    statuses = {}
    provisional = []
    cluster = dispy.JobCluster(compute, nodes=NODES, job_status=job_status)
    jobs = [cluster.submit(n) for n in range(4)]
    results = []
    for job in jobs:
        result = job()  # waits for the final result
        results.append(result)
        print("job %s: status %s, result %s" % (job.id, job.status, result))
    print("results: %s" % results)
    # job(clear=True) after the final result returns it again (dispy would block)
    print("job(clear=True): %s, then job(): %s" % (jobs[0](clear=True), jobs[0]()))
    with cond:
        cond.wait_for(lambda: sum(map(len, statuses.values())) == 16, timeout=10)
        seen = sorted(set(tuple(s) for s in statuses.values()))
        print("job_status saw, per job: %s" % seen)
        print("provisional results: %s" % sorted(provisional))
    cluster.close()
