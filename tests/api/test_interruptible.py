"""Blocking waits end promptly on Ctrl-C (dispynb._interruptible): on a real SIGINT,
as a terminal or JupyterLab sends it, and on Python's pending-interrupt flag alone
(``_thread.interrupt_main()``, or a signal another thread took), which a main thread
blocked in C would otherwise notice only when its wait ended by itself."""

from __future__ import annotations

import _thread
import json
import os
import signal
import threading
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster, _interruptible
from tests import jobs
from tests.sigint import (
    flag_when,
    main_waits_in_function,
    python_handles_sigint,
    run_in_session,
    sigint_when,
)

#: Longer than any wait here may take once interrupted.
NEVER = 30.0


def main_waits_in(function: str) -> Callable[[], bool]:
    """Whether the main thread is inside ``dispynb._interruptible.<function>`` now."""
    return main_waits_in_function(function, "dispynb._interruptible")


Sender = Callable[[Callable[[], bool]], AbstractContextManager[Any]]
SENDERS: dict[str, Sender] = {"sigint": sigint_when, "flag": flag_when}


@pytest.mark.parametrize("how", sorted(SENDERS))
def test_every_kind_of_wait_ends_on_an_interrupt(how: str) -> None:
    send = SENDERS[how]
    held = threading.Lock()
    held.acquire()
    sleepers = _interruptible.Sleepers()
    waits: list[tuple[str, Callable[[], object]]] = [
        ("acquire", lambda: _interruptible.acquire(held)),
        ("wait_for", lambda: sleepers.wait_for(lambda: False)),
    ]
    for name, wait in waits:
        with send(main_waits_in(name)), pytest.raises(KeyboardInterrupt):
            wait()


def test_timeouts_are_kept() -> None:
    held = threading.Lock()
    held.acquire()
    assert not _interruptible.acquire(held, 0.6)  # longer than a slice
    assert not _interruptible.acquire(held, 0)
    sleepers = _interruptible.Sleepers()
    assert not sleepers.wait_for(lambda: False, 0.3)
    assert sleepers.wait_for(lambda: True, 0)
    assert not sleepers.wait_for(lambda: False, 0)


def test_sleepers_wake_a_waiter_whose_state_changed() -> None:
    """`Sleepers.wait_for` returns once another thread changes the state and calls
    `Sleepers.wake_all` (as the I/O thread does when a cluster's last job ends)."""
    sleepers = _interruptible.Sleepers()
    state: list[int] = []

    def change() -> None:
        jobs.wait_until(main_waits_in("acquire"))  # asleep, registered
        state.append(1)
        sleepers.wake_all()

    changer = threading.Thread(target=change, name="test-changer", daemon=True)
    changer.start()
    assert sleepers.wait_for(lambda: bool(state), NEVER)
    changer.join(NEVER)
    assert sleepers._sleeping == []


# A main thread waiting over and over (WAIT) while another thread ends what it waits
# for (END) as fast as it can, and 3,000 SIGINTs land on the main thread wherever
# its wait is: the ending thread must never fail. It did with threading's waits
# (CPython's Condition.wait, interrupted between giving its lock back and taking it
# again, releases the lock the other thread then holds): on the I/O thread that
# was "error handling a 'job-results' message ... RuntimeError('release unlocked
# lock')", the node dropped and cluster.wait() hung (CI of 2026-12-06).
_STORM = """
import asyncio, concurrent.futures, json, os, queue, signal, sys, threading, time
from dispynb import _interruptible
from dispynb.job import DispyJob, JobStatus
import dispynb.futures  # job.future imports it: not under the storm (never done)

sys.setswitchinterval(1e-6)  # threads take turns often: every window opens
failures = []   # the ending thread's
waits = queue.SimpleQueue()  # main -> ender: what to end next
done = []
SETUP

def end_loop():
    while True:
        item = waits.get()
        if item is None:
            return
        try:
            END
        except Exception as exc:
            failures.append(repr(exc))

def storm():
    main = threading.main_thread().ident
    for _ in range(3000):
        time.sleep(0.0003)
        signal.pthread_kill(main, signal.SIGINT)
    done.append(True)

ender = threading.Thread(target=end_loop, daemon=True)
ender.start()
# Ctrl-C raises only inside a wait: else one landing in this loop's own lines (an
# except clause, the loop's jump) would end the program.
waiting = [False]

def interrupt(signum, frame):
    if waiting[0]:
        waiting[0] = False
        raise KeyboardInterrupt

signal.signal(signal.SIGINT, interrupt)
interrupts = waited = broken = 0
sender = threading.Thread(target=storm, daemon=True)
sender.start()
while not done:
    try:
        waiting[0] = True
        WAIT
        waiting[0] = False
        waited += 1
    except KeyboardInterrupt:
        interrupts += 1
    except RuntimeError:  # Python's own Event.wait, broken by the interrupt
        waiting[0] = False
        broken += 1
waits.put(None)
ender.join(10)
report = {"failures": failures[:5], "broken": broken}
print(json.dumps({**report, "interrupts": interrupts, "waited": waited}))
"""

