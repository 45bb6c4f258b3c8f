"""A real ``dispynb-scheduler`` process over local node servers, with its users.

`SchedulerProcess` starts ``python -m schedserver`` as an operator would (nodes
named with ``-n``, the node secret in the environment, a users file written by
``dispynb-scheduler user add``); `run_client` and `start_client` run a client
program (`TIMED_CLIENT`, `DOOMED_CLIENT`) in its own process; `raw_scheduler_session`
and `raw_reply` speak the protocol as a user's own raw client (for attacks), and
`set_up_raw` and `submit_raw` run a computation on such a session,
`refusals_within` gathers what the scheduler refuses it, and `unread_answers` makes
such a client one the scheduler reads no more. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    CANCELLED,
    ComputationClose,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    JobCancel,
    JobResults,
    JobSubmit,
    Message,
)
from dispynb.protocol.records import ResultEntry
from dispynb.secret import read_secret_file
from dispynb.transport.connection import QUEUED_HIGH, Connection
from dispynb.transport.connector import connect
from dispynb.transport.tls import client_context
from tests.transport.certs import make_cert

if TYPE_CHECKING:
    from dispynb import LocalCluster

ROOT = Path(__file__).resolve().parents[2]

#: Seconds a process gets to start or stop.
WAIT = 20.0


def env_for(**extra: str) -> dict[str, str]:
    """This environment without ``DISPYNB_*`` settings, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPYNB_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.update(extra)
    return env


