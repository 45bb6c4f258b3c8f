"""W1-style timing of ``fresh_process`` (issue 11 item 5): tiny jobs, both modes.

    PYTHONPATH=$PWD .venv/bin/python bench/fresh_process.py [--jobs 3000] [--rounds 2]

Starts one LocalCluster (CPUs: the machine's), then for each round runs ``--jobs``
trivial jobs with reused workers and with ``fresh_process=True``, back to back, and
prints jobs per second for each. Loopback only. A quick check for the figures in
docs/explanation/fault-tolerance.md when the full benchmark (bench/run.py) cannot
run on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

from dispynb import JobCluster, LocalCluster

MAX_PIDS: int | None = 1024


def tiny(x: int) -> int:
    return x + 1


def rate(local: LocalCluster, jobs: int, fresh: bool) -> float:
    with JobCluster(
        tiny, nodes=local, fresh_process=fresh, max_pids=MAX_PIDS
    ) as cluster:
        cluster.submit(0)()  # connected and set up: not timed
        started = time.perf_counter()
        submitted = [cluster.submit(i) for i in range(jobs)]
        for job in submitted:
            job()
        return jobs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with LocalCluster() as local:
        for round_ in range(args.rounds):
            reused = rate(local, args.jobs, fresh=False)
            fresh = rate(local, args.jobs, fresh=True)
            print(
                f"round {round_ + 1}: reused workers {reused:,.0f} jobs/s, "
                f"fresh_process {fresh:,.0f} jobs/s ({reused / fresh:.1f}x)"
            )


if __name__ == "__main__":
    main()
