"""A Python program as the computation, with a data file in depends.

dispy runs a `.py` computation with the node's Python: arguments become sys.argv, the
exit code is the result, and a traceback goes to stderr (bytes) with exit code 1.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


if __name__ == "__main__":
    cluster = dispy.JobCluster("wordfreq.py", nodes=NODES, depends=["words.txt"])
    print("cluster name: %s" % cluster.name)
    jobs = []
    for word in ("the", "cat", "zebra"):
        jobs.append(cluster.submit("words.txt", word))
    jobs.append(cluster.submit("missing.txt", "the"))
    for job in jobs:
        count = job()
        print("job %s: status %s, result %s" % (job.id, job.status, count))
        for line in job.stdout.decode().splitlines():
            print("  out: %s" % line)
        if job.stderr:
            print("  err: %s" % job.stderr.decode().strip().splitlines()[-1])
    cluster.close()