def scheduler_cli(
    *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``dispynb-scheduler ARGS`` to its end (user management, refusals)."""
    return subprocess.run(
        [sys.executable, "-m", "schedserver", *args],
        env=env_for(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def add_user(directory: Path, name: str) -> Path:
    """``dispynb-scheduler user add NAME``; return the credential file."""
    credential = directory / f"{name}.credential"
    done = scheduler_cli(
        "user", "add", name, "--users", str(directory / "users"), "-o", str(credential)
    )
    assert done.returncode == 0, done.stderr
    return credential


@dataclass
class SchedulerProcess:
    """A scheduler started from the command line; as a context manager, started
    and stopped (also if it fails to start: no process left behind)."""

    directory: Path
    nodes: list[str]
    node_secret: str
    args: tuple[str, ...] = ()
    #: Words before the command (``unshare ...``: a mount namespace of its own).
    launcher: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "scheduler.log"

    @classmethod
    def owning(
        cls, directory: Path, nodes: LocalCluster, *args: str
    ) -> SchedulerProcess:
        """A scheduler (not started yet) owning ``nodes``, with options ``args``."""
        return cls(directory, nodes.node_specs(), nodes.secret, args=args)

    def __enter__(self) -> SchedulerProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SchedulerProcess:
        port_file = self.directory / "scheduler.port"
        port_file.unlink(missing_ok=True)
        since = len(self.log_text())  # a restart appends to the log
        command = [
            *self.launcher, sys.executable, "-m", "schedserver",
            "--users", str(self.directory / "users"),
            "--port", str(self.port),
            "--port_file", str(port_file),
            "--pulse_interval", "0.5",
            *self.args,
        ]  # fmt: skip
        for node in self.nodes:
            command += ["-n", node]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=env_for(DISPYNB_SECRET=self.node_secret),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + WAIT
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"scheduler exited:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"scheduler did not start:\n{self.log_text()}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.wait_for_log("is up with", len(self.nodes), since=since)
        return self

    def wait_for_log(
        self, text: str, count: int = 1, timeout: float = WAIT, since: int = 0
    ) -> None:
        """Wait until ``text`` appears ``count`` times in the scheduler's log (from
        character ``since`` on)."""
        deadline = time.monotonic() + timeout
        while self.log_text()[since:].count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged:\n{self.log_text()}")
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("scheduler did not stop") from None


def run_client(
    script: str, *args: str, cwd: Path, timeout: float = 40.0
) -> dict[str, Any]:
    """Run a client program (``script``'s text) to its end; return its JSON output."""
    path = cwd / f"client_{abs(hash((script, args)))}.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path), *args],
        env=env_for(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def start_client(
    script: str, *args: str, cwd: Path, name: str
) -> subprocess.Popen[str]:
    """Start a client program; read its JSON with `finish_client`."""
    path = cwd / f"{name}.py"
    path.write_text(script)
    return subprocess.Popen(
        [sys.executable, str(path), *args],
        env=env_for(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish_client(proc: subprocess.Popen[str], timeout: float = 40.0) -> dict[str, Any]:
    """Wait for a client started with `start_client`; return its JSON output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client did not finish:\n{out}\n{err}") from None
    assert proc.returncode == 0, out + err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


#: A client program: COUNT jobs of SECONDS each (``ADDRESS CREDENTIAL COUNT
#: SECONDS``); prints JSON with each job's result, status and [start, end] times.
TIMED_CLIENT = """
import json, sys
from dispynb import SharedJobCluster

def nap(n, seconds):
    import time
    time.sleep(seconds)
    return n

address, credential = sys.argv[1], sys.argv[2]
count, seconds = int(sys.argv[3]), float(sys.argv[4])
with SharedJobCluster(nap, scheduler_host=address, secret_file=credential) as cluster:
    jobs = [cluster.submit(i, seconds) for i in range(count)]
    results = [job() for job in jobs]
    statuses = [int(job.status) for job in jobs]
    times = [[job.start_time, job.end_time] for job in jobs]
print(json.dumps({"results": results, "statuses": statuses, "times": times}))
"""

#: A client (``ADDRESS CREDENTIAL JOURNAL``) that submits 6 one-second jobs with a
#: recover_file, waits for the first result, says so, and waits to be killed.
DOOMED_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def nap(n, seconds):
    import time
    time.sleep(seconds)
    return n * 10

address, credential, journal = sys.argv[1], sys.argv[2], sys.argv[3]
cluster = SharedJobCluster(
    nap, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(i, 1.0) for i in range(6)]
jobs[0]()
print("first done", flush=True)
time.sleep(120)
"""


def kill_doomed_client(
    address: str, credential: Path, journal: Path, cwd: Path
) -> None:
    """Run `DOOMED_CLIENT` (its recover_file ``journal``) and SIGKILL its process
    group once its first job is done: the rest of its jobs are queued or running."""
    proc = start_client(
        DOOMED_CLIENT, address, str(credential), str(journal), cwd=cwd,
        name=journal.stem,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "first done"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def start_tls_scheduler(
    directory: Path, nodes: list[str], node_secret: str
) -> tuple[SchedulerProcess, str]:
    """A scheduler that takes clients over TLS only (``--cluster_certfile``),
    started; and its certificate, its clients' ``cafile=``."""
    cert, key = make_cert(directory, "scheduler")
    args = ("--cluster_certfile", cert, "--cluster_keyfile", key)
    return SchedulerProcess(directory, nodes, node_secret, args=args).start(), cert


def busy_within(times: list[list[float]], start: float, end: float) -> float:
    """Seconds of job time inside ``[start, end]``."""
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in times)


def shared_window(outs: list[dict[str, Any]]) -> tuple[float, float]:
    """Where `TIMED_CLIENT` runs (``outs``: their JSON) compete for the CPUs: from
    the last one's first job start plus the longest job (no job is preempted: the
    clients there first hold the CPUs until the jobs they run then have ended, a
    job's length on a loaded machine) to the first one's last job end."""
    longest = max(e - s for out in outs for s, e in out["times"])
    start = max(min(s for s, _e in out["times"]) for out in outs) + longest
    end = min(max(e for _s, e in out["times"]) for out in outs)
    assert end - start > 1.0, "the clients barely overlapped"
    return start, end


async def raw_scheduler_session(
    port: int,
    credential: Path,
    *,
    max_message_size: int = 1 << 20,
    cafile: str | None = None,
) -> Connection:
    """An authenticated session at the scheduler on ``port`` of the user of
    ``credential``, as that user's own raw client: it sends what the caller writes
    (over TLS, trusting ``cafile``, when given). The caller closes it."""
    conn, _ = await connect(
        "127.0.0.1",
        port,
        secret=read_secret_file(credential),
        max_message_size=max_message_size,
        ssl_context=client_context(cafile=cafile) if cafile else None,
    )
    return conn


async def set_up_raw(
    conn: Connection, func: Any, *, timeout: float = 30.0, **fields: Any
) -> None:
    """Set ``func`` up as computation 1 of the raw session ``conn``
    (`ComputationSetup` of 4 workers, and ``fields``: its ``name``...); return
    once the scheduler says it is ready (within ``timeout`` seconds)."""
    bundle = serialize.dumps({"func": func, "setup": None, "setup_args": ()})
    conn.write(ComputationSetup(comp_id=1, **{"workers": 4, **fields}), bundle)
    async with asyncio.timeout(timeout):
        while not isinstance((await conn.recv())[0], ComputationReady):
            pass


def submit_raw(conn: Connection, arguments: list[tuple[Any, ...]]) -> None:
    """Submit to computation 1 of ``conn`` a job per item of ``arguments`` (its
    positional arguments), keys 0, 1, ..., in one message."""
    buffers: list[Any] = []
    for args in arguments:
        buffers.extend(serialize.dumps((args, {})))
    jobs = [[key, 1, 1] for key in range(len(arguments))]
    conn.write(JobSubmit(comp_id=1, jobs=jobs), buffers)


async def unread_answers(conn: Connection) -> None:
    """Send, reading nothing, twice `QUEUED_HIGH` requests the scheduler answers
    (refusals: a computation not the user's): past `QUEUED_HIGH` answers unread it
    reads no more of ``conn`` (`SchedulerSession.serve`). What it does not take
    waits in ``conn``."""
    for key in range(2 * QUEUED_HIGH):
        conn.write(JobCancel(comp_id=999, key=key, attempt=1))
        if key % 1000 == 999:  # (a flush may wait for ever once it reads no more)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.flush(), 1.0)


async def refusals_before_round_trip(conn: Connection) -> list[str]:
    """The refusals the scheduler sent ``conn`` before it answers a round trip
    (the close of a computation the user does not have, refused in turn)."""
    conn.write(ComputationClose(comp_id=999))
    errors: list[str] = []
    while True:
        message, _ = await conn.recv()
        if isinstance(message, Error) and "999" in message.message:
            return errors
        if isinstance(message, Error):
            errors.append(message.message)


def refusals_in(message: Message) -> list[str]:
    """What ``message`` from the scheduler refuses: an `Error`'s or a
    `ComputationFailed`'s text, the exceptions of a `JobResults`' jobs cancelled."""
    if isinstance(message, (Error, ComputationFailed)):
        return [message.message]
    if isinstance(message, JobResults):
        entries = (ResultEntry.from_wire(item)[0] for item in message.results)
        return [str(e.exception) for e in entries if e.outcome == CANCELLED]
    return []


async def refusals_within(
    conn: Connection,
    seconds: float,
    count: int,
    watch: Callable[[], object] = lambda: None,
) -> list[str]:
    """The refusals (`refusals_in`) the scheduler sends ``conn`` until ``count``
    came or ``seconds`` passed: what it accepts it does not answer (a job queued),
    so no message says it took all. ``watch`` is called after each message, and
    each half second without one."""
    refusals: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(refusals) < count:
        try:
            message, _ = await asyncio.wait_for(conn.recv(), 0.5)
            refusals += refusals_in(message)
        except TimeoutError:
            pass
        watch()
    return refusals


def raw_reply(
    port: int,
    credential: Path,
    message: Message,
    buffers: list[memoryview] | None = None,
    *,
    until: type[Message],
    never: tuple[type[Message], ...] = (),
) -> Any:
    """Send ``message`` as the user of ``credential`` over a connection of its own,
    and return the first reply of type ``until`` (none of ``never`` may come first)."""

    async def exchange() -> Message:
        conn = await raw_scheduler_session(port, credential)
        try:
            conn.write(message, buffers or ())
            async with asyncio.timeout(WAIT):
                while True:
                    reply, _buffers = await conn.recv()
                    assert not isinstance(reply, never), reply
                    if isinstance(reply, until):
                        return reply
        finally:
            conn.close()

    return asyncio.run(exchange())
