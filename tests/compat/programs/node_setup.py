"""dispy's examples/node_setup.py and replace_inmem.py: per-node depends and setup_args.

A NodeAllocate subclass gives each node its own data file; `setup` reads it into memory
(a global), deletes the file and imports a module as a global; jobs use those globals.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import glob
import hashlib
import os

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def setup(data_file):  # executed on each node before any job
    global data, hashlib, file_name
    import hashlib
    import os

    with open(data_file, "rb") as fd:
        data = fd.read()  # read the file into memory once
    os.remove(data_file)  # data_file can now be deleted
    file_name = data_file
    return 0


def cleanup(data_file):
    global data, file_name
    del data, file_name


def compute(n):
    import os
    import time

    # 'hashlib', 'data' and 'file_name' are globals initialized in 'setup'
    csum = hashlib.sha1()
    csum.update(data)
    time.sleep(0.1)
    return (dispy_node_name, file_name, os.path.exists(file_name), csum.hexdigest())


if __name__ == "__main__":
    data_files = sorted(glob.glob("*.txt"))
    allocated = {}

    # sub-class NodeAllocate to use node (and computation) specific depends/setup_args
    class NodeAllocate(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            data_file = data_files[len(allocated) % len(data_files)]
            allocated[name] = data_file
            self.depends = [data_file]  # 'depends' must be a list
            # files are saved on the node in the computation's directory: send basename
            self.setup_args = (os.path.basename(data_file),)  # must be a tuple
            return cpus

    nodes = []
    for node in NODES:
        host, port = node.rsplit(":", 1)
        nodes.append(NodeAllocate(host, port=int(port)))
    cluster = dispy.JobCluster(compute, nodes=nodes, setup=setup, cleanup=cleanup)
    jobs = [cluster.submit(n) for n in range(10)]
    digests = {}
    for name in data_files:
        with open(name, "rb") as fd:
            digests[name] = hashlib.sha1(fd.read()).hexdigest()
    for job in jobs:
        job()
        if job.status == dispy.DispyJob.Finished:
            node, file_name, exists, digest = job.result
            print(
                "job %s: node's file %s, in memory: %s, file deleted: %s"
                % (
                    job.id,
                    file_name == allocated[node],
                    digest == digests[file_name],
                    not exists,
                )
            )
        else:
            print("job %s failed: %s" % (job.id, job.exception))
    print("files given to nodes: %s" % sorted(allocated.values()))
    cluster.close()
