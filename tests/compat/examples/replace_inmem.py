"""Data held in the nodes' memory and replaced between batches of jobs, written for
dispynb's tests after the idea of dispy's replace_inmem example (not its code).

A ``NodeAllocate`` subclass gives each node (two at most) a file of its own, sent
with ``depends`` and named in ``setup_args``; ``setup`` reads it into a global and
deletes it, jobs hash that data with one of hashlib's algorithms, ``cleanup`` drops
it. After a first batch, ``resetup_node`` sets each node up again with the next file,
and a second batch hashes that.
"""

import glob
import os
import random
import sys

import dispynb as dispy  # a dispy program would say: import dispy

files = sorted(
    glob.glob(os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "*.py"))
)
given = {}  # node address -> the file it holds now
handed = 0  # files given out so far


def setup(name, generation):
    global payload, source, algorithms, hashlib
    import hashlib
    import os

    with open(name, "rb") as data:
        payload = data.read()
    os.remove(name)  # in memory now
    source = name
    algorithms = sorted(
        a for a in hashlib.algorithms_guaranteed if not a.startswith("shake")
    )
    return 0


def cleanup(name, generation):
    global payload, source, algorithms
    del payload, source, algorithms


def compute(n, seconds):
    import time

    algorithm = algorithms[n % len(algorithms)]
    digest = hashlib.new(algorithm, payload).hexdigest()
    time.sleep(seconds)
    return dispy_node_ip_addr, source, algorithm, digest


def job_status(job):
    if job.status == dispy.DispyJob.Finished:
        address, name, algorithm, digest = job.result
        print(
            "job %s on %s: %s of %s = %s" % (job.id, address, algorithm, name, digest)
        )
    else:
        print("job %s did not finish: %s" % (job.id, job.exception))


class OwnFile(dispy.NodeAllocate):
    """Each node gets the next file in memory (two nodes at most, 2 CPUs each)."""

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform="*"):
        global handed
        if len(given) == 2 and ip_addr not in given:
            return 0
        path = files[handed % len(files)]
        handed += 1
        given[ip_addr] = path
        print('node %s (%s) holds "%s"' % (ip_addr, name, path))
        self.setup_args = (os.path.basename(path), handed)  # saved beside the job
        self.depends = [path]
        return min(cpus, 2)


def batch(first, count):
    for n in range(first, first + count):
        job = cluster.submit(n, random.uniform(0.2, 0.5))
        job.id = n
    cluster.wait()


if __name__ == "__main__":
    nodes = [  # the test's nodes
        OwnFile(host=spec.rsplit(":", 1)[0], port=int(spec.rsplit(":", 1)[1]))
        for spec in os.environ["DISPYNB_TEST_NODES"].split(",")
    ]
    cluster = dispy.JobCluster(
        compute,
        nodes=nodes,
        setup=setup,
        cleanup=cleanup,
        job_status=job_status,
        loglevel=dispy.logger.DEBUG,  # dispy's logger and its levels
    )
    batch(1, 6)
    for address in list(given):
        cluster.resetup_node(address)  # the next file, in place of the first
    batch(7, 6)
    cluster.print_status()
    cluster.close()
