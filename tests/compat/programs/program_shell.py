"""Program computations (dispy's node_update.py): a shell script, and a name on PATH.

The job's arguments become command-line arguments (as strings), stdout and stderr are
bytes, the result is the exit code (non-zero is still Finished), and dispy's node
values reach the program as environment variables.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


if __name__ == "__main__":
    cluster = dispy.JobCluster("count.sh", nodes=NODES)
    print("cluster name: %s" % cluster.name)
    jobs = []
    for i, code in enumerate([0, 3, 7]):
        job = cluster.submit("item%d" % i, code)
        jobs.append(job)
    for job in jobs:
        exit_code = job()
        print("job %s: status %s, result %s" % (job.id, job.status, exit_code))
        print(
            "  stdout and stderr are bytes: %s"
            % (isinstance(job.stdout, bytes) and isinstance(job.stderr, bytes))
        )
        for line in job.stdout.decode().splitlines():
            print("  out: %s" % line)
        print("  err: %r" % job.stderr)
    cluster.close()

    # a program found on PATH is sent to the node and run there
    cluster = dispy.JobCluster("echo", nodes=NODES)
    job = cluster.submit("hello", 42)
    print("echo: result %s, stdout %r" % (job(), job.stdout))
    cluster.close()
