"""`run_job` and `worker_loop` in process: outcomes, capture, timing, bad pickles."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback

import pytest

from dispynb.protocol import serialize, shm
from dispynb.protocol.messages import CANCELLED, FINISHED, RAISED
from dispynb.protocol.shmpool import SegmentPool
from nodeserver.channel import MessageSocket
from nodeserver.ipc import Done, Run, Shutdown, Skip
from nodeserver.jobrunner import run_job, worker_loop

RUN = Run(key=7, attempt=2)


def call(func, *args, **kwargs):
    buffers = [memoryview(b) for b in serialize.dumps((args, kwargs))]
    return run_job(func, RUN, buffers)


def test_run_job_finished_returns_pickled_result():
    def add(a, b=0):
        return {"sum": a + b}

    done, buffers = call(add, 2, b=3)

    assert isinstance(done, Done)
    assert (done.key, done.attempt, done.outcome) == (7, 2, FINISHED)
    assert done.exception is None
    assert serialize.loads(buffers) == {"sum": 5}


def test_run_job_large_result_travels_out_of_band():
    payload = bytearray(b"x" * 1_000_000)

    done, buffers = call(lambda: pickle.PickleBuffer(payload))

    assert done.outcome == FINISHED
    assert len(buffers) == 2
    assert bytes(serialize.loads(buffers)) == bytes(payload)


class _Lazy(Exception):
    def __getattr__(self, name: str) -> object:
        raise LookupError(name)  # traceback looks up __notes__


def _formats(exc: BaseException) -> bool:
    """Whether this Python's `traceback` formats ``exc`` (3.13's ignores a failing
    ``__notes__`` lookup; 3.11 and 3.12 raise it)."""
    try:
        traceback.format_exception(exc)
    except LookupError:
        return False
    return True


def test_an_exception_traceback_cannot_format_is_reported_not_fatal():
    """Formatting it raised out of run_job: the worker ended ('exited with
    status 1'), the job's own traceback lost."""

    def fail():
        raise _Lazy("lazy")

    done, _ = call(fail)
    assert done.outcome == RAISED
    assert 'raise _Lazy("lazy")' in done.exception
    if _formats(_Lazy("lazy")):
        assert f"{__name__}._Lazy: lazy\n" in done.exception
    else:
        assert done.exception.endswith(
            f"{__name__}._Lazy: <the exception cannot be formatted: "
            "LookupError: __notes__>\n"
        )


def test_run_job_exception_gives_traceback_without_runner_frame():
    def fail(x):
        raise ValueError(f"bad {x}")

    done, buffers = call(fail, 1)

    assert done.outcome == RAISED
    assert buffers == []
    assert done.exception.startswith("Traceback (most recent call last):")
    assert "in fail" in done.exception
    assert "run_job" not in done.exception
    assert done.exception.rstrip().endswith("ValueError: bad 1")


def test_run_job_sys_exit_is_reported_not_fatal():
    def leave():
        sys.exit(4)

    done, _ = call(leave)

    assert done.outcome == RAISED
    assert "in leave" in done.exception
    assert "the job called sys.exit(4)" in done.exception


def test_run_job_sys_exit_called_directly():
    done, _ = call(sys.exit, "bye")

    assert done.outcome == RAISED
    assert done.exception == "SystemExit: the job called sys.exit('bye')\n"


def test_run_job_keyboard_interrupt_is_reported():
    def interrupted():
        raise KeyboardInterrupt

    done, _ = call(interrupted)

    assert done.outcome == RAISED
    assert "KeyboardInterrupt" in done.exception


@pytest.mark.parametrize(
    ("make", "kind"),
    [(lambda: threading.Lock(), "lock"), (lambda: (i for i in ()), "generator")],
)
def test_run_job_unpicklable_result_names_its_type(make, kind):
    done, buffers = call(make)

    assert done.outcome == RAISED
    assert buffers == []
    assert done.exception.startswith(f"result of type {kind!r} cannot be pickled: ")
    assert "TypeError" in done.exception
    assert done.exception.endswith(  # how to fix it
        "; return what it is made from instead (a list, not a generator; a file's "
        "path, not the open file)\n"
    ), done.exception


def test_run_job_unpicklable_arguments_are_reported():
    bad = pickle.dumps(((), {}), protocol=5)[:-3]  # truncated

    for payload in (
        [memoryview(bad)],
        [memoryview(pickle.dumps(("not", "a", "pair")))],
    ):
        done, buffers = run_job(print, RUN, payload)
        assert done.outcome == RAISED
        assert buffers == []
        assert done.exception.startswith("arguments cannot be unpickled on the node: ")
        assert done.start_time == done.end_time


def test_run_job_missing_module_in_arguments_names_the_module():
    class Local:
        pass

    Local.__module__ = "module_missing_on_node"
    Local.__qualname__ = "Local"
    sys.modules["module_missing_on_node"] = type(sys)("module_missing_on_node")
    sys.modules["module_missing_on_node"].Local = Local
    try:
        payload = pickle.dumps(((Local(),), {}), protocol=5)
    finally:
        del sys.modules["module_missing_on_node"]

    done, _ = run_job(print, RUN, [memoryview(payload)])

    assert done.outcome == RAISED
    assert "ModuleNotFoundError" in done.exception
    assert "module_missing_on_node" in done.exception


def test_run_job_captures_and_restores_stdout_stderr():
    def chatty(n):
        print("out", n)
        print("err", n, file=sys.stderr)
        sys.stdout.write("more")
        return n

    saved = sys.stdout, sys.stderr
    done, _ = call(chatty, 1)

    assert (sys.stdout, sys.stderr) == saved
    assert done.stdout == "out 1\nmore"
    assert done.stderr == "err 1\n"


def test_run_job_restores_streams_even_when_job_replaces_them():
    def replace():
        print("before")
        sys.stdout = None
        raise RuntimeError("boom")

    saved = sys.stdout, sys.stderr
    done, _ = call(replace)

    assert (sys.stdout, sys.stderr) == saved
    assert done.stdout == "before\n"
    assert done.outcome == RAISED


def test_run_job_times_bracket_the_call():
    seen = []

    def timed():
        seen.append(time.time())

    before = time.time()
    done, _ = call(timed)
    after = time.time()

    assert before <= done.start_time <= seen[0] <= done.end_time <= after


def test_run_job_carries_on_after_a_failure():
    calls = []

    def job(x):
        calls.append(x)
        if x == 1:
            raise ValueError(x)
        return x

    results = [call(job, x)[0].outcome for x in range(3)]

    assert results == [FINISHED, RAISED, FINISHED]
    assert calls == [0, 1, 2]


def test_worker_loop_runs_jobs_until_eof():
    server, worker = socket.socketpair()
    server.settimeout(10)
    client = MessageSocket(server)
    thread = threading.Thread(
        target=worker_loop, args=(MessageSocket(worker), lambda x: x * 2)
    )
    thread.start()
    try:
        for key in range(3):
            client.send(Run(key=key, attempt=0), serialize.dumps(((key,), {})))
        client.send(Shutdown())  # not a Run: ignored with a warning
        client.send(Run(key=3, attempt=1), serialize.dumps(((21,), {})))
        replies = [client.recv() for _ in range(4)]
    finally:
        client.close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert [done.key for done, _ in replies] == [0, 1, 2, 3]
    assert [serialize.loads(buffers) for _, buffers in replies] == [0, 2, 4, 42]
    worker.close()


def test_a_skip_for_a_job_that_started_is_dropped_not_kept_for_its_key():
    # The node tells a worker to skip a job it may not have started (sent ahead,
    # then cancelled unless started, or taken back): the worker had started it
    # (a Skip always comes after its Run). Kept, that Skip skipped the next run of
    # the same key there (the job queued again, attempt 2): reported cancelled,
    # never run.
    server, worker = socket.socketpair()
    server.settimeout(10)
    client = MessageSocket(server)
    thread = threading.Thread(
        target=worker_loop, args=(MessageSocket(worker), lambda x: x * 2)
    )
    thread.start()
    try:
        client.send(Run(key=5, attempt=1), serialize.dumps(((1,), {})))
        client.send(Skip(key=5))  # read once job 5 ran: too late, dropped
        client.send(Run(key=5, attempt=2), serialize.dumps(((2,), {})))
        replies = [client.recv() for _ in range(2)]
    finally:
        client.close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert [(d.key, d.attempt, d.outcome) for d, _ in replies] == [
        (5, 1, FINISHED),
        (5, 2, FINISHED),
    ]
    assert [serialize.loads(buffers) for _, buffers in replies] == [2, 4]
    worker.close()


#: A worker process of its own: one thread, so that its context switches are its
#: waits (in process, the GIL's hand-overs would count too).
_WORKER = """
import socket, sys
from nodeserver.channel import MessageSocket
from nodeserver.jobrunner import worker_loop
worker_loop(MessageSocket(socket.socket(fileno=int(sys.argv[1]))), abs)
"""


def _voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/status")
def test_a_waiting_worker_sleeps_once_per_job():
    # It waits for its next job in MessageSocket.wait, which the node server's read
    # of its last result does not wake (a blocking read of the Unix socket was woken
    # by it, and slept again: two context switches per job, issue 16).
    server, worker = socket.socketpair()
    server.settimeout(10)
    client = MessageSocket(server)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(worker.fileno())],
        pass_fds=[worker.fileno()],
        env=env,
    )
    worker.close()
    trips = 200
    try:

        def trip(key: int) -> None:
            client.send(Run(key=key, attempt=0), serialize.dumps(((-key,), {})))
            done, buffers = client.recv()
            assert (done.outcome, serialize.loads(buffers)) == (FINISHED, key)

        for key in range(20):  # its code paths taken once
            trip(key)
        before = _voluntary_switches(proc.pid)
        for key in range(trips):
            trip(key)
        switches = _voluntary_switches(proc.pid) - before
    finally:
        client.close()
        proc.wait(timeout=10)
    assert proc.returncode == 0
    # At most one per job (the wait for it; none if the next one is there by
    # then); two before.
    assert switches < trips * 3 // 2, switches


# --- bounded output, result cap, unpicklable results (issue 13) -------------------


@pytest.fixture
def limits():
    from nodeserver.jobapi import CONTEXT

    saved = vars(CONTEXT).copy()
    yield CONTEXT
    vars(CONTEXT).update(saved)


def _run(func, *args):
    return run_job(func, Run(key=1, attempt=1), serialize.dumps((args, {})))


def _chatty(n: int) -> int:
    for _ in range(n):
        print("0123456789", end="")
    print("e" * 5, file=sys.stderr)
    return n


def test_output_beyond_max_output_is_dropped_and_counted(limits):
    limits.max_output = 25
    done, _ = _run(_chatty, 10)
    assert done.outcome == FINISHED
    kept, marker = done.stdout.split("\n", 1)
    assert kept == ("0123456789" * 3)[:25]
    assert marker == (
        "[dispynb: 75 more characters of stdout dropped: a job keeps 25 (the "
        "cluster's max_output_size: JobCluster(..., max_output_size=N) keeps N, "
        "None keeps all)]\n"
    )
    assert done.stderr == "eeeee\n"
    done, _ = _run(_chatty, 1)  # the counters start again for each job
    assert done.stdout == "0123456789"


def test_no_max_output_keeps_everything(limits):
    limits.max_output = None
    done, _ = _run(_chatty, 100)
    assert len(done.stdout) == 1000


def test_result_over_max_result_is_not_sent(limits):
    limits.max_result = 1000
    done, buffers = _run(bytes, 5000)
    assert done.outcome == RAISED and buffers == []
    assert "ResultTooLarge" in done.exception and "max_result_size" in done.exception
    done, buffers = _run(bytes, 500)
    assert done.outcome == FINISHED and serialize.loads(buffers) == bytes(500)


def test_a_provisional_result_over_what_the_nodes_take_names_their_limit(
    limits, caplog
):
    """As a final result's: it named max_result_size alone."""
    from nodeserver.jobapi import dispy_provisional_result

    limits.max_result = limits.node_result_room = 1000
    limits.node_max_message = 1300
    assert dispy_provisional_result(bytes(5000)) == -1
    (record,) = [r for r in caplog.records if "not sent" in r.getMessage()]
    assert record.getMessage().endswith(
        "over the limit of 1000 bytes (the node's max message size, less room for "
        "the job's output)"
    )


def test_a_result_over_what_the_nodes_messages_take_says_to_raise_theirs(limits):
    """Over the node's own max message size (1 GiB by default), a larger
    max_result_size cannot help: the advice was to give one."""
    limits.max_result = limits.node_result_room = 1000
    limits.node_max_message = 1000 + 300  # room for output besides the result
    done, _ = _run(bytes, 5000)
    size = int(done.exception.split("pickles to ")[1].split()[0])
    assert "(the node's max message size, less room for the job's output)" in (
        done.exception
    )
    assert f"dispynb-node --max-message-size {2 * size + 300} " in done.exception
    assert "give the cluster as large a max_message_size" in done.exception
    assert "larger max_result_size" not in done.exception
    limits.max_result = limits.node_result_room = 0  # the output takes it all
    done, _ = _run(bytes, 5000)
    assert "(the node's max message size, less room for" in done.exception
    limits.node_result_room = 10_000  # the client's limit: max_result_size
    done, _ = _run(bytes, 5000)
    assert done.exception.endswith(
        "give the cluster a larger max_result_size (within its max_message_size)\n"
    )


def _nested_unpicklable() -> object:
    return [1, {"a": [2, threading.Lock()]}]


def test_unpicklable_result_names_the_path_inside_it():
    done, _ = _run(_nested_unpicklable)
    assert done.outcome == RAISED
    assert "result[1]['a'][1] is a 'lock'" in done.exception


def test_run_job_copies_arguments_out_of_shared_memory():
    data = os.urandom(2_000_000)
    pool = SegmentPool()
    try:
        name, reference = pool.write(serialize.dumps(((data,), {})))
        done, buffers = run_job(len, RUN, [memoryview(reference)])
        assert done.outcome == FINISHED, done.exception
        assert serialize.loads(buffers) == len(data)
        assert (shm.SHM_DIR / name).exists()  # the client's, to reuse
    finally:
        pool.close()


def test_run_job_refuses_forged_or_guessed_shared_memory_names():
    guessed = "dnb-" + "0" * 32
    for name, why in (
        ("../../../etc/passwd", "refused shared memory name"),
        (guessed, "cannot open the job's shared memory"),
    ):
        reference = shm.MAGIC + f'{{"name": "{name}", "sizes": [10]}}'.encode()
        done, buffers = run_job(len, RUN, [memoryview(reference)])
        assert done.outcome == RAISED
        assert buffers == []
        assert done.exception.startswith("arguments cannot be unpickled on the node")
        assert why in done.exception


# --- arguments in a shared body (nodeserver.sharedbody) ---------------------------


def _shared_run(key: int, args: tuple[object, ...]) -> tuple[Run, int, object]:
    """A `Run` whose pickled ``args`` lie in a shared body, as the node sends it:
    the message, the body's descriptor and the body (kept alive by the caller)."""
    from nodeserver.sharedbody import BodyPool, segments

    pickled = serialize.dumps((args, {}))
    total = sum(memoryview(b).nbytes for b in pickled)
    view = BodyPool().take(max(total, 1 << 20))
    views, offset = [], 0
    for part in pickled:
        size = memoryview(part).nbytes
        view[offset : offset + size] = part
        views.append(view[offset : offset + size])
        offset += size
    found = segments(views)
    assert found is not None
    body, layout = found
    return Run(key=key, attempt=0, shared=layout), body.fd, body


class _Keeps:
    """Unpickled from its out-of-band buffer without a copy (as a NumPy array):
    a bytearray where it is made, a view of the received memory where unpickled.
    (Not a memoryview where pickled: the pickler's reference cycle would hold one
    with a buffer exported, which CPython's garbage collector cannot clear.)"""

    def __init__(self, buffer):
        self.view = buffer

    def __reduce_ex__(self, protocol):
        return _Keeps, (pickle.PickleBuffer(self.view),)


_KEPT: list[object] = []

#: Opened by the test: `_keep` of "wait" returns then.
_RELEASE = threading.Event()


def _keep(value: object) -> int:
    if value == "wait":  # a job running while the next ones arrive
        _RELEASE.wait(10)
        return 0
    _KEPT.append(value)
    return 1


def test_worker_loop_runs_shared_arguments_and_says_which_it_keeps():
    server, worker = socket.socketpair()
    server.settimeout(10)
    client = MessageSocket(server)
    thread = threading.Thread(
        target=worker_loop, args=(MessageSocket(worker, fds=True), _keep)
    )
    thread.start()
    data = os.urandom(1 << 20)
    bodies = []
    try:
        run, fd, body = _shared_run(0, (data,))
        bodies.append(body)
        client.send(run, fds=[fd])
        done, _ = client.recv()
        assert (done.outcome, done.kept) == (FINISHED, False)  # bytes: a copy
        assert _KEPT.pop() == data
        run, fd, body = _shared_run(1, (_Keeps(bytearray(data)),))
        bodies.append(body)
        client.send(run, fds=[fd])
        done, _ = client.recv()
        assert (done.outcome, done.kept) == (FINISHED, True)  # still mapped
        assert bytes(_KEPT.pop().view) == data
        # Job 3 goes ahead of job 10, which runs, and is told to skip: never runs.
        _RELEASE.clear()
        client.send(Run(key=10, attempt=0), serialize.dumps((("wait",), {})))
        run, fd, body = _shared_run(3, (data,))
        bodies.append(body)
        client.send(dataclasses.replace(run, ahead=True), fds=[fd])
        client.send(Skip(key=3))
        _RELEASE.set()
        done, _ = client.recv()
        assert (done.key, done.outcome) == (10, FINISHED)
        done, _ = client.recv()
        assert (done.key, done.outcome, done.kept) == (3, CANCELLED, False)
        assert _KEPT == []
        run, _fd, _body = _shared_run(2, (data,))
        client.send(run)  # its descriptor never came
        done, _ = client.recv()
        assert done.outcome == RAISED
        assert "shared memory did not reach the worker" in done.exception
    finally:
        client.close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    worker.close()


def test_run_job_wrong_arguments_show_the_call_and_the_parameters():
    def area(width, height):
        return width * height

    done, _ = call(area, 3, depth=[1, 2])

    assert done.outcome == RAISED
    assert done.exception == (
        f"TypeError: {area.__qualname__}() got an unexpected keyword argument "
        "'depth'\n(the job called area(3, depth=[1, 2]); area takes (width, "
        "height): give submit() the function's arguments)\n"
    )


def test_run_job_type_error_inside_the_function_is_left_as_it_is():
    def join(parts):
        return "".join(parts)

    done, _ = call(join, [1, 2])

    assert done.outcome == RAISED
    assert "(the job called" not in done.exception
    assert done.exception.startswith("Traceback (most recent call last):")
