"""Objects of a class defined here as job arguments, written for dispynb's tests
after the idea of dispy's obj_instances example (not its code): the class travels
to the nodes with ``depends``, the job calls its method, and what the method prints
comes back in ``job.stdout``.
"""

import os
import random

import dispynb as dispy  # a dispy program would say: import dispy


class Sample:
    """How long a job waits, and the label it prints."""

    def __init__(self, label, seconds):
        self.label = label
        self.seconds = seconds

    def describe(self):
        print("%s: %.2f" % (self.label, self.seconds))


def compute(sample):
    import time

    time.sleep(sample.seconds)
    sample.describe()
    return sample.seconds


if __name__ == "__main__":
    # The test's nodes; a dispy user would name theirs (or let discovery find them).
    nodes = os.environ["DISPYNB_TEST_NODES"].split(",")
    cluster = dispy.JobCluster(compute, depends=[Sample], nodes=nodes)
    submitted = []
    for label in range(10):
        sample = Sample(label, random.uniform(0.5, 1.5))
        job = cluster.submit(sample)
        job.id = sample  # any object may be a job's id: here its argument
        submitted.append(job)
    for job in submitted:
        job()
        print("%s: %.2f / %s" % (job.id.label, job.result, job.stdout.strip()))
    cluster.close()
