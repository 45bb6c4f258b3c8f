"""A client whose /dev/shm is too small, or filled by another program, for its jobs.

``python -m tests.hostile.shm_full_client small|filled``, run in a mount namespace
whose /dev/shm is a small tmpfs (`tests.hostile.test_shm_full`), runs jobs with 10
MB arguments and results on a LocalCluster and prints one JSON line: per job whether
it finished with the right result, its size and the bytes the client received
while it ran.

- ``small``: /dev/shm cannot hold one job's arguments (nor its result).
- ``filled``: a first job's arguments (9.6 MB) fit, and leave an idle segment of 10
  MiB whose last pages were never allocated; another program then fills /dev/shm;
  the next job's arguments (10.4 MB) go into that segment (through its mapping, where
  a page the tmpfs cannot give is SIGBUS); then a new cluster's job whose arguments
  (2 MB) fit and whose result (12 MB) does not.
- ``neighbour``: another program holds half of a 32 MiB /dev/shm; a job's 13 MB
  arguments and result would fit, but leave less than dispynb keeps free for others
  (`dispynb.protocol.shm.check_room`: a full tmpfs is SIGBUS for whoever writes
  through a mapping next); a later job of 2 MB still goes through /dev/shm.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from dispynb import DispyJob, JobCluster, LocalCluster

FILLER = Path("/dev/shm/filler")


def times(data: bytes, n: int) -> bytes:
    return data * n


def hold(size: int) -> None:
    """Another program keeps ``size`` bytes of /dev/shm."""
    with open(FILLER, "wb", buffering=0) as handle:
        handle.write(b"\0" * size)


def fill() -> None:
    """Another program takes what is left of /dev/shm (to the last page)."""
    with open(FILLER, "ab", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass  # full


def run(
    cluster: JobCluster, size: int, n: int, socket: bool = True
) -> dict[str, object]:
    """One job: ``size`` random bytes in, ``n`` times them out; ``socket``: its
    result should come over the connection (/dev/shm cannot hold it)."""
    data = os.urandom(size)
    before = sum(node.rx for node in cluster.status().nodes)
    job = cluster.submit(data, n)
    result = job()
    return {
        "result": size * n,
        "finished": job.status == DispyJob.Finished,
        "exception": job.exception,
        "right": isinstance(result, bytes)
        and hashlib.sha256(result).digest() == hashlib.sha256(data * n).digest(),
        "received": sum(node.rx for node in cluster.status().nodes) - before,
        "socket": socket,
    }


def main() -> None:
    mode = sys.argv[1]
    jobs = []
    with LocalCluster(cpus=1) as local:
        with JobCluster(times, nodes=local) as cluster:
            if mode == "small":
                jobs += [run(cluster, 10_000_000, 1) for _ in range(3)]
            elif mode == "neighbour":
                hold(16 * 1024 * 1024)
                jobs += [run(cluster, 13_000_000, 1) for _ in range(2)]
                # What fits with room to spare still goes through /dev/shm.
                jobs.append(run(cluster, 2_000_000, 1, socket=False))
            else:
                jobs.append(run(cluster, 9_600_000, 0))
                fill()
                jobs.append(run(cluster, 10_400_000, 1))
        if mode == "filled":
            with JobCluster(times, nodes=local) as cluster:
                jobs.append(run(cluster, 2_000_000, 6))
    FILLER.unlink(missing_ok=True)
    print(json.dumps(jobs), flush=True)


if __name__ == "__main__":
    main()
