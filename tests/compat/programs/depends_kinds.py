"""dispy's examples/obj_instances.py, with every kind of `depends`.

A class (its instances are job arguments, `job.id` is set to one), a module file, a
function and an instance (which stands for its class) are all sent with depends.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import helpers

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


class C:
    def __init__(self, i, n):
        self.i = i
        self.n = n

    def show(self):
        print("%s: %.2f" % (self.i, self.n))


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm2(self):
        return self.x * self.x + self.y * self.y


def offset(x):
    return x + 100


def compute(obj):  # executed on nodes; obj is an instance of C
    import os
    import time

    import helpers  # its file was sent with depends, to the computation's directory

    time.sleep(obj.n)
    obj.show()
    p = Point(obj.i, 1)
    return (
        obj.n,
        helpers.scale(obj.i),
        offset(obj.i),
        p.norm2(),
        os.path.isfile("helpers.py"),
    )


if __name__ == "__main__":
    cluster = dispy.JobCluster(
        compute, nodes=NODES, depends=[C, helpers, offset, Point(0, 0)]
    )
    jobs = []
    for i in range(4):
        c = C(i, 0.1 * i)  # create an object of C
        job = cluster.submit(c)  # it is sent to a node for executing 'compute'
        job.id = c  # store this object for later use
        jobs.append(job)
    for job in jobs:
        job()  # wait for the job to finish
        n, scaled, shifted, norm2, has_file = job.result
        print("%s: %.2f / %r" % (job.id.i, n, job.stdout))
        print(
            "  module %s, function %s, class %s, module file on node: %s"
            % (scaled, shifted, norm2, has_file)
        )
    cluster.close()
