"""Time a notebook Stop of a huge run: ``--jobs`` queued jobs (default 200,000) on
one local node with 2 CPUs, each a long sleep, so that all but two wait in the
client's queue; then `Run.stop` (what the Stop button does) until every job has
ended: its wall time, and the client's CPU time (all its threads), which other
load on the machine changes less. Also the submit rate of the same jobs, and what the
JupyterLab panel spends on each state it pushes while they wait::

    PYTHONPATH=$PWD .venv/bin/python bench/stop.py
    PYTHONPATH=$PWD .venv/bin/python bench/stop.py --jobs 50000 --callback

``--callback`` adds a user ``job_status`` callback that counts the ends it sees
(it must see every job end once). Not a test: numbers, printed.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter.run import Run
from dispynb.local import LocalCluster


def nap(x: int) -> int:
    """A job that runs until it is stopped."""
    import time

    time.sleep(600)
    return x


def _panel_state_ms(cluster: object) -> float:
    """CPU milliseconds the JupyterLab panel spends on one state of ``cluster``
    (`dispynb.jupyter.labcomm.LabLink.state`, up to 4 a second while it changes)."""
    from dispynb.jupyter.labcomm import ClusterTracker, Discovered, LabLink

    tracker = ClusterTracker(lambda: [cluster])
    link = LabLink(
        lambda *args: None,
        tracker=tracker,
        discovered=Discovered(),
        session=lambda: {"kind": "", "nodes": []},
        interval=3600,
    )
    try:
        tracker.refresh()
        start = time.thread_time()
        for _ in range(5):
            link.state()
        return (time.thread_time() - start) / 5 * 1000
    finally:
        link.close(wait=False)
        tracker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--callback", action="store_true")
    args = parser.parse_args()
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen[job.status.name] += 1

    with LocalCluster(nodes=1, cpus=2) as nodes:
        start, submit_cpu = time.perf_counter(), time.process_time()
        run = Run.map(
            nap,
            range(args.jobs),
            nodes=nodes,
            wait=False,
            progress="none",
            job_status=job_status if args.callback else None,
        )
        submitted = time.perf_counter()
        # The callback thread's share too (the Created events, if any).
        run.cluster._callbacks.flush()
        submit_cpu = time.process_time() - submit_cpu
        while sum(job.status is JobStatus.Running for job in run.jobs) < 2:
            time.sleep(0.05)
        panel_ms = _panel_state_ms(run.cluster)
        stop, cpu = time.perf_counter(), time.process_time()
        summary = run.stop(echo=False, quiet=True)
        stopped, cpu = time.perf_counter(), time.process_time() - cpu
        ends = collections.Counter(job.status.name for job in run.jobs)
        print(
            f"submit: {args.jobs} jobs in {submitted - start:.2f} s, client CPU "
            f"{submit_cpu / args.jobs * 1e6:.1f} us/job (cluster start included)"
        )
        print(f"stop: {stopped - stop:.2f} s, client CPU {cpu:.2f} s ({summary})")
        print(f"ends: {dict(ends)}")
        print(f"lab panel: {panel_ms:.1f} ms of CPU per state pushed, jobs queued")
        if args.callback:
            run.wait()  # the callbacks of the last ends
            print(f"job_status saw: {dict(seen)}")


if __name__ == "__main__":
    main()
