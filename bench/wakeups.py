"""Count what one round trip costs in wake-ups and system calls (issue 17, W2/W1).

Not a benchmark of time: it counts, per job, the context switches of every process
(and thread) on the path, and optionally their system calls (``strace -c``), for
dispynb (one `LocalCluster` node, as the benchmark's ``dispynb`` row; the same node
behind ``dispynb-scheduler``, the ``dispynb-scheduler`` row) and for
``ProcessPoolExecutor`` (the ``ppe`` row)::

    PYTHONPATH=$PWD .venv/bin/python bench/wakeups.py --backend dispynb --trips 1000
    PYTHONPATH=$PWD .venv/bin/python bench/wakeups.py --backend ppe --strace
    PYTHONPATH=$PWD .venv/bin/python bench/wakeups.py --backend dispynb-scheduler
    PYTHONPATH=$PWD .venv/bin/python bench/wakeups.py --backend dispynb --burst 2000

``--trips`` sequential round trips (W2's pattern); ``--burst N`` submits N jobs at
once and waits for all (W1's). Context switches come from
``/proc/PID/task/TID/status`` before and after; ``--strace`` attaches one
``strace -f -c`` per process after the warm-up and detaches it after the measured
jobs (strace slows everything down: counts only, never times, from that mode).
CPU time per job is the kernel scheduler's own count (``/proc/PID/task/TID/
schedstat``, in ns; "user" is the tick-sampled part in user mode), and each
process's line says which CPU it ran on last and how often it moved: on a small
machine the processes of a round trip settle on CPUs, and where each lands
changes what it costs (issue 16: behind the scheduler, the four processes settle
on alternate CPUs, and the worker, woken across CPUs instead of on its node
server's, costs about twice the CPU per job). ``--pin`` places them by hand after
the warm-up, to compare placements::

    PYTHONPATH=$PWD .venv/bin/python bench/wakeups.py --backend dispynb-scheduler \
        --pin client=1,scheduler=1,node=0,worker=0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def inc(x: int) -> int:
    """The trivial job of W1 and W2."""
    return x + 1


def _switches(pid: int) -> dict[str, tuple[int, int]]:
    """Voluntary and involuntary context switches of each thread (by name:tid)."""
    counts: dict[str, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return counts
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                fields = dict(
                    line.rstrip("\n").split(":\t", 1)
                    for line in status
                    if ":\t" in line
                )
        except FileNotFoundError:
            continue
        name = fields.get("Name", "?")
        counts[f"{name}:{tid}"] = (
            int(fields["voluntary_ctxt_switches"]),
            int(fields["nonvoluntary_ctxt_switches"]),
        )
    return counts


def _cpu(pid: int) -> tuple[float, float]:
    """Seconds of CPU (user, system) used by all threads of ``pid`` so far.

    In clock ticks (10 ms): a few thousand trips of a process that runs 50 us each
    are a few ticks, so the total is `_runtime`'s; this is for the user/system split.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _runtime(pid: int) -> tuple[float, int]:
    """Seconds on a CPU (the scheduler's own count, in ns) and migrations between
    CPUs of all threads of ``pid`` so far."""
    seconds, migrations = 0.0, 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return seconds, migrations
    gone = (FileNotFoundError, ProcessLookupError, ValueError, IndexError)
    for tid in tids:
        task = f"/proc/{pid}/task/{tid}"
        with contextlib.suppress(*gone), open(f"{task}/schedstat") as schedstat:
            seconds += int(schedstat.read().split()[0]) / 1e9
        with contextlib.suppress(*gone), open(f"{task}/sched") as sched:
            for line in sched:
                if line.startswith("se.nr_migrations"):
                    migrations += int(line.split(":")[1])
    return seconds, migrations


