"""dispy's examples/longrun.py and node_update.py: jobs for each node as it is set up.

cluster_status calls `cluster.submit_node(node)` for every Initialized node; a
NodeAllocate subclass limits each node to one CPU and sees the cluster's name.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import time

    time.sleep(0.2)
    return dispy_node_name


def cluster_status(status, node, job):  # executed at the client
    if status == dispy.DispyNode.Initialized:
        with cond:
            for i in range(node.cpus + 1):
                job = cluster.submit_node(node, i)
                if isinstance(job, dispy.DispyJob):
                    pinned.append((node.name, node.cpus, job))
                else:
                    print("failed to submit job at %s" % node.ip_addr)
            cond.notify()


if __name__ == "__main__":

    class NodeAllocate(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            allocations.append(
                "Allocate node for %s: %s / %s / %s"
                % (cluster.name, ip_addr, name, cpus)
            )
            return min(cpus, 1)  # use at most 1 cpu per node

    cond = threading.Condition()
    pinned = []
    allocations = []
    nodes = []
    for node in NODES:
        host, port = node.rsplit(":", 1)
        nodes.append(NodeAllocate(host, port=int(port)))
    cluster = dispy.JobCluster(compute, nodes=nodes, cluster_status=cluster_status)
    with cond:
        cond.wait_for(lambda: len(pinned) == 2 * len(NODES), timeout=20)
    for line in sorted(allocations):
        print(line)
    for name, cpus, job in sorted(pinned, key=lambda item: (item[0], item[2].id)):
        print("node %s (%s cpus): job ran there: %s" % (name, cpus, job() == name))
    print("unknown node: %s" % cluster.submit_node("10.255.255.1", 0))
    node = cluster.status().nodes[0]
    job = cluster.submit_job_id_node("pinned", node, 0)
    print("job %s ran on its node: %s" % (job.id, job() == node.name))
    cluster.wait()
    cluster.close()
