"""dispy's names and node management as a dispy program uses them: dispy.config and
MsgTimeout, ClusterStatus, the cluster's attributes, DispyNode(ip_addr, name, cpus),
close_node (the node is released: never set up again), print_status with pending
jobs, and recover_jobs() after a clean close (nothing to recover).
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")

dispy.config.MsgTimeout = 30  # a slow network: more time for each operation


def compute(seconds):  # executed on nodes
    import time

    time.sleep(seconds)
    return dispy_node_name


def cluster_status(status, node, job):  # executed at the client
    if job is None and status in (dispy.DispyNode.Initialized, dispy.DispyNode.Closed):
        with cond:
            events.append((status, node.name))
            cond.notify_all()


if __name__ == "__main__":
    from dispynb.config import MsgTimeout  # dispy: from dispy.config import MsgTimeout

    print("MsgTimeout: %s %s" % (MsgTimeout, dispy.MsgTimeout))
    print("NodePort: %s" % (dispy.config.NodePort == dispy.config.DispyPort + 1))
    node = dispy.DispyNode("10.1.2.3", "alpha", 4)
    print("DispyNode: %s %s %s" % (node.ip_addr, node.name, node.cpus))

    cond = threading.Condition()
    events = []
    cluster = dispy.JobCluster(
        compute, nodes=NODES, cluster_status=cluster_status, pulse_interval=1
    )
    with cond:
        cond.wait_for(lambda: len(events) == 2, timeout=10)
    print(
        "pulse_interval: %s, ping_interval: %s, poll_interval: %s"
        % (cluster.pulse_interval, cluster.ping_interval, cluster.poll_interval)
    )
    print(
        "cluster_status set: %s, job_status: %s"
        % (cluster.cluster_status is cluster_status, cluster.job_status)
    )
    jobs = [cluster.submit(0.5) for _ in range(3)]
    status = cluster.status()
    print(
        "ClusterStatus: %s, jobs_pending %s, end_time %s"
        % (
            isinstance(status, dispy.ClusterStatus),
            status.jobs_pending,
            cluster.end_time,
        )
    )
    cluster.print_status()  # with a "Jobs pending" line
    cluster.wait()
    print(
        "end_time after wait: %s, cpu_time >= 1.5: %s"
        % (cluster.end_time >= cluster.start_time, cluster.cpu_time >= 1.5)
    )

    gone = next(n for n in cluster.status().nodes if n.name == "local-1")
    print("close_node(local-1): %s" % cluster.close_node(gone))
    with cond:
        cond.wait_for(lambda: (dispy.DispyNode.Closed, "local-1") in events, timeout=10)
    # Jobs for a while (several pulses, longer than a reconnection would take):
    # local-1 is released, never set up again for this cluster.
    jobs = [cluster.submit(0.3) for _ in range(8)]
    print("jobs ran on: %s" % sorted(set(job() for job in jobs)))
    with cond:
        inits = sorted(name for s, name in events if s == dispy.DispyNode.Initialized)
    print("Initialized: %s" % inits)
    cluster.close()
    print("recover_jobs(): %s" % dispy.recover_jobs())
