"""dispy's examples/sample.py, as its documentation shows it for a shared scheduler:
``SharedJobCluster(compute, scheduler_host=...)`` instead of ``JobCluster(compute)``."""

# The test's only addition: where its scheduler runs (the user's credential comes
# from DISPYNB_SECRET_FILE, as the secret of any dispynb program may).
from os import environ

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

SCHEDULER = environ["DISPYNB_TEST_SCHEDULER"]


def compute(n):  # executed on nodes
    import socket
    import time

    time.sleep(n)
    host = socket.gethostname()
    return (host, n)


if __name__ == "__main__":
    import random

    cluster = dispy.SharedJobCluster(compute, scheduler_host=SCHEDULER)
    jobs = []
    for i in range(10):
        # schedule execution of 'compute' on a node (running 'dispynode')
        # with a parameter (random number in this case)
        job = cluster.submit(random.randint(1, 5) / 10.0)
        job.id = i  # optionally associate an ID to job (if needed later)
        jobs.append(job)
    # cluster.wait() # waits for all scheduled jobs to finish
    for job in jobs:
        host, n = job()  # waits for job to finish and returns results
        print("%s executed job %s at %s with %s" % (host, job.id, job.start_time, n))
        # other fields of 'job' that may be useful:
        # print(job.stdout, job.stderr, job.exception, job.ip_addr, job.end_time)
    cluster.print_status()
