"""A client process for `tests.deploy.test_orphan_exit`.

It launches one node the way a batch system would (the test starts the node, not
this process: killing this process cannot take the node with it), uses it for a
cluster, then does what the mode says:

- ``kill``: report ``READY`` and wait to be killed;
- ``idle SECONDS``: stay connected but idle for SECONDS, run one more job, report
  ``AFTER-IDLE``, close the cluster, wait SECONDS more (the launcher open), report
  ``CLUSTER-CLOSED``, close the launcher (not the node) and report ``CLOSED``;
- ``no-cluster SECONDS``: never use the node: report ``READY`` once it registered,
  ``WAITED N`` SECONDS later (N: registrations reported), and wait to be killed.

``python -m tests.deploy.orphan_client SECRET MODE [SECONDS]``; it prints
``LAUNCH NAME HOST:PORT`` for the test to start the node with.
"""

from __future__ import annotations

import sys
import threading
import time

from dispynb import JobCluster
from dispynb.deploy import NodeLauncher


class Outside(NodeLauncher[str]):
    """Nodes started by someone else (the test), as SLURM starts batch jobs."""

    async def _register_to(self, index: int) -> str:
        return "127.0.0.1"

    async def _launch(self, index: int, name: str, register_to: str) -> str:
        print("LAUNCH", name, register_to, flush=True)
        return name

    async def _stop(self, handle: str) -> None:
        pass  # the test owns the node

    def _exit_reason(self, handle: str) -> str | None:
        return None


def square(x: int) -> int:
    return x * x


def main(argv: list[str]) -> None:
    secret, mode = argv[0], argv[1]
    nodes = Outside(secret=secret, register_host="127.0.0.1")
    nodes.start(1)
    if mode == "no-cluster":
        nodes.wait_for(1, timeout=30)
        print("READY", flush=True)
        time.sleep(float(argv[2]))  # a launcher no cluster uses (yet)
        registered = [e for e in nodes.events if e.action == "registered"]
        print("WAITED", len(registered), flush=True)  # checks did not re-report it
        threading.Event().wait()
    cluster = JobCluster(square, nodes=nodes)
    assert cluster.submit(3)() == 9
    if mode == "kill":
        print("READY", flush=True)
        threading.Event().wait()
    time.sleep(float(argv[2]))  # the idle client the scenario is about
    assert cluster.submit(4)() == 16
    print("AFTER-IDLE", flush=True)
    cluster.close()
    time.sleep(float(argv[2]))  # the launcher, open, keeps its node
    print("CLUSTER-CLOSED", flush=True)
    nodes.close()
    print("CLOSED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
