"""dispy's module-level API: exported names, status numbers, `dispy.logger` levels.

dispy's examples pass `loglevel=dispy.logger.DEBUG` and log with `dispy.logger.info`.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return n + 1


if __name__ == "__main__":
    for name in (
        "logger",
        "JobCluster",
        "DispyJob",
        "DispyNode",
        "NodeAllocate",
        "DispyNodeAvailInfo",
        "recover_jobs",
    ):
        print("dispy.%s: %s" % (name, hasattr(dispy, name)))
    job_statuses = (
        "Created",
        "Running",
        "ProvisionalResult",
        "Cancelled",
        "Terminated",
        "Abandoned",
        "Finished",
    )
    print(
        "DispyJob: %s"
        % ", ".join(
            "%s=%s" % (name, getattr(dispy.DispyJob, name)) for name in job_statuses
        )
    )
    print(
        "DispyNode: %s"
        % ", ".join(
            "%s=%s" % (name, getattr(dispy.DispyNode, name))
            for name in ("Initialized", "Closed", "AvailInfo")
        )
    )
    levels = [
        dispy.logger.DEBUG,
        dispy.logger.INFO,
        dispy.logger.WARNING,
        dispy.logger.ERROR,
        dispy.logger.CRITICAL,
    ]
    print("logger levels are increasing: %s" % (levels == sorted(set(levels))))
    cluster = dispy.JobCluster(compute, nodes=NODES, loglevel=dispy.logger.WARNING)
    dispy.logger.debug("not shown at level WARNING")
    dispy.logger.info("not shown at level WARNING")
    dispy.logger.warning("shown at level WARNING")
    job = cluster.submit(41)
    print("job %s: %s" % (job.id, job()))
    # dispy's statuses are plain ints, also inside containers
    statuses = [dispy.DispyJob.Created, job.status, dispy.DispyNode.Initialized]
    print("statuses in a list: %s" % statuses)
    cluster.close()
