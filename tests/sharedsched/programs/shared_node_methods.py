"""Node management through a shared scheduler, as a dispy user writes it:
set_node_cpus, deallocate_node / allocate_node and close_node of a
SharedJobCluster, with DispyNode objects from `cluster.status()`.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import itertools
import time

# The test's only addition: where its scheduler runs (the user's credential comes
# from DISPYNB_SECRET_FILE, as the secret of any dispynb program may).
from os import environ

SCHEDULER = environ["DISPYNB_TEST_SCHEDULER"]


def compute(seconds):  # executed on nodes
    import time

    time.sleep(seconds)
    return dispy_node_name


def wait_nodes(cluster, count):
    deadline = time.time() + 10
    while len(cluster.status().nodes) != count and time.time() < deadline:
        time.sleep(0.1)
    return {node.name: node for node in cluster.status().nodes}


def one_at_a_time(jobs):
    spans = sorted((job.start_time, job.end_time) for job in jobs)
    return all(b[0] >= a[1] for a, b in itertools.pairwise(spans))


if __name__ == "__main__":
    cluster = dispy.SharedJobCluster(compute, scheduler_host=SCHEDULER)
    nodes = wait_nodes(cluster, 2)
    a, b = nodes["local-0"], nodes["local-1"]

    print("set_node_cpus(local-0, 1): %s" % cluster.set_node_cpus(a, 1))
    print("local-0 cpus: %s" % wait_nodes(cluster, 2)["local-0"].cpus)
    jobs = [cluster.submit_node(a, 0.2) for _ in range(3)]
    cluster.wait()
    print("one at a time on local-0: %s" % one_at_a_time(jobs))
    print("set_node_cpus(local-0, -1): %s" % cluster.set_node_cpus(a, -1))
    print("set_node_cpus(local-0, 8): %s" % cluster.set_node_cpus(a, 8))

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
    print("allocate_node(local-1): %s" % cluster.allocate_node(b))
    print("nodes: %s" % sorted(wait_nodes(cluster, 2)))
    cluster.close()