_WAITS = {
    # A cluster's wait(): the I/O thread wakes it as the last job ends.
    "sleepers": (
        "sleepers = _interruptible.Sleepers()\nstate = [0]",
        "state[0] = item; sleepers.wake_all()",
        "n = state[0] + 1; waits.put(n); sleepers.wait_for(lambda: state[0] >= n)",
    ),
    # job(): on a job with dispy's finish event (made for every job a callback
    # gets a copy of), which the I/O thread sets.
    "job": (
        "",
        "item._complete(JobStatus.Finished, result=1)",
        "job = DispyJob(None, (), {}); job.finish; waits.put(job); job()",
    ),
    # job.future.result(): the future is settled by the ending thread.
    "future": (
        "",
        "item._complete(JobStatus.Finished, result=1)",
        "job = DispyJob(None, (), {}); f = job.future; waits.put(job); f.result()",
    ),
    # Every call that waits for the I/O loop (cluster creation, close, status...).
    "run_sync": (
        "from dispynb._loop import LoopRunner\nrunner = LoopRunner.acquire()",
        "pass",
        "runner.run_sync(asyncio.sleep, 0)",
    ),
    # A wait on a Flag: a notebook run's (the Stop button interrupts it), the
    # executor's shutdown, the I/O loop's start.
    "flag": (
        "flag = _interruptible.Flag()",
        "flag.set()",
        "flag.clear(); waits.put(1); flag.wait()",
    ),
    # A user's own waits: Python's Event.wait and concurrent.futures.wait, which a
    # Ctrl-C may break; the I/O thread ending the job must not fail for that.
    "finish": (
        "",
        "item._complete(JobStatus.Finished, result=1)",
        "job = DispyJob(None, (), {}); waits.put(job); job.finish.wait()",
    ),
    "futures.wait": (
        "",
        "item._complete(JobStatus.Finished, result=1)",
        "job = DispyJob(None, (), {}); f = job.future; waits.put(job); "
        "concurrent.futures.wait([f])",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(_WAITS))
def test_a_storm_of_ctrl_c_in_a_wait_never_fails_the_thread_that_ends_it(
    kind: str,
) -> None:
    setup, end, wait = _WAITS[kind]
    program = _STORM.replace("SETUP", setup).replace("END", end).replace("WAIT", wait)
    proc = run_in_session(program)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["interrupts"] > 100 and report["waited"] > 0, report
    assert report["failures"] == [], report
    assert "Exception in callback" not in proc.stderr, proc.stderr[-3000:]
    if kind not in ("finish", "futures.wait"):  # Python's own may break: not ours
        assert report["broken"] == 0, report


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(SENDERS))
def test_job_call_and_cluster_wait_end_on_an_interrupt(
    local1: Any, tmp_path: Path, how: str
) -> None:
    """``job()`` and ``cluster.wait()`` on a job that runs 30 s: Ctrl-C ends them."""
    send = SENDERS[how]
    started = tmp_path / "started"
    cluster = JobCluster(jobs.mark_and_sleep, nodes=local1)
    try:
        job = cluster.submit(str(started), NEVER)
        with (
            send(lambda: started.exists() and main_waits_in("acquire")()),
            pytest.raises(KeyboardInterrupt),
        ):
            job()
        with (
            send(main_waits_in("wait_for")),
            pytest.raises(KeyboardInterrupt),
        ):
            cluster.wait()
        assert not job.done()  # interrupted waits, not the job
    finally:
        cluster.close(terminate=True)


