"""dispy's examples/delegate.py: functions sent with one job (`dispy_job_depends`).

The computation looks the function up by name in its globals; a function sent with a
job is discarded when that job is over.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def delegate(func_name, n):  # executed on nodes
    # the function was sent with 'dispy_job_depends' and is in the global scope
    func = globals()[func_name]
    return func(n)


def func1(n):
    return (dispy_node_name + ": func1", n)


def func2(n):
    return (dispy_node_name + ": func2", n * n)


if __name__ == "__main__":
    cluster = dispy.JobCluster(delegate, nodes=NODES)
    jobs = []
    for i in range(4):
        # run the above functions alternately
        func = func1 if i % 2 == 0 else func2
        # this function is specific to this job: it is discarded when the job is over
        job = cluster.submit(func.__name__, i + 5, dispy_job_depends=[func])
        if not job:
            print("Failed to create job %s" % i)
            continue
        jobs.append(job)
    for job in jobs:
        job()  # waits for the job to finish
        if job.status == dispy.DispyJob.Finished:
            host, n = job.result
            print("job %s: %s with %s" % (job.id, host.split(": ")[1], n))
        else:
            print("job %s: status %s: %s" % (job.id, job.status, job.exception))
    cluster.wait()
    # without dispy_job_depends, the functions of earlier jobs are gone
    jobs = [cluster.submit(name, 1) for name in ("func1", "func2")]
    for job in jobs:
        job()
        print(
            "job %s without depends: status %s, KeyError: %s"
            % (job.id, job.status, "KeyError" in (job.exception or ""))
        )
    cluster.close()
