"""What a program learns about nodes: `cluster.status()` (ClusterStatus), DispyNode
attributes, and AvailInfo (17) cluster_status events with DispyNodeAvailInfo, sent
with the nodes' pulses (`pulse_interval`).
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading
import time

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import time

    time.sleep(0.3)
    return n


def cluster_status(status, node, job):  # executed at the client
    if status == dispy.DispyNode.AvailInfo:
        with cond:
            avail.append(node.avail_info)
            cond.notify()


if __name__ == "__main__":
    cond = threading.Condition()
    avail = []
    cluster = dispy.JobCluster(
        compute, nodes=NODES[:1], cluster_status=cluster_status, pulse_interval=0.5
    )
    jobs = [cluster.submit(i) for i in range(4)]
    status = cluster.status()
    print("%s: jobs_pending %s" % (type(status).__name__, status.jobs_pending))
    cluster.wait()
    with cond:
        cond.wait_for(lambda: len(avail) >= 2, timeout=10)
    nodes, pending = cluster.status()
    print("jobs_pending after wait: %s, nodes: %s" % (pending, len(nodes)))
    node = nodes[0]
    print(
        "%s %s at %s: cpus %s, avail_cpus %s, busy %s, jobs_done %s"
        % (
            type(node).__name__,
            node.name,
            node.ip_addr,
            node.cpus,
            node.avail_cpus,
            node.busy,
            node.jobs_done,
        )
    )
    print(
        "cpu_time >= 1.0: %s, tx > 0: %s, rx > 0: %s, updated in the last minute: %s"
        % (
            node.cpu_time >= 1.0,
            node.tx > 0,
            node.rx > 0,
            time.time() - node.update_time < 60,
        )
    )
    print("AvailInfo events: %s" % (len(avail) >= 2))
    for info in (avail[-1] if avail else None, node.avail_info):
        if isinstance(info, dispy.DispyNodeAvailInfo):
            print(
                "avail_info: cpu %% %s, memory %s, disk %s, swap %% %s"
                % (
                    0 <= info.cpu <= 100,
                    info.memory > 0,
                    info.disk > 0,
                    0 <= info.swap <= 100,
                )
            )
        else:
            print("avail_info: %r" % (info,))
    cluster.close()
