"""A dispy program that, having set up no logging, makes its cluster (dispy's
default INFO to stderr) and then sends `dispy.logger`'s lines to a handler of its
own: each line is shown once, by that handler, at the cluster's level."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import logging
import sys

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return n * 3


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    dispy.logger.info("before the handler")
    own = logging.StreamHandler(sys.stdout)
    own.setFormatter(logging.Formatter("own|%(levelname)s|%(message)s"))
    dispy.logger.addHandler(own)
    dispy.logger.info("after the handler")
    dispy.logger.debug("below the level")
    print("result: %s" % cluster.submit(2)())
    cluster.close()