def _last_cpu(pid: int) -> str:
    """The CPU ``pid`` ran on last ("?" if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[36]
    except (FileNotFoundError, IndexError):
        return "?"


def _processes(root: int) -> dict[str, int]:
    """Label -> pid for ``root`` and its descendants."""
    me = psutil.Process(root)
    found = {"client": root}
    for child in me.children(recursive=True):
        try:
            if child.name() == "strace":
                continue
        except psutil.Error:
            continue
        found[f"{_role(child)}[{child.pid}]"] = child.pid
    return found


def _role(proc: psutil.Process) -> str:
    """A process's label: the scheduler and node servers by their module."""
    try:
        command = " ".join(proc.cmdline())
    except psutil.Error:
        command = ""
    for module in ("schedserver", "nodeserver"):
        if (
            f"-m {module}" in command
            or f"dispynb-{module[:-6]}" in command
            or f"{module}.cli" in command  # LocalCluster's bootstrap (dispynb.local)
        ):
            return module
    return proc.name()


def _pin(pids: dict[str, int], spec: str) -> None:
    """Bind each process named in ``spec`` ("client=0,scheduler=1,node=0,
    worker=1": node servers and computation processes are "node", processes
    running jobs "worker") to those CPUs, all of its threads."""
    cpus: dict[str, set[int]] = {}
    for item in spec.split(","):
        role, _, where = item.partition("=")
        cpus[role.strip()] = {int(cpu) for cpu in where.split("+")}
    for label, pid in pids.items():
        try:
            name = psutil.Process(pid).name()
        except psutil.Error:
            continue
        if label == "client":
            role = "client"
        elif label.startswith("schedserver"):
            role = "scheduler"
        else:
            role = "worker" if name == "dispynb-compute" else "node"
        if role not in cpus:
            continue
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus[role])


