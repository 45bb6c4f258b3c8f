"""Jobs that search until they are cancelled, then return their best value, written
for dispynb's tests after the idea of dispy's longrun example (not its code).

``cluster_status`` fills each node's CPUs with jobs as the node is set up (a
``NodeAllocate`` subclass takes at most 2 CPUs of each); a job sends its best value
so far as a provisional result now and then, and stops when it is cancelled: the
``KeyboardInterrupt`` the node raises in it ends its loop and it returns its best.
Type ``quit`` (or ``exit``, or press Ctrl-C) to cancel them and see the best value.
A provisional result within the margin given as the argument (default 0.01) of 1.0
stops the program as Ctrl-C does; 0 never does.
"""

import os
import sys

import dispynb as dispy  # a dispy program would say: import dispy

running = set()
close_enough = float(sys.argv[1]) if len(sys.argv) > 1 else 0.01


def compute():
    import random
    import time

    best, reported = 0.0, 0.0
    while True:
        try:
            value = random.uniform(0, 1)
            if value > best:
                best = value
                if time.time() - reported > 10:  # at most every 10 s
                    dispy_provisional_result(best)
                    reported = time.time()
            time.sleep(2)  # a step of the search
        except KeyboardInterrupt:  # cancelled: the best so far is the result
            return best


class AtMostTwo(dispy.NodeAllocate):
    """Each node's CPUs, at most 2 of them."""

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        print("allocating %s on %s (%s), %s CPUs" % (cluster.name, ip_addr, name, cpus))
        return min(cpus, 2)


def cluster_status(status, node, job):
    if status == dispy.DispyNode.Initialized:
        print("node %s set up with %s CPUs" % (node.ip_addr, node.cpus))
        for _ in range(node.cpus):
            job = cluster.submit_node(node)
            if isinstance(job, dispy.DispyJob):
                running.add(job)
            else:
                print("no job could be submitted to %s" % node.ip_addr)
    elif status == dispy.DispyJob.ProvisionalResult and 1.0 - job.result < close_enough:
        import signal

        os.kill(os.getpid(), signal.SIGINT)  # close enough: stop as Ctrl-C does
    elif status == dispy.DispyJob.Abandoned:
        print("job on %s lost: %s" % (job.ip_addr, job.exception))
        running.discard(job)


if __name__ == "__main__":
    nodes = [  # the test's nodes, each with the allocation above
        AtMostTwo(host=spec.rsplit(":", 1)[0], port=int(spec.rsplit(":", 1)[1]))
        for spec in os.environ["DISPYNB_TEST_NODES"].split(",")
    ]
    cluster = dispy.JobCluster(compute, nodes=nodes, cluster_status=cluster_status)
    try:
        while input(
            "Type quit (or exit, or press Ctrl-C) to stop: "
        ).strip().lower() not in (
            "quit",
            "exit",
        ):
            pass
    except (KeyboardInterrupt, EOFError):
        pass
    for job in running:
        cluster.cancel(job)
    best = 0.0
    for job in running:
        value = job()
        if job.status == dispy.DispyJob.Finished:
            print("job on %s returned %s" % (job.ip_addr, value))
            best = max(best, value)
    print("best value found: %s" % best)
    cluster.print_status()
    cluster.close()
    sys.exit(0)
