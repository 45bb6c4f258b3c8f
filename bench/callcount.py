"""Count the Python function calls of one W2 round trip, per process (issue 16/17).

Not a benchmark of time: a count, which load on the machine does not change. Each
process of the round trip (the client, a ``dispynb-scheduler``, the node server)
counts every call of a Python function and of a builtin (``sys.setprofile``)
while a window of ``--trips`` sequential round trips of ``inc`` runs, after a
warm-up; the report gives the calls per trip of each process and its most called
functions::

    PYTHONPATH=$PWD .venv/bin/python bench/callcount.py --backend dispynb-scheduler
    PYTHONPATH=$PWD .venv/bin/python bench/callcount.py --backend dispynb --top 40

The servers count from a ``sitecustomize`` module this script puts on their
``PYTHONPATH`` (their main thread only, where their event loop runs), switched on
and off by SIGUSR1 and SIGUSR2; the client counts in its own threads. The pulses
of the window (one a second per connection) are counted too: a few calls per trip
at most over a window of several seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: The counter, as each server process runs it (written to ``sitecustomize.py``).
_SITE = """
import os, sys
if os.environ.get("CALLCOUNT_DIR"):
    import collections, json, signal
    _counts = collections.Counter()
    _callers = bool(os.environ.get("CALLCOUNT_CALLERS"))

    def _name(frame, event, arg):
        if event == "call":
            code = frame.f_code
            where = os.path.basename(code.co_filename)
            return f"{where}:{code.co_firstlineno}:{code.co_qualname}"
        name = f"<{getattr(arg, '__qualname__', arg)}>"
        if _callers:
            code = frame.f_code
            name += f" in {code.co_qualname}:{frame.f_lineno}"
        return name

    def _count(frame, event, arg):
        if event == "call" or event == "c_call":
            _counts[_name(frame, event, arg)] += 1

    def _on(signum, frame):
        _counts.clear()
        sys.setprofile(_count)

    def _off(signum, frame):
        sys.setprofile(None)
        path = os.path.join(os.environ["CALLCOUNT_DIR"], f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as out:
            json.dump(dict(_counts), out)
        os.rename(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _on)
    signal.signal(signal.SIGUSR2, _off)
"""


class _ClientCounter:
    """Counts the calls of this process's threads while `on`."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.on = False

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if not self.on:
            return
        if event == "call":
            code = frame.f_code
            name = (
                f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}:"
                f"{code.co_qualname}"
            )
        elif event == "c_call":
            name = f"<{getattr(arg, '__qualname__', arg)}>"
        else:
            return
        self.counts[name] += 1


def _report(label: str, counts: dict[str, int], trips: int, top: int) -> None:
    python = sum(n for name, n in counts.items() if not name.startswith("<"))
    builtin = sum(n for name, n in counts.items() if name.startswith("<"))
    print(
        f"{label}: {python / trips:.1f} Python calls and {builtin / trips:.1f} "
        f"builtin calls per trip"
    )
    rows = sorted(counts.items(), key=lambda row: -row[1])[:top]
    for name, n in rows:
        print(f"  {n / trips:7.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=["dispynb", "dispynb-scheduler"], default="dispynb"
    )
    parser.add_argument("--trips", type=int, default=500)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--callers",
        action="store_true",
        help="servers: count builtins by the function and line calling them",
    )
    parser.add_argument(
        "--processes",
        default="client,scheduler,node",
        help="which processes to report (comma-separated)",
    )
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="callcount-")
    with open(os.path.join(directory, "sitecustomize.py"), "w") as site:
        site.write(_SITE)
    os.environ["CALLCOUNT_DIR"] = directory
    if args.callers:
        os.environ["CALLCOUNT_CALLERS"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (directory, os.environ.get("PYTHONPATH")) if p
    )
    counter = _ClientCounter()
    threading.setprofile(counter)
    sys.setprofile(counter)
    from wakeups import _dispynb, _processes, _scheduler, inc

    backends: dict[str, Callable[..., Any]] = {
        "dispynb": _dispynb,
        "dispynb-scheduler": _scheduler,
    }
    for trip, _burst in backends[args.backend](2):
        for i in range(200):
            trip(i)
        # The scheduler and the node server: the client's children (not the
        # node's computation processes, forked with its command line).
        pids = {
            label.split("[")[0]: pid
            for label, pid in _processes(os.getpid()).items()
            if label.startswith(("schedserver", "nodeserver"))
            and psutil.Process(pid).ppid() == os.getpid()
        }
        for pid in pids.values():
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        counter.on = True
        for i in range(args.trips):
            assert trip(i) == inc(i)
        counter.on = False
        for pid in pids.values():
            os.kill(pid, signal.SIGUSR2)
        found: dict[str, dict[str, int]] = {}
        deadline = time.monotonic() + 30
        for label, pid in pids.items():
            path = os.path.join(directory, f"{pid}.json")
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(path) as data:
                found[label] = json.load(data)
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        wanted = args.processes.split(",")
        names = {"schedserver": "scheduler", "nodeserver": "node"}
        if "client" in wanted:
            _report("client", dict(counter.counts), args.trips, args.top)
        for label, counts in found.items():
            if names[label] in wanted:
                _report(names[label], counts, args.trips, args.top)


if __name__ == "__main__":
    main()
