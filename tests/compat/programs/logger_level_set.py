"""A dispy program that sets `dispy.logger`'s level itself, before making its
cluster, and logs with it: its lines are shown (on stderr), at that level. They
were shown by dispy (its cluster set the level again, to INFO), and with dispynb
went nowhere: a level alone is no handler, and Python shows only warnings then."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return n * 2


if __name__ == "__main__":
    dispy.logger.setLevel(dispy.logger.INFO)
    cluster = dispy.JobCluster(compute, nodes=NODES)
    job = cluster.submit(4)
    dispy.logger.info("job %s submitted", job.id)
    print("result: %s" % job())
    dispy.logger.debug("below the level")
    cluster.close()
