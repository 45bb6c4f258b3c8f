"""A client process that receives one large result and reports memory figures.

``python -m tests.hostile.large_result_client KIND MIB MAX_MESSAGE_MIB`` prints one
JSON line: the node's RSS before and at its peak, this process's peak RSS before and
after, and whether the result arrived intact. Run as its own process so that its
peak RSS (``ru_maxrss``) is this transfer's alone.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

import psutil

from dispynb import DispyJob, JobCluster, LocalCluster

MiB = 1 << 20


def make(kind: str, size: int) -> object:
    return bytes(size) if kind == "bytes" else bytearray(size)


def main() -> None:
    kind, size, max_message = sys.argv[1], int(sys.argv[2]) * MiB, int(sys.argv[3])
    with LocalCluster(cpus=1) as local:
        node = psutil.Process(local.pids[0])
        peak = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], node.memory_info().rss)
                time.sleep(0.005)

        with JobCluster(make, nodes=local, max_message_size=max_message * MiB) as c:
            c.submit("bytes", 1)()
            node_before = node.memory_info().rss
            me_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            watcher = threading.Thread(target=watch)
            watcher.start()
            job = c.submit(kind, size)
            result = job()
            stop.set()
            watcher.join()
            intact = (
                job.status == DispyJob.Finished
                and type(result).__name__ == kind
                and len(result) == size  # type: ignore[arg-type]
            )
            del result
            print(
                json.dumps(
                    {
                        "node_before": node_before,
                        "node_peak": peak[0],
                        "client_before": me_before,
                        "client_peak": resource.getrusage(
                            resource.RUSAGE_SELF
                        ).ru_maxrss
                        * 1024,
                        "intact": intact,
                        "exception": job.exception,
                    }
                )
            )


if __name__ == "__main__":
    main()