class _Strace:
    """One ``strace -f -c`` per process, attached now, detached by `stop`."""

    def __init__(self, pids: dict[str, int], directory: str) -> None:
        self.files: dict[str, str] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        # The client's tracer last: one attached to it earlier would follow the
        # others (its children) too.
        for label, pid in sorted(pids.items(), key=lambda item: item[0] == "client"):
            path = os.path.join(directory, f"strace-{pid}.txt")
            self.files[label] = path
            self._procs.append(
                subprocess.Popen(
                    ["strace", "-f", "-c", "-o", path, "-p", str(pid)],
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # attached (strace prints nothing to wait for)

    def stop(self) -> dict[str, list[tuple[str, int]]]:
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            proc.wait(timeout=30)
        summary: dict[str, list[tuple[str, int]]] = {}
        for label, path in self.files.items():
            rows: list[tuple[str, int]] = []
            with open(path) as out:
                for line in out:
                    parts = line.split()
                    if (
                        len(parts) >= 5
                        and parts[0][0].isdigit()
                        and parts[-1] != "total"
                    ):
                        calls = int(parts[3])
                        rows.append((parts[-1], calls))
            os.unlink(path)
            summary[label] = sorted(rows, key=lambda row: -row[1])
        return summary


def _dispynb(
    workers: int,
) -> Iterator[tuple[Callable[[int], Any], Callable[[list[int]], Any]]]:
    import dispynb

    with (
        dispynb.LocalCluster(nodes=1, cpus=workers) as local,
        dispynb.JobCluster(inc, nodes=local) as cluster,
    ):

        def trip(x: int) -> Any:
            return cluster.submit(x)()

        def burst(xs: list[int]) -> Any:
            jobs = [cluster.submit(x) for x in xs]
            return [job() for job in jobs]

        yield trip, burst


def _scheduler(
    workers: int,
) -> Iterator[tuple[Callable[[int], Any], Callable[[list[int]], Any]]]:
    """The benchmark's ``dispynb-scheduler`` row: the same node behind a
    ``dispynb-scheduler`` process (its hop is the difference)."""
    from sched_backend import DispynbSchedulerBackend

    backend = DispynbSchedulerBackend(workers)
    backend.start()
    try:

        def trip(x: int) -> Any:
            return backend.round_trip(inc, x)

        def burst(xs: list[int]) -> Any:
            return backend.submit_and_wait(inc, [(x,) for x in xs])

        yield trip, burst
    finally:
        backend.close()


def _ppe(
    workers: int,
) -> Iterator[tuple[Callable[[int], Any], Callable[[list[int]], Any]]]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:

        def trip(x: int) -> Any:
            return pool.submit(inc, x).result()

        def burst(xs: list[int]) -> Any:
            futures = [pool.submit(inc, x) for x in xs]
            return [f.result() for f in futures]

        yield trip, burst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=["dispynb", "dispynb-scheduler", "ppe"], default="dispynb"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=0, help="W1 pattern: N at once")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument(
        "--pin",
        default="",
        help="bind processes to CPUs after the warm-up, e.g. "
        "client=0,scheduler=1,node=0,worker=1 (CPUs joined with +)",
    )
    args = parser.parse_args()
    backends = {"dispynb": _dispynb, "dispynb-scheduler": _scheduler, "ppe": _ppe}
    for trip, burst in backends[args.backend](args.workers):
        jobs = args.burst or args.trips
        for i in range(200):  # warm-up: workers started, code paths hot
            trip(i)
        if args.burst:
            burst(list(range(args.burst)))
        pids = _processes(os.getpid())
        if args.pin:
            _pin(pids, args.pin)
        tracer = _Strace(pids, "/tmp") if args.strace else None
        before = {label: _switches(pid) for label, pid in pids.items()}
        cpu_before = {label: _cpu(pid) for label, pid in pids.items()}
        run_before = {label: _runtime(pid) for label, pid in pids.items()}
        start = time.perf_counter()
        if args.burst:
            assert burst(list(range(jobs))) == [i + 1 for i in range(jobs)]
        else:
            for i in range(jobs):
                assert trip(i) == i + 1
        elapsed = time.perf_counter() - start
        after = {label: _switches(pid) for label, pid in pids.items()}
        cpu_after = {label: _cpu(pid) for label, pid in pids.items()}
        run_after = {label: _runtime(pid) for label, pid in pids.items()}
        on_cpu = {label: _last_cpu(pid) for label, pid in pids.items()}
        user = {label: cpu_after[label][0] - cpu_before[label][0] for label in pids}
        cpu = {label: run_after[label][0] - run_before[label][0] for label in pids}
        moves = {label: run_after[label][1] - run_before[label][1] for label in pids}
        calls = tracer.stop() if tracer is not None else {}
        kind = f"burst of {jobs}" if args.burst else f"{jobs} round trips"
        print(f"{args.backend}: {kind}, {elapsed / jobs * 1e6:.0f} us per job")
        total_v = total_n = 0
        for label in pids:
            threads = after[label]
            v = n = 0
            detail = []
            for tid, (va, na) in threads.items():
                vb, nb = before[label].get(tid, (0, 0))
                dv, dn = va - vb, na - nb
                v, n = v + dv, n + dn
                if dv or dn:
                    detail.append(f"{tid} {dv / jobs:.2f}+{dn / jobs:.2f}")
            total_v, total_n = total_v + v, total_n + n
            print(
                f"  {label:28} ctx/job voluntary {v / jobs:5.2f}"
                f" involuntary {n / jobs:5.2f}, CPU {cpu[label] / jobs * 1e6:4.0f} us"
                f" (user {user[label] / jobs * 1e6:4.0f})/job,"
                f" on CPU {on_cpu[label]} (migrations/job {moves[label] / jobs:4.2f})"
                f"   ({', '.join(detail)})"
            )
            if label in calls:
                rows = calls[label]
                per = sum(c for _, c in rows) / jobs
                top = ", ".join(f"{name} {c / jobs:.2f}" for name, c in rows[:8])
                print(f"  {'':28} syscalls/job {per:5.2f}: {top}")
        print(
            f"  {'all':28} ctx/job voluntary {total_v / jobs:5.2f}"
            f" involuntary {total_n / jobs:5.2f},"
            f" CPU {sum(cpu.values()) / jobs * 1e6:4.0f} us/job"
        )
        if calls:
            per = sum(c for rows in calls.values() for _, c in rows) / jobs
            print(f"  {'all':28} syscalls/job {per:5.2f}")


if __name__ == "__main__":
    main()
