"""job_status as dispy calls it: in one thread that is not the caller's, with a copy
of the job (changing `job.id` there leaves the program's job alone), for Terminated jobs
with the traceback in `job.exception`; a callback that raises is logged, not fatal.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    if n == 3:
        raise ValueError("bad input %d" % n)
    return n * 2


def job_status(job):  # executed at the client
    with cond:
        seen.append((job.id, job.status))
        threads.add(threading.current_thread().name)
        original_id = job.id
        job.id = "changed in callback"  # changes only the copy given to the callback
        cond.notify()
    if original_id == "job-0":
        raise RuntimeError("this callback failure is logged, not fatal")


if __name__ == "__main__":
    cond = threading.Condition()
    seen = []
    threads = set()
    cluster = dispy.JobCluster(compute, nodes=NODES, job_status=job_status)
    jobs = [cluster.submit_job_id("job-%d" % n, n) for n in range(5)]
    cluster.wait()
    with cond:
        cond.wait_for(lambda: len(seen) == len(jobs), timeout=10)
    for job in jobs:
        result = job()
        print("%s: status %s, result %s" % (job.id, job.status, result))
        if job.exception:
            print("  exception: %s" % job.exception.strip().splitlines()[-1])
    print("job_status saw: %s" % sorted("%s %s" % item for item in seen))
    print(
        "callback threads: %s, main thread among them: %s"
        % (len(threads), threading.current_thread().name in threads)
    )
    cluster.close()
