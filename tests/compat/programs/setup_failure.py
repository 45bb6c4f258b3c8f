"""Setup failures: a node whose setup raises or returns a failure code is not used for
the computation, and the client logs why; a setup that runs longer than dispy's 10 s
limit is not a failure (dispy bug 8.4.5, fixed in dispynb).

A NodeAllocate subclass gives each node its own setup_args.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def setup(mode):  # executed on each node before any job
    import time

    global ready
    if mode == "raise":
        raise ValueError("no data for this node")
    if mode == "return":
        return -1  # anything but 0 (or dispy's 1 and 2) is a failure
    if mode == "slow":
        time.sleep(11)  # loading a large data set, say
    ready = mode
    return 0


def compute(n):  # executed on nodes
    import time

    time.sleep(0.05)
    return (dispy_node_name, ready)


def run(failure):
    class NodeAllocate(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            if name == "local-0":
                self.setup_args = ("ok",)
            else:
                self.setup_args = (failure,)
            return cpus

    nodes = []
    for node in NODES:
        host, port = node.rsplit(":", 1)
        nodes.append(NodeAllocate(host, port=int(port)))
    cluster = dispy.JobCluster(compute, nodes=nodes, setup=setup)
    jobs = [cluster.submit(n) for n in range(8)]
    ran_on = set()
    for job in jobs:
        job()
        if job.status == dispy.DispyJob.Finished:
            ran_on.add(job.result)
        else:
            print("job %s: status %s: %s" % (job.id, job.status, job.exception))
    print("setup %s: jobs ran on %s" % (failure, sorted(ran_on)))
    nodes = sorted(node.name for node in cluster.status().nodes)
    print("setup %s: nodes in cluster: %s" % (failure, nodes))
    cluster.close()


if __name__ == "__main__":
    run("raise")
    run("return")

    # one node whose setup takes 11 s; its jobs wait for it
    host, port = NODES[1].rsplit(":", 1)
    node = dispy.NodeAllocate(host, port=int(port), setup_args=("slow",))
    cluster = dispy.JobCluster(compute, nodes=[node], setup=setup)
    job = cluster.submit(0)
    job()
    print("slow setup: status %s, result %s" % (job.status, job.result))
    cluster.close()
