# dispy's py3/examples/obj_instances.py (github.com/pgiri/dispy at 5e136ee, Copyright (c) 2012
# Giridhar Pemmasani, Apache License 2.0: http://www.apache.org/licenses/LICENSE-2.0),
# run by tests/compat/test_examples.py. Changed as a dispy user would, each change
# marked "# dispynb:" below:
# - `import dispy` became `import dispynb as dispy`
# - nodes=NODES: the test's nodes on 127.0.0.1 (DISPYNB_TEST_NODES), where dispy's
#   example discovers its nodes (the test runs no discovery on a shared host)

# example program that sends object instances in local program
# as arguments to distributed computation
class C:
    def __init__(self, i, n):
        self.i = i
        self.n = n

    def show(self):
        print('%s: %.2f' % (self.i, self.n))

def compute(obj):
    # obj is an instance of C
    import time
    time.sleep(obj.n)
    obj.show()
    return obj.n

if __name__ == '__main__':
    import random, dispynb as dispy  # dispynb: the import
    NODES = __import__("os").environ["DISPYNB_TEST_NODES"].split(",")  # dispynb: the test's nodes
    cluster = dispy.JobCluster(compute, depends=[C], nodes=NODES)
    jobs = []
    for i in range(10):
        c = C(i, random.uniform(1, 3)) # create object of C
        job = cluster.submit(c) # it is sent to a node for executing 'compute'
        job.id = c # store this object for later use
        jobs.append(job)
    for job in jobs:
        job() # wait for job to finish
        print('%s: %.2f / %s' % (job.id.i, job.result, job.stdout))
