"""cluster_status events for a node whose setup takes 2 s (loading data, say).

In dispy the job is Created (5) before the node is Initialized (4); dispynb's
JobCluster() returns once the node is set up, so Initialized comes first. Then
Running (6), ProvisionalResult (7) and Finished (11), as in dispy.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def setup():  # executed on the node before any job
    import time

    time.sleep(2)
    return 0


def compute(n):  # executed on nodes
    dispy_provisional_result(n)
    return n + 1


def cluster_status(status, node, job):  # executed at the client
    if status == dispy.DispyNode.AvailInfo:
        return  # resource updates come at any time
    with cond:
        line = "status %s, node %s" % (status, node.ip_addr if node else None)
        if status == dispy.DispyNode.Initialized:
            line += ", cpus %s" % node.cpus
        if job is not None:
            line += ", job %s, result %s" % (job.id, job.result)
        events.append(line)
        if status == dispy.DispyJob.Finished:
            cond.notify()


if __name__ == "__main__":
    cond = threading.Condition()
    events = []
    # one node, named explicitly
    cluster = dispy.JobCluster(
        compute, nodes=NODES[:1], setup=setup, cluster_status=cluster_status
    )
    job = cluster.submit(41)
    with cond:
        cond.wait_for(lambda: any("status 11" in e for e in events), timeout=20)
        for line in events:
            print(line)
    print("result: %s" % job())
    cluster.close()
