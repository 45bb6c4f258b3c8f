# dispy's py3/examples/node_update.py (github.com/pgiri/dispy at 5e136ee, Copyright (c) 2012
# Giridhar Pemmasani, Apache License 2.0: http://www.apache.org/licenses/LICENSE-2.0),
# run by tests/compat/test_examples.py. Changed as a dispy user would, each change
# marked "# dispynb:" below:
# - `import dispy` became `import dispynb as dispy`
# - nodes=NODES: the test's nodes on 127.0.0.1 (DISPYNB_TEST_NODES), where dispy's
#   example discovers its nodes (the test runs no discovery on a shared host)

# Example to illustrate using dispy to run given program on all nodes, e.g., to install / update
# software. The program 'node_update_script.py' in this example runs once on a node, not on all
# CPUs.

# 'cluster_status' function is called by dispy (client) to indicate node / job status
# changes.
def cluster_status(status, node, job):
    global nodes
    if status == dispy.DispyNode.Initialized:
        print('Node %s with %s CPUs available' % (node.ip_addr, node.avail_cpus))
        nodes.add(node.ip_addr)
        if cluster.submit_node(node):
            pass
        else:
            print('Failed to submit job at %s' % node.ip_addr)

    elif status == dispy.DispyJob.Finished:
        if job.stderr or job.exception:
            print('Node %s failed: %s / %s' % (job.ip_addr, job.stderr, job.exception))
        else:
            print('Node %s finished with %s' % (job.ip_addr, job.stdout.decode()))

    elif status == dispy.DispyJob.Terminated:
        print('Node %s failed: %s' % (job.ip_addr, job.stderr))

if __name__ == '__main__':
    import sys, os, time, dispynb as dispy  # dispynb: the import
    NODES = __import__("os").environ["DISPYNB_TEST_NODES"].split(",")  # dispynb: the test's nodes

    # usage: sys.argv[0] [<path to program to run on nodes>] [<number of nodes>]
    if len(sys.argv) < 2:
        script = os.path.join(os.path.dirname(sys.argv[0]), 'node_update_script.py')
    else:
        script = sys.argv[1]

    assert os.path.isfile(script)
    if len(sys.argv) > 2:
        num_nodes = int(sys.argv[2])
    else:
        num_nodes = 1

    nodes = set()
    cluster = dispy.JobCluster(script, cluster_status=cluster_status, nodes=NODES)
    while 1:
        # wait a bit for all nodes to be discovered
        time.sleep(5)
        if len(nodes) >= num_nodes:
            break
        cluster.discover_nodes(['*'])
    cluster.wait()
    cluster.print_status()
    cluster.close()
