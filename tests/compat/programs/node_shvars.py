"""dispy's examples/node_shvars.py: a multiprocessing shared value created in setup.

Jobs run in processes forked from the process that ran setup, so every job on a node
updates the same shared counter.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def setup():  # executed on each node before any job
    import multiprocessing
    import multiprocessing.sharedctypes

    global shvar
    # recursive: a job holds it while `shvar.value` takes it again
    lock = multiprocessing.RLock()
    shvar = multiprocessing.sharedctypes.Value("i", 0, lock=lock)
    return 0


def cleanup():
    global shvar
    del shvar


def compute():
    import time

    with shvar.get_lock():
        shvar.value += 1
        value = shvar.value
    time.sleep(0.05)
    return (dispy_node_name, value)


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES, setup=setup, cleanup=cleanup)
    jobs = []
    for _ in range(12):
        job = cluster.submit()
        jobs.append(job)
    counts = {}
    for job in jobs:
        job()
        if job.status != dispy.DispyJob.Finished:
            print("job %s failed: %s" % (job.id, job.exception))
        else:
            node, value = job.result
            counts.setdefault(node, []).append(value)
    print("jobs counted: %s" % sum(len(values) for values in counts.values()))
    # on each node the shared counter saw every job of that node exactly once
    print(
        "each node's counter is 1..n: %s"
        % all(sorted(v) == list(range(1, len(v) + 1)) for v in counts.values())
    )
    cluster.close()
