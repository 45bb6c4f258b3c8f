"""Every form of node spec, positive and negative `cpus`, and NodeAllocate.allocate.

Each cluster runs a few jobs; job ids keep counting across clusters, from 1, as dispy's.
A node that allocate() declines is not used, silently, as dispy's.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import time

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return dispy_node_name


def run(title, nodes, expected_nodes=2):
    cluster = dispy.JobCluster(compute, nodes=nodes)
    deadline = time.time() + 10  # wait until the nodes are set up
    while len(cluster.status().nodes) < expected_nodes and time.time() < deadline:
        time.sleep(0.1)
    jobs = [cluster.submit(n) for n in range(4)]
    names = sorted(set(job() for job in jobs))
    cpus = sorted((node.name, node.cpus) for node in cluster.status().nodes)
    print("%s: nodes %s, job ids %s-%s" % (title, cpus, jobs[0].id, jobs[-1].id))
    dispy_nodes = cluster.status().nodes
    cluster.close()
    return names, dispy_nodes


class OnlyFirstNode(dispy.NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        allocations.append("allocate %s: platform %s" % (name, platform.split("-")[0]))
        if name != "local-0":
            return 0  # this node is not used
        return cpus


if __name__ == "__main__":
    allocations = []
    (host0, port0), (host1, port1) = [node.rsplit(":", 1) for node in NODES]
    port0, port1 = int(port0), int(port1)
    run(
        "NodeAllocate cpus=-1 and cpus=1",
        [
            dispy.NodeAllocate(host0, port=port0, cpus=-1),
            dispy.NodeAllocate(host1, port=port1, cpus=1),
        ],
    )
    run(
        "tuple and dict",
        [
            (host0, port0, 1),
            {"host": host1, "port": port1, "cpus": 2},
        ],
    )
    names, dispy_nodes = run("host:port strings", NODES)
    run("DispyNode objects", dispy_nodes)
    names, _ = run(
        "NodeAllocate subclass",
        [OnlyFirstNode(host0, port=port0), OnlyFirstNode(host1, port=port1)],
        expected_nodes=1,
    )
    print("jobs ran on: %s" % names)
    print("\n".join(sorted(allocations)))
    try:  # (dispy's jobs would wait for ever: no node is used)
        dispy.JobCluster(compute, nodes=[OnlyFirstNode(host1, port=port1)])
    except Exception as exc:
        print(
            "no node allocated: %s: %s"
            % (type(exc).__name__, str(exc).split(": ", 1)[1])
        )
