"""Provisional results: job_status sees 7, 7, 7, 11 and job(clear=True) each in turn."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import time

    for i in range(3):
        dispy_provisional_result(i)  # status ProvisionalResult (7) at the client
        time.sleep(0.5)
    return n * 10


def job_status(job):  # executed at the client
    with cond:
        statuses.append("%s %s" % (job.status, job.result))
        if job.status == dispy.DispyJob.Finished:
            cond.notify()


if __name__ == "__main__":
    cond = threading.Condition()
    statuses = []
    cluster = dispy.JobCluster(compute, nodes=NODES, job_status=job_status)
    job = cluster.submit(4)
    # job(clear=True) waits for the next provisional or final result
    results = [job(clear=True) for _ in range(4)]
    print("job(clear=True) returned: %s" % results)
    print("final status: %s, result: %s" % (job.status, job()))
    with cond:
        cond.wait_for(lambda: len(statuses) == 4, timeout=10)
        print("job_status saw: %s" % ", ".join(statuses))
    cluster.close()
