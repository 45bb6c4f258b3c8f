"""dispy's examples/bounded_submit.py: keep at most `upper_bound` jobs pending.

A job_status callback (run in dispy's callback thread) and the main thread share
`pending_jobs`, guarded by a threading.Condition. `job.id` is assigned after submit.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(i, delay):  # executed on nodes
    import time

    time.sleep(delay)
    return i


def job_status(job):  # executed at the client
    global finished, total
    if job.status == dispy.DispyJob.Finished or job.status in (
        dispy.DispyJob.Terminated,
        dispy.DispyJob.Cancelled,
        dispy.DispyJob.Abandoned,
    ):
        # 'pending_jobs' is shared between two threads: access it with 'jobs_cond'
        with jobs_cond:
            # the job may have finished before 'main' assigned its id
            pending_jobs.pop(job.id, None)
            finished += 1
            if job.status == dispy.DispyJob.Finished:
                total += job.result
            if len(pending_jobs) <= lower_bound:
                jobs_cond.notify()


if __name__ == "__main__":
    lower_bound, upper_bound = 3, 6
    jobs_cond = threading.Condition()
    pending_jobs = {}
    finished = total = max_pending = 0
    cluster = dispy.JobCluster(compute, nodes=NODES, job_status=job_status)
    for i in range(40):
        job = cluster.submit(i, 0.05)
        with jobs_cond:
            job.id = i
            # the job may have finished already; keep it only if it is pending
            if job.status in (dispy.DispyJob.Created, dispy.DispyJob.Running):
                pending_jobs[i] = job
                max_pending = max(max_pending, len(pending_jobs))
                if len(pending_jobs) >= upper_bound:
                    while len(pending_jobs) > lower_bound:
                        jobs_cond.wait()
    cluster.wait()
    with jobs_cond:
        print("finished: %s, sum of results: %s" % (finished, total))
        print("at most %s pending: %s" % (upper_bound, max_pending <= upper_bound))
        print("pending at the end: %s" % len(pending_jobs))
    cluster.close()
