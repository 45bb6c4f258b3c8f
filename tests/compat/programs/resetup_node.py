"""dispy's examples/replace_inmem.py: `resetup_node` swaps a node's in-memory data.

resetup_node closes the computation on the node without releasing it, calls
NodeAllocate.allocate again (new setup_args and depends) and runs setup again.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def setup(data_file, generation):  # executed on the node
    global data, file_name, gen
    import os

    with open(data_file) as fd:
        data = fd.read()  # read the data in the file into a global variable
    os.remove(data_file)  # data_file can now be deleted
    file_name, gen = data_file, generation
    return 0


def cleanup(data_file, generation):
    global data, file_name, gen
    del data, file_name, gen


def compute(i):  # executed on nodes
    return (file_name, gen, data.strip())


def cluster_status(status, node, job):  # executed at the client
    if status == dispy.DispyNode.Initialized:
        with cond:
            initialized.append(node)
            cond.notify()
    elif status == dispy.DispyNode.Closed:
        closed.append(node)


if __name__ == "__main__":
    data_files = ["first.txt", "second.txt"]
    for name in data_files:
        with open(name, "w") as fd:
            fd.write("contents of %s\n" % name)
    generation = 0

    class NodeAllocate(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            global generation
            data_file = data_files[generation % len(data_files)]
            generation += 1
            # files are saved on the node in the computation's directory
            self.setup_args = (data_file, generation)
            self.depends = [data_file]
            return cpus

    cond = threading.Condition()
    initialized, closed = [], []
    host, port = NODES[0].rsplit(":", 1)
    cluster = dispy.JobCluster(
        compute,
        nodes=[NodeAllocate(host, port=int(port))],
        setup=setup,
        cleanup=cleanup,
        cluster_status=cluster_status,
    )
    jobs = [cluster.submit(i) for i in range(3)]
    print("before resetup: %s" % sorted(set(job() for job in jobs)))
    with cond:
        cond.wait_for(lambda: len(initialized) == 1, timeout=10)
    print("resetup_node: %s" % cluster.resetup_node(initialized[0]))
    print("nodes as it is set up again: %s" % len(cluster.status().nodes))
    with cond:
        cond.wait_for(lambda: len(initialized) == 2, timeout=10)
        print("initialized again: %s" % (len(initialized) == 2))
    jobs = [cluster.submit(i) for i in range(3)]
    print("after resetup: %s" % sorted(set(job() for job in jobs)))
    print("Closed before close: %s" % len(closed))
    cluster.close()
    print("Closed after close: %s" % len(closed))