@pytest.mark.slow
def test_an_interrupted_wait_shows_the_users_call_not_dispynbs_frames(
    local1: Any, tmp_path: Path
) -> None:
    """A Ctrl-C in ``job()``, ``job.wait()``, ``cluster.wait()``, ``cluster()`` or
    ``cluster.close()``: the traceback ends at the user's call (the method itself is
    the one frame Python keeps, at its line that waited), not in dispynb's locks,
    nor at a ``raise`` of dispynb's (as if dispynb raised it)."""
    started = tmp_path / "started"
    cluster = JobCluster(jobs.mark_and_sleep, nodes=local1)
    try:
        job = cluster.submit(str(started), NEVER)
        waits: list[tuple[str, Callable[[], object]]] = [
            ("__call__", job),
            ("wait", job.wait),
            ("wait", cluster.wait),
            ("wait", cluster),
            ("close", cluster.close),
        ]
        for name, wait in waits:
            with (
                sigint_when(lambda: started.exists() and main_waits_in("acquire")()),
                pytest.raises(KeyboardInterrupt) as raised,
            ):
                wait()
            frames = traceback.extract_tb(raised.tb)
            ours = [f"{f.filename}:{f.name}" for f in frames if "dispynb" in f.filename]
            assert len(ours) == 1 and ours[0].endswith(f":{name}"), ours
            assert not (frames[-1].line or "").startswith("raise"), frames[-1].line
            assert raised.value.__context__ is None or raised.value.__suppress_context__
        assert not job.done()  # interrupted waits, not the job
    finally:
        cluster.close(terminate=True)


