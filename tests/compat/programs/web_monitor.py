"""dispy's web monitor as its programs start it: no logging set up, nothing printed.

dispy's monitor needed no token, and its client logged the address at INFO; dispynb's
needs the token in the URL, so the program's user must see that URL somewhere.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import dispynb.httpd  # dispy: `import dispy.httpd` (the migration guide's one line)

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


class Point:
    def __init__(self, x):
        self.x = x

    def __str__(self):  # shown on the monitor's node page in dispy
        return "Point(%s)" % self.x


def compute(point, scale=2):
    return point.x * scale


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES, depends=[Point])
    # port 0: a free port (dispy's default 8181 may be taken where the test runs)
    monitor = dispy.httpd.DispyHTTPServer(cluster, port=0)
    jobs = [cluster.submit(Point(i), scale=3) for i in range(4)]
    cluster.wait()
    print("results: %s" % [job.result for job in jobs])
    monitor.shutdown()
    cluster.close()
