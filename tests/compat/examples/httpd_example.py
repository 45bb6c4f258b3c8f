"""A cluster watched in a browser while its jobs run, written for dispynb's tests
after the idea of dispy's httpd_example (not its code): ``dispy.httpd``'s
``DispyHTTPServer(cluster)`` serves the web monitor, the jobs' arguments are
objects of a class defined here (shown by their ``__str__`` there), and
``shutdown()`` ends the server once the jobs are done.
"""

import os
import random

import dispynb as dispy  # a dispy program would say: import dispy
import dispynb.httpd  # ... and: import dispy.httpd


class Reading:
    """A named measurement; its ``__str__`` is what the monitor shows of it."""

    def __init__(self, name, value):
        self.name = name
        self.value = value

    def __str__(self):
        return "Reading(%s, %.3f)" % (self.name, self.value)


def compute(reading, seconds=1):
    import time

    time.sleep(seconds)
    return seconds * reading.value


if __name__ == "__main__":
    nodes = os.environ["DISPYNB_TEST_NODES"].split(",")  # the test's nodes
    cluster = dispy.JobCluster(compute, depends=[Reading], nodes=nodes)
    # port=0: any free port (its address is logged); dispy's default is 8181.
    monitor = dispy.httpd.DispyHTTPServer(cluster, port=0)
    for n in range(8):
        cluster.submit(
            Reading("r%d" % n, random.uniform(1, 9)), seconds=random.randint(1, 2)
        )
    cluster.wait()
    monitor.shutdown()
    cluster.close()
