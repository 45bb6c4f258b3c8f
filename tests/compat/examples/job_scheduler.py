"""Jobs scheduled by the program itself, one at a time per node, written for
dispynb's tests after the idea of dispy's job_scheduler example (not its code).

Its ``cluster_status`` callback hears of each node set up and each job's end, and
gives that node the next data file (``data000``, ``data001``...) with
``submit_node`` and ``dispy_job_depends``; the node hashes it. Type ``quit`` (or
``exit``) to let the jobs finish and see the status table.
"""

import os
import sys

import dispynb as dispy  # a dispy program would say: import dispy

next_file = 0


def compute(path):
    import hashlib
    import os
    import time

    digest = hashlib.sha1()
    with open(os.path.basename(path), "rb") as data:  # sent beside the job
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    time.sleep(0.5)  # the work a real job would do
    return digest.hexdigest()


def cluster_status(status, node, job):
    global next_file
    if status == dispy.DispyNode.Initialized:
        print("node %s ready: %s CPUs" % (node.ip_addr, node.avail_cpus))
    elif status == dispy.DispyJob.Finished:
        print("%s sha1 %s" % (job.id, job.result))
    elif status == dispy.DispyJob.Terminated:
        print("%s not hashed: %s" % (job.id, job.exception))
    else:
        return
    name = "data%03d" % next_file
    if os.path.isfile(name):
        next_file += 1
        # submit_node takes the node, dispy_job_depends the files the job needs;
        # compute gets only the path.
        job = cluster.submit_node(node, name, dispy_job_depends=[name])
        job.id = name


if __name__ == "__main__":
    nodes = os.environ["DISPYNB_TEST_NODES"].split(",")  # the test's nodes
    cluster = dispy.JobCluster(compute, cluster_status=cluster_status, nodes=nodes)
    try:
        for line in sys.stdin:
            if line.strip().lower() in ("quit", "exit"):
                break
    except KeyboardInterrupt:
        pass
    cluster.wait()
    cluster.print_status()
    cluster.close()
