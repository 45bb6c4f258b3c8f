# dispy's py3/examples/httpd_example.py (github.com/pgiri/dispy at 5e136ee, Copyright (c) 2012
# Giridhar Pemmasani, Apache License 2.0: http://www.apache.org/licenses/LICENSE-2.0),
# run by tests/compat/test_examples.py. Changed as a dispy user would, each change
# marked "# dispynb:" below:
# - `import dispy` became `import dispynb as dispy`
# - `import dispy.httpd` became `import dispynb.httpd` (the migration guide's line)
# - nodes=NODES: the test's nodes on 127.0.0.1 (DISPYNB_TEST_NODES), where dispy's
#   example discovers its nodes (the test runs no discovery on a shared host)
# - port=0 (a free port; dispy's 8181 may be taken where the test runs)
# - jobs sleep 1-2 s, not 5-20 s (the test's time)

#!/usr/bin/env python

# example to create http server so cluster can be monitored / managed
# with a web browser

# program sends object instances in local program as arguments to
# distributed computation
class C(object):
    def __init__(self, s, i):
        self.s = s
        self.i = i
    # provide __str__ so instances of C are shown with useful info
    # when monitoring jobs in 'Node' page
    def __str__(self):
        return 'C(%s, %.4f)' % (self.s, self.i)

def compute(obj, n=5):
    # obj is an instance of C
    import time
    time.sleep(n)
    return n * obj.i

if __name__ == '__main__':
    import dispynb as dispy, random  # dispynb: the import
    NODES = __import__("os").environ["DISPYNB_TEST_NODES"].split(",")  # dispynb: the test's nodes

    # create cluster
    cluster = dispy.JobCluster(compute, depends=[C], nodes=NODES)

    # import dispy's httpd module, create http server
    import dispynb.httpd  # dispynb: was `import dispy.httpd`
    http_server = dispy.httpd.DispyHTTPServer(cluster, port=0)  # dispynb: port

    # cluster can now be monitored / managed in web browser at
    # http://<host>:8181 where <host> is name or IP address of
    # computer running this program

    for i in range(8):
        c = C(str(i), random.uniform(1, 9))
        job = cluster.submit(c, n=random.randint(1, 2))  # dispynb: was 5-20 s

    cluster.wait() # wait for all jobs to finish
    http_server.shutdown() # this waits until browser gets all updates
    cluster.close()