@pytest.mark.parametrize("how", ["signal", "flag"])
def test_held_interrupts_are_raised_as_the_step_ends(how: str) -> None:
    """`HeldInterrupts`: a Ctrl-C in the middle of a step the user's thread does for
    the I/O loop (a result being handled) comes once the step is over, not in it."""
    steps: list[str] = []
    with python_handles_sigint():
        with pytest.raises(KeyboardInterrupt), _interruptible.HeldInterrupts():
            if how == "signal":
                signal.raise_signal(signal.SIGINT)
            else:
                _thread.interrupt_main()
            for _ in range(1000):  # the pending handler runs in here
                pass
            steps.append("finished")
        assert steps == ["finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_interrupts_put_every_handler_back_if_a_pending_one_raises_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`HeldInterrupts` swaps handlers one by one; if a signal pending runs its own
    handler, which raises, during a swap (``signal.signal`` runs them first), the
    handlers swapped already go back: none is left holding for ever."""

    def usr1(signum: int, frame: object) -> None:
        pass

    def usr2(signum: int, frame: object) -> None:
        pass

    swap = signal.signal

    def pending_raises(signum: int, handler: object) -> object:
        if signum == signal.SIGUSR2 and handler is not usr2:
            raise RuntimeError("a pending signal's handler raised")
        return swap(signum, handler)  # type: ignore[arg-type]

    before = (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2))
    swap(signal.SIGUSR1, usr1)
    swap(signal.SIGUSR2, usr2)
    try:
        monkeypatch.setattr(_interruptible, "_setsignal", pending_raises)
        with pytest.raises(RuntimeError, match="pending"):
            _interruptible.HeldInterrupts().__enter__()
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGUSR1) is usr1
        assert signal.getsignal(signal.SIGUSR2) is usr2
    finally:
        swap(signal.SIGUSR1, before[0])  # type: ignore[arg-type]
        swap(signal.SIGUSR2, before[1])  # type: ignore[arg-type]


def test_a_nested_held_step_leaves_the_delivery_to_the_outer_one() -> None:
    """A step begun while another holds the signals (the job's message written in
    the loop's place within `JobCluster.submit`'s hold) swaps nothing and delivers
    nothing: the Ctrl-C comes as the outer step ends, once."""
    steps: list[str] = []
    with python_handles_sigint():
        with pytest.raises(KeyboardInterrupt), _interruptible.HeldInterrupts() as out:
            with _interruptible.HeldInterrupts() as inner:
                held = signal.getsignal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                for _ in range(1000):  # the pending handler runs in here
                    pass
                assert inner.pending and out.pending
            assert signal.getsignal(signal.SIGINT) is held  # still the outer's hold
            steps.append("inner ended")
        assert steps == ["inner ended"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert _interruptible.HeldInterrupts._active is None


def test_a_child_forked_by_another_thread_holds_interrupts_on_its_main_thread() -> None:
    """`HeldInterrupts` knows the main thread by an ident kept at import (asked at
    every job submitted): in a child forked by another thread (multiprocessing's
    fork start method), that thread is the main one, and its steps hold a Ctrl-C
    as the parent's main thread's do, instead of taking it in their middle."""
    codes: list[int] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code
            code = 3
            try:
                steps: list[str] = []
                try:
                    with _interruptible.HeldInterrupts():
                        signal.raise_signal(signal.SIGINT)
                        for _ in range(1000):  # an unheld handler would run in here
                            pass
                        steps.append("finished")
                except KeyboardInterrupt:
                    if steps == ["finished"]:
                        code = 0
            finally:
                os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

    with python_handles_sigint():
        forker = threading.Thread(target=fork, name="test-forker")
        forker.start()
        forker.join(NEVER)
    assert codes == [0]


#: A client program: while its main thread cannot take a SIGINT sent to the process
#: (it blocks it here, as a main thread woken but not yet running does for a moment
#: on a loaded machine), no thread of dispynb's may take it in its place; then it
#: unblocks it and gets its KeyboardInterrupt.
_MAIN_ONLY = """
import json, os, signal, threading
from dispynb import JobCluster, LocalCluster

def square(x):
    return x * x

masks = {}

def blocks_sigint(tid):
    with open(f"/proc/self/task/{tid}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    raise AssertionError("no SigBlk")

def job_status(job):
    # A thread the user starts from a callback (a progress timer does too).
    done = threading.Event()
    thread = threading.Thread(target=done.wait, name="started-in-a-callback")
    thread.start()
    masks[thread.name] = blocks_sigint(thread.native_id)
    done.set()
    thread.join()

with LocalCluster(cpus=1) as local, JobCluster(
    square, nodes=local, job_status=job_status, recover_file=False
) as cluster:
    assert cluster.submit(3)() == 9
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and thread.native_id is not None:
            try:
                masks[thread.name] = blocks_sigint(thread.native_id)
            except FileNotFoundError:  # it ended since: it can take no signal
                pass
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    os.kill(os.getpid(), signal.SIGINT)  # to the process, as Ctrl-C and Stop send it
    # The loop and callback threads wake, run, sleep again: a thread that could
    # take the signal has taken it by now (and Python raises it here).
    early = False
    try:
        assert [cluster.submit(n)() for n in range(4)] == [0, 1, 4, 9]
    except KeyboardInterrupt:
        early = True
    waiting = signal.SIGINT in signal.sigpending()
    interrupted = False
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for _ in range(1000):  # a flag set by another thread is handled in here
            pass
    except KeyboardInterrupt:
        interrupted = True
report = {"masks": masks, "early": early, "waiting": waiting}
print(json.dumps({**report, "interrupted": interrupted}))
"""


@pytest.mark.timeout(120)
def test_a_ctrl_c_to_the_process_is_left_to_the_main_thread() -> None:
    """A SIGINT sent to the process (Ctrl-C, the notebook's Stop) that its main
    thread cannot take at once waits for it: dispynb's threads (and those they
    start) block it. Taken by one of them, Python would only mark it there, and a
    main thread asleep in C (the user's ``time.sleep`` in a generator of
    ``%%dispy --over`` inputs) would raise it only when its sleep ended: a kernel
    Stop that took a minute (tests/jupyter/test_kernel_stop.py, seen in CI)."""
    proc = run_in_session(_MAIN_ONLY)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["masks"], report
    unblocked = [name for name, blocked in report["masks"].items() if not blocked]
    assert unblocked == [], report
    assert not report["early"] and report["waiting"], report
    assert report["interrupted"], report
