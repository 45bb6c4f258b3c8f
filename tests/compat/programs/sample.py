"""dispy's examples/sample.py: job(), job attributes and print_status."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import time

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import time

    time.sleep(0.1)
    print("computing %s" % n)
    # dispy_node_name is the name of the node that runs this computation
    return (dispy_node_name, n * n)


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    print("cluster name: %s" % cluster.name)
    # wait until both nodes are set up (dispy programs sleep or use cluster_status)
    deadline = time.time() + 10
    while len(cluster.status().nodes) < len(NODES) and time.time() < deadline:
        time.sleep(0.1)
    jobs = []
    for i in range(8):
        # schedule execution of 'compute' on a node with a parameter
        job = cluster.submit(i)
        jobs.append(job)
    for job in jobs:
        host, n = job()  # waits for the job to finish and returns its result
        times_ok = job.submit_time <= job.start_time <= job.end_time
        print(
            "job %s: %s computed %s at %s, status %s, stdout %r, stderr %r, "
            "exception %s, times ok: %s"
            % (
                job.id,
                host,
                n,
                job.ip_addr,
                job.status,
                job.stdout,
                job.stderr,
                job.exception,
                times_ok,
            )
        )
    print("wait: %s" % cluster.wait())
    cluster.print_status()
    cluster.close()
