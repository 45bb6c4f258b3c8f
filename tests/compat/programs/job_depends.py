"""Per-job files with `dispy_job_depends` (dispy's examples/job_scheduler.py).

Each job gets its own data file, which lands in the computation's directory on the node
for that job only: the node removes it when the job ends.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import hashlib

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(path):  # executed on nodes
    import glob
    import hashlib
    import os

    if path is None:  # report the job files left in the computation's directory
        return sorted(glob.glob("data*"))
    with open(os.path.basename(path), "rb") as fd:
        return hashlib.sha1(fd.read()).hexdigest()


if __name__ == "__main__":
    data_files = []
    for i in range(8):
        data_file = "data%03d" % i
        with open(data_file, "wb") as fd:
            fd.write(b"data file %d\n" % i * (i + 1))
        data_files.append(data_file)
    cluster = dispy.JobCluster(compute, nodes=NODES)
    jobs = []
    for data_file in data_files:
        # 'dispy_job_depends' is consumed by dispy: 'compute' gets only 'data_file'
        job = cluster.submit(data_file, dispy_job_depends=[data_file])
        job.id = data_file
        jobs.append(job)
    for job in jobs:
        job()
        with open(job.id, "rb") as fd:
            expected = hashlib.sha1(fd.read()).hexdigest()
        if job.status == dispy.DispyJob.Finished:
            print("%s: %s" % (job.id, "ok" if job.result == expected else job.result))
        else:
            print("%s: status %s: %s" % (job.id, job.status, job.exception))
    cluster.wait()
    leftovers = set()
    for job in [cluster.submit(None) for _ in range(4)]:
        leftovers.update(job())
    print("job files left on nodes: %s" % sorted(leftovers))
    cluster.close()
