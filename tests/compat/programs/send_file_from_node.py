"""`dispy_send_file` on the node: the client saves the file under its own working
directory, at the same path relative to the job's directory.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import os

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    import os

    os.makedirs("outdir", exist_ok=True)
    path = os.path.join("outdir", "result%d.txt" % n)
    with open(path, "w") as fd:
        fd.write("result %d from %s\n" % (n, dispy_node_name))
    sent = dispy_send_file(path)
    # an absolute path inside the job's directory is sent relative to it
    path = os.path.join(dispy_job_path, "outdir", "abs%d.txt" % n)
    with open(path, "w") as fd:
        fd.write("absolute %d\n" % n)
    return (sent, dispy_send_file(path))


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    jobs = [cluster.submit(n) for n in range(3)]
    for n, job in enumerate(jobs):
        print("job %s: dispy_send_file returned %s" % (job.id, job()))
        for name in ("result%d.txt" % n, "abs%d.txt" % n):
            path = os.path.join("outdir", name)
            if os.path.isfile(path):
                with open(path) as fd:
                    print("  %s: %s" % (path, fd.read().strip()))
            else:
                print("  %s: missing" % path)
    cluster.close()
