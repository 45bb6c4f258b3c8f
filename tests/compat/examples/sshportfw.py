# dispy's py3/examples/sshportfw.py (github.com/pgiri/dispy at 5e136ee, Copyright (c) 2012
# Giridhar Pemmasani, Apache License 2.0: http://www.apache.org/licenses/LICENSE-2.0),
# run by tests/compat/test_examples.py. Changed as a dispy user would, each change
# marked "# dispynb:" below:
# - `import dispy` became `import dispynb as dispy`
# - nodes: the test's node on 127.0.0.1, where the example names its EC2 node; the test
#   relays a port to the node as `ssh -L` would, where dispy needs `ssh -R` (dispynb's
#   nodes never connect back to the client: see the migration guide)
# - jobs sleep n/10 s, not n s (the test's time)

def compute(n): # function sent to remote nodes for execution
    time.sleep(n / 10)  # dispynb: was n s
    return n

if __name__ == '__main__':
    import dispynb as dispy  # dispynb: the import
    # list remote nodes (here Amazon EC2 instance with external IP 54.172.166.83)
    nodes = ['54.172.166.83']
    nodes = __import__("os").environ["DISPYNB_TEST_NODES"].split(",")  # dispynb: the forwarded port
    # use ssh to forward port 61590 for each node; e.g.,
    # 'ssh -R 61590:localhost:61590 54.172.166.83'

    # start dispynode with 'dispynode.py --ext_host 54.172.166.83' (so dispynode
    # uses external IP address instead of default local IP address); do this for all nodes
    cluster = dispy.JobCluster(compute, nodes=nodes, ip_addr='127.0.0.1')
    jobs = []
    for i in range(1, 7):
        job = cluster.submit(i)
        jobs.append(job)
    for job in jobs:
        print('result: %s' % job())
