"""A dispy program that sets up logging with `logging.config.dictConfig` after
making its cluster, naming the dispynb logger for its level only, as a program
does to set a library's level. Its root handler shows dispynb's lines, as it
does for any library whose logger the configuration names without `propagate`."""

import dispynb as dispy  # the only change from dispy: this line was `import dispy`
import logging.config

# The test's only addition: the nodes the test started (dispy would discover them).
from os import environ

NODES = environ["DISPYNB_TEST_NODES"].split(",")


def compute(n):  # executed on nodes
    return n + 3


if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=NODES)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"root": {"format": "root|%(levelname)s|%(message)s"}},
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "root"}
            },
            "root": {"handlers": ["stderr"], "level": "WARNING"},
            "loggers": {"dispynb": {"level": "INFO"}},
        }
    )
    dispy.logger.info("info after dictConfig")
    dispy.logger.debug("debug below the level")
    job = cluster.submit(4)
    dispy.logger.info("job %s submitted", job.id)
    print("result: %s" % job())
    cluster.close()
