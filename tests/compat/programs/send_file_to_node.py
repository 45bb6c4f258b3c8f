"""`cluster.send_file(path, node)` pushes a file into the computation's directory on
one node; jobs pinned to that node with `submit_node` read it.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import os
import time

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(path):  # executed on nodes
    with open(path) as fd:
        return "%s read %s: %s" % (dispy_node_name, path, fd.read().strip())


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    deadline = time.time() + 10  # wait until both nodes are set up
    while len(cluster.status().nodes) < len(NODES) and time.time() < deadline:
        time.sleep(0.1)
    os.makedirs("conf", exist_ok=True)
    jobs = []
    for node in sorted(cluster.status().nodes, key=lambda node: node.name):
        with open("params.txt", "w") as fd:
            fd.write("params for %s\n" % node.name)
        with open(os.path.join("conf", "settings.txt"), "w") as fd:
            fd.write("settings for %s\n" % node.name)
        print(
            "send params.txt to %s: %s"
            % (node.name, cluster.send_file("params.txt", node))
        )
        print(
            "send conf/settings.txt to %s: %s"
            % (node.name, cluster.send_file("conf/settings.txt", node))
        )
        jobs.append(cluster.submit_node(node, "params.txt"))
        jobs.append(cluster.submit_node(node, "conf/settings.txt"))
    for job in jobs:
        job()
        print(job.result if job.status == dispy.DispyJob.Finished else job.exception)
    cluster.close()
