"""A node reached through a forwarded port, written for dispynb's tests after the
idea of dispy's sshportfw example (not its code). dispy's client needed its own
port forwarded back from each node (``ssh -R``) and gave its address with
``ip_addr=``; dispynb's nodes never connect back, so only the node's port needs
forwarding (see the migration guide). ``ip_addr`` is still accepted (deprecated:
``host``). Jobs use ``time`` without importing it, as dispy's nodes allow.
"""

import os

import dispynb as dispy  # a dispy program would say: import dispy


def compute(n):
    time.sleep(n / 10)  # noqa: F821 (the node provides time, as dispy's nodes do)
    return n


if __name__ == "__main__":
    # The node's port as forwarded to this machine (ssh -L): the test's relay.
    nodes = os.environ["DISPYNB_TEST_NODES"].split(",")
    cluster = dispy.JobCluster(compute, nodes=nodes, ip_addr="127.0.0.1")
    jobs = [cluster.submit(n) for n in range(1, 7)]
    for job in jobs:
        print("result: %s" % job())
    cluster.close()
