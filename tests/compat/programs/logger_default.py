"""A dispy program that logs with `dispy.logger.info`, its cluster made without
`loglevel`: dispy's default is INFO, so the lines reach stderr, as they did with
dispy (bounded_submit.py's commented-out lines, uncommented)."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return n * 2


def job_status(job):  # executed at the client
    if job.status == dispy.DispyJob.Finished:
        dispy.logger.info('job "%s" done with %s', job.id, job.result)


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES, job_status=job_status)
    jobs = []
    for i in range(3):
        job = cluster.submit(i)
        job.id = i
        jobs.append(job)
        dispy.logger.info('job "%s" submitted', i)
    cluster.wait()
    dispy.logger.debug("not shown at dispy's default level")
    print("results: %s" % [job.result for job in jobs])
    cluster.close()
