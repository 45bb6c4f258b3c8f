"""A program run once on every node as it is set up (to install or update
something there), written for dispynb's tests after the idea of dispy's
node_update example (not its code): the computation is a script's path, and
``cluster_status`` submits it to each node as the node is set up, with
``submit_node``; what the script prints comes back in ``job.stdout`` (bytes).

Usage: node_update.py [SCRIPT [NODES]] (default: node_update_script.py beside this
file, and every node the test started).
"""

import os
import sys
import time

import dispynb as dispy  # a dispy program would say: import dispy

updated = []  # the update jobs that ended well


def cluster_status(status, node, job):
    if status == dispy.DispyNode.Initialized:
        print("node %s ready: %s CPUs" % (node.ip_addr, node.avail_cpus))
        if not cluster.submit_node(node):
            print("could not run the update on %s" % node.ip_addr)
    elif status == dispy.DispyJob.Finished:
        if job.stderr or job.exception:
            print(
                "update failed on %s: %s %s" % (job.ip_addr, job.stderr, job.exception)
            )
        else:
            print("node %s updated at %s" % (job.ip_addr, job.stdout.decode().strip()))
            updated.append(job)
    elif status == dispy.DispyJob.Terminated:
        print("update failed on %s: %s" % (job.ip_addr, job.stderr))


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    script = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.path.join(here, "node_update_script.py")
    )
    nodes = os.environ["DISPYNB_TEST_NODES"].split(",")  # the test's nodes
    wanted = int(sys.argv[2]) if len(sys.argv) > 2 else len(nodes)
    cluster = dispy.JobCluster(script, cluster_status=cluster_status, nodes=nodes)
    # Each node runs the script once it is set up; wait until that many did.
    while cluster.wait() and len(updated) < wanted:
        time.sleep(0.1)
    cluster.print_status()
    cluster.close()
