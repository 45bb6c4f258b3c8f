"""Node management: node_jobs, set_node_cpus, deallocate_node / allocate_node and
close_node, with DispyNode objects from `cluster.status()`.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import time

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(seconds):  # executed on nodes
    import time

    time.sleep(seconds)
    return dispy_node_name


def wait_nodes(cluster, count):
    deadline = time.time() + 10
    while len(cluster.status().nodes) != count and time.time() < deadline:
        time.sleep(0.1)
    return {node.name: node for node in cluster.status().nodes}


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    nodes = wait_nodes(cluster, 2)
    a, b = nodes["local-0"], nodes["local-1"]

    jobs = [cluster.submit_node(a, 1.0) for _ in range(2)]
    time.sleep(0.5)  # both jobs are running on node a
    running = cluster.node_jobs(a)
    print("node_jobs(local-0): %s" % sorted(job.id for job in running))
    print("submitted: %s" % sorted(job.id for job in jobs))
    print("node_jobs(local-1): %s" % cluster.node_jobs(b))
    cluster.wait()

    print("set_node_cpus(local-0, 1): %s" % cluster.set_node_cpus(a, 1))
    print("local-0 cpus: %s" % wait_nodes(cluster, 2)["local-0"].cpus)

    print("deallocate_node(local-0): %s" % cluster.deallocate_node(a))
    jobs = [cluster.submit(0.05) for _ in range(6)]
    print("jobs ran on: %s" % sorted(set(job() for job in jobs)))
    print("allocate_node(local-0): %s" % cluster.allocate_node(a))
    job = cluster.submit_node(a, 0)
    print("pinned job after allocate_node ran on: %s" % (job() if job else job))

    print("close_node(local-1): %s" % cluster.close_node(b))
    print("nodes: %s" % sorted(wait_nodes(cluster, 1)))
    jobs = [cluster.submit(0.05) for _ in range(4)]
    print("jobs ran on: %s" % sorted(set(job() for job in jobs)))
    cluster.close()
