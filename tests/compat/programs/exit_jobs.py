"""Jobs submitted while the program exits (dispy's examples/job_scheduler.py).

job_scheduler.py submits each next job, with its data file in `dispy_job_depends`,
from cluster_status when the one before finishes: the last of them is submitted as
the main thread returns from wait() and the interpreter exits. Here that moment is
made certain: an atexit function (run before the cluster is closed at exit) submits
a job with a file and waits for it, and sends a file to the node with send_file.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import atexit

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(path):  # executed on nodes
    import os

    with open(os.path.basename(path)) as fd:
        return fd.read().strip()


def last_jobs():  # runs at interpreter exit, before dispy closes the cluster
    with open("data_exit", "w") as fd:
        fd.write("data sent at exit\n")
    job = cluster.submit("data_exit", dispy_job_depends=["data_exit"])
    print("at exit: %r, status %s" % (job(), job.status))
    with open("sent_exit", "w") as fd:
        fd.write("file sent at exit\n")
    node = cluster.status().nodes[0]
    print("send_file at exit: %s" % cluster.send_file("sent_exit", node))
    job = cluster.submit_node(node, "sent_exit")
    print("at exit: %r, status %s" % (job(), job.status))


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES[:1])
    with open("data000", "w") as fd:
        fd.write("data before exit\n")
    job = cluster.submit("data000", dispy_job_depends=["data000"])
    print("before exit: %r, status %s" % (job(), job.status))
    atexit.register(last_jobs)
