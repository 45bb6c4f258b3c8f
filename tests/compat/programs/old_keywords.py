"""dispy up to 4.10 (and the documentation of those versions): JobCluster's
``node_port`` (the port of the nodes named without one) and ``port`` (the client's).

The node is named by its address alone, its port given once with ``node_port``; after
close_node, allocate_node names it by its address alone again. Then dispy 4.15's
pairing: nodes started with ``-p P``, clients given ``dispy_port=P``.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return (dispy_node_name, n * n)


if __name__ == "__main__":
    host, node_port = NODES[0].rsplit(":", 1)
    cluster = dispy.JobCluster(compute, nodes=[host], node_port=int(node_port), port=0)
    print("job: %s, %s" % cluster.submit(3)())
    print("close_node: %s" % cluster.close_node(host))
    print("allocate_node: %s" % cluster.allocate_node(host))
    print("job after allocate_node: %s, %s" % cluster.submit(4)())
    cluster.close()
    # dispy 4.15: `dispynode.py -p P` pairs with JobCluster(..., dispy_port=P)
    cluster = dispy.JobCluster(compute, nodes=[host], dispy_port=int(node_port))
    print("dispy_port job: %s, %s" % cluster.submit(5)())
    cluster.close()
