"""A program that shows a cluster in a web monitor, as a user's script does.

``python -m tests.httpd.monitor_process POLL_SEC``: one local node, one cluster, a
`DispyHTTPServer` on a free port of 127.0.0.1. Prints ``{"port", "token"}`` as one
JSON line, logs to stderr, and stops when its standard input closes.
"""

from __future__ import annotations

import json
import logging
import sys

from dispynb import JobCluster, LocalCluster
from dispynb.httpd import DispyHTTPServer
from tests import jobs


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    poll_sec = float(sys.argv[1])
    with (
        LocalCluster(cpus=1) as local,
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
    ):
        server = DispyHTTPServer(cluster, port=0, poll_sec=poll_sec)
        print(json.dumps({"port": server.port, "token": server.token}), flush=True)
        sys.stdin.read()
        server.shutdown(wait=False)


if __name__ == "__main__":
    main()
