"""dispy bugs that dispynb fixes (reference 8.3 and 8.4), seen from a dispy program.

dispy leaves a job Running forever for an unpicklable result or a lambda computation,
cancels an unpicklable argument silently, calls a bound method without self, swallows
exceptions in `with JobCluster(...)`, and its `recover_jobs` raises KeyError. dispynb
gives a clear error or just works, and never leaves a job stuck.
"""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import threading

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(kind):  # executed on nodes
    import threading

    if kind == "lock":
        return threading.Lock()  # cannot be pickled
    return kind


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return self.factor * x


def try_computation(title, computation, arg):
    try:
        cluster = dispy.JobCluster(computation, nodes=NODES)
    except Exception as exc:
        print("%s: refused: %s" % (title, type(exc).__name__))
        return
    job = cluster.submit(arg)
    result = job()
    if job.status == dispy.DispyJob.Finished:
        print("%s: works: %s" % (title, result))
    else:
        print("%s: status %s: %s" % (title, job.status, job.exception))
    cluster.close()


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    job = cluster.submit("lock")
    job()  # never stuck in Running
    print(
        "unpicklable result: status %s, exception names the type: %s"
        % (job.status, "lock" in (job.exception or "").lower())
    )
    try:
        job = cluster.submit(threading.Lock())
    except Exception as exc:
        print(
            "unpicklable argument: error %s, names the type: %s"
            % (type(exc).__name__, "lock" in str(exc).lower())
        )
    else:
        job()
        print(
            "unpicklable argument: status %s, explained: %s"
            % (job.status, bool(job.exception))
        )
    cluster.close()

    try_computation("lambda", lambda x: x * 2, 21)
    try_computation("bound method", Scaler(3).scale, 14)

    try:
        with dispy.JobCluster(compute, nodes=NODES) as cluster:
            raise KeyError("raised in the with block")
    except KeyError:
        print("exception in with block propagates: True")
    else:
        print("exception in with block propagates: False")
    print(
        "recover_jobs is callable: %s" % callable(getattr(dispy, "recover_jobs", None))
    )
