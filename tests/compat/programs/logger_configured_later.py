"""A dispy program that sets up logging after making its cluster,
`logging.basicConfig(level=logging.WARNING)`, as a script does when it wants
warnings only. From then on its set-up decides: no INFO line, and each line shown
once, by the program's handler."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import logging

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return n + 1


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    dispy.logger.info("before basicConfig, at dispy's default level")
    logging.basicConfig(level=logging.WARNING, format="root|%(levelname)s|%(message)s")
    dispy.logger.info("info after basicConfig")
    dispy.logger.warning("warning after basicConfig")
    job = cluster.submit(1)
    print("result: %s" % job())
    dispy.logger.info("info at the end")
    cluster.close()
