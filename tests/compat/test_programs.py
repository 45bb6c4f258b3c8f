"""Run dispy-style programs (tests/compat/programs/*.py) against real local nodes.

Each program is written as dispy's examples are, with `import dispynb as dispy` as its
only change, plus a two-line preamble that reads the nodes this test started from
``DISPYNB_TEST_NODES`` (the secret comes from ``DISPYNB_SECRET``). It runs as a
subprocess in a fresh directory holding the data files it needs, and its output is
checked against what dispy's reference (../shared/reference/dispy.md, sections 2-4)
says a dispy program sees. Each program runs twice: against nodes LocalCluster
started, and against ``dispynb-node`` processes started with dispynode's own options
only, as dispy's documentation starts dispynode (`dispynodes`).

Expected output: every non-blank line of stdout, in order. A `str` must equal the
line; a compiled pattern must match the whole line.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from dispynb import LocalCluster
from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV
from tests.nodeproc import NODE_WAIT, node_command, node_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROGRAMS = Path(__file__).parent / "programs"
FILES = PROGRAMS / "files"

#: Seconds a program may run.
PROGRAM_TIMEOUT = 60

R = re.compile
NODE = r"local-[01]"


@dataclass(frozen=True)
class Expect:
    """What a program must print, and what it needs and leaves behind."""

    stdout: list[str | re.Pattern[str]]
    #: Files of programs/files/ copied into the program's working directory.
    files: tuple[str, ...] = ()
    #: Patterns that must each be found somewhere in stderr (logged messages).
    stderr: tuple[re.Pattern[str], ...] = ()
    #: Files the program must leave in its working directory: path -> content pattern.
    outputs: dict[str, re.Pattern[str]] = field(default_factory=dict)
    #: Texts that must not be found in stderr.
    not_in_stderr: tuple[str, ...] = ()


def status_table(nodes: int, pending: int = 0) -> list[str | re.Pattern[str]]:
    """dispy's print_status, in its layout: heading, rule, one row per node (name or
    address cut to 15, CPUs, jobs, times to 0.1 s, bytes sent and received), the
    pending jobs (if any), total line."""
    size = r"[ \d.]{5} [BKMGT]"  # %7s of "512 B", "1.5 K"
    row = (
        r" .{15} \| [ \d]{5} \| [ \d]{7} \| [ \d]{5}\d\.\d \| [ \d]{10}\d\.\d \| "
        rf"{size} \| {size}"
    )
    heading = (
        "            Node |  CPUs |    Jobs |"
        "  Sec/Job | Node Time Sec |    Sent |    Rcvd"
    )
    return [
        heading,
        "-" * len(heading),
        *[R(row)] * nodes,
        *([f"Jobs pending: {pending}"] if pending else []),
        R(
            r"Total job time: \d+\.\d{3} sec, wall time: \d+\.\d{3} sec, "
            r"speedup: \d+\.\d{3}"
        ),
    ]


def _sha1(name: str) -> str:
    return hashlib.sha1((FILES / name).read_bytes()).hexdigest()


EXPECTED: dict[str, Expect] = {
    "sample": Expect(
        [
            "cluster name: compute",
            *[
                R(
                    rf"job {i + 1}: {NODE} computed {i * i} at 127\.0\.0\.1, "
                    rf"status 11, stdout 'computing {i}\\n', stderr '', "
                    r"exception None, times ok: True"
                )
                for i in range(8)
            ],
            "wait: True",
            *status_table(2),
        ]
    ),
    "bounded_submit": Expect(
        [
            "finished: 40, sum of results: 780",
            "at most 6 pending: True",
            "pending at the end: 0",
        ]
    ),
    "node_setup": Expect(
        [
            *[
                f"job {i}: node's file True, in memory: True, file deleted: True"
                for i in range(1, 11)
            ],
            "files given to nodes: ['alpha.txt', 'beta.txt']",
        ],
        files=("alpha.txt", "beta.txt"),
    ),
    "node_status": Expect(
        [
            "ClusterStatus: jobs_pending 4",
            "jobs_pending after wait: 0, nodes: 1",
            "DispyNode local-0 at 127.0.0.1: cpus 2, avail_cpus 2, busy 0, jobs_done 4",
            "cpu_time >= 1.0: True, tx > 0: True, rx > 0: True, "
            "updated in the last minute: True",
            "AvailInfo events: True",
            "avail_info: cpu % True, memory True, disk True, swap % True",
            "avail_info: cpu % True, memory True, disk True, swap % True",
        ]
    ),
    "mapreduce": Expect(
        [
            "blue 100",
            "green 100",
            "red 100",
            "gold 40",
            "reduce jobs: 15",
            *status_table(2),
        ]
    ),
    "node_shvars": Expect(["jobs counted: 12", "each node's counter is 1..n: True"]),
    "provisional_results": Expect(
        [
            *[R(rf"job \d+: status 11, result {n * 10}") for n in range(4)],
            "results: [0, 10, 20, 30]",
            "job(clear=True): 0, then job(): 0",
            "job_status saw, per job: [(7, 7, 7, 11)]",
            "provisional results: "
            + str(sorted((n, i) for n in range(4) for i in range(3))),
        ]
    ),
    "early_cancel": Expect(
        [
            R(rf"job 1 computed 0\.0476 on {NODE}/\d+"),
            "job 1: status 9",  # running when cancelled, not catching the interrupt
            *[R(rf"job {i}: status (8|9)") for i in range(2, 6)],
            "stopped early: True",
        ]
    ),
    "cluster_status": Expect(
        [
            # reference 3.8: "Verified order when a job is submitted before the node is
            # ready: 5 (Created), 4 (Initialized), 6 (Running), then the final status".
            # Deliberate difference: JobCluster() returns once a node is set up (so a
            # failing setup raises there), so the node is ready before the first
            # submit and Initialized comes first. Same events, first two swapped.
            "status 4, node 127.0.0.1, cpus 2",
            "status 5, node None, job 1, result None",
            "status 6, node 127.0.0.1, job 1, result None",
            "status 7, node 127.0.0.1, job 1, result 41",
            "status 11, node 127.0.0.1, job 1, result 42",
            "result: 42",
        ]
    ),
    "program_shell": Expect(
        [
            "cluster name: count.sh",
            *[
                line
                for i, code in enumerate([0, 3, 7])
                for line in (
                    f"job {i + 1}: status 11, result {code}",
                    "  stdout and stderr are bytes: True",
                    f"  out: args: item{i} {code}",
                    R(rf"  out: node: {NODE}"),
                    "  out: cwd: dispy_job_path",
                    f"  err: b'note about item{i}\\n'",
                )
            ],
            "echo: result 0, stdout b'hello 42\\n'",
        ],
        files=("count.sh",),
    ),
    "program_python": Expect(
        [
            "cluster name: wordfreq.py",
            *[
                line
                for i, (word, count) in enumerate(
                    [("the", 4), ("cat", 2), ("zebra", 0)]
                )
                for line in (
                    f"job {i + 1}: status 11, result {count}",
                    f"  out: {word}: {count}",
                    R(rf"  out: node: {NODE}"),
                    "  out: python: {}.{}".format(*sys.version_info[:2]),
                )
            ],
            "job 4: status 11, result 1",
            "  err: FileNotFoundError: [Errno 2] No such file or directory: "
            "'missing.txt'",
        ],
        files=("wordfreq.py", "words.txt"),
    ),
    "job_depends": Expect(
        [*[f"data{i:03d}: ok" for i in range(8)], "job files left on nodes: []"]
    ),
    "dest_path": Expect(
        [
            "run 1: BETA, cache built by this cluster: True, "
            "files: ['cache.txt', 'words.txt']",
            "run 2: GAMMA, cache built by this cluster: False, "
            "files: ['cache.txt', 'words.txt']",
            "two clusters at once: ALPHA, BETA",
            "after one closed: GAMMA",
            "after both closed: FileNotFoundError",
        ]
    ),
    "delegate": Expect(
        [
            # reference 3.10: dispy_node_name is in the globals of job functions too
            "job 1: func1 with 5",
            "job 2: func2 with 36",
            "job 3: func1 with 7",
            "job 4: func2 with 64",
            "job 5 without depends: status 9, KeyError: True",
            "job 6 without depends: status 9, KeyError: True",
        ]
    ),
    "depends_kinds": Expect(
        [
            line
            for i in range(4)
            for line in (
                f"{i}: {0.1 * i:.2f} / '{i}: {0.1 * i:.2f}\\n'",
                f"  module {3 * i}, function {100 + i}, class {i * i + 1}, "
                "module file on node: True",
            )
        ],
        files=("helpers.py",),
    ),
    "submit_node": Expect(
        [
            "Allocate node for compute: 127.0.0.1 / local-0 / 2",
            "Allocate node for compute: 127.0.0.1 / local-1 / 2",
            "node local-0 (1 cpus): job ran there: True",
            "node local-0 (1 cpus): job ran there: True",
            "node local-1 (1 cpus): job ran there: True",
            "node local-1 (1 cpus): job ran there: True",
            "unknown node: None",
            "job pinned ran on its node: True",
        ]
    ),
    "cancel": Expect(
        [
            "running job: started",
            "cancel queued job: 0",
            "cancel running job: 0",
            # reference 5.8: a job that catches KeyboardInterrupt and returns is
            # Finished with its value
            "running job: status 11, result interrupted",
            "queued job: status 8, result None",
            "cancel finished job: -1",
            "raises job: started",
            "cancel raises job: 0",
            "raises job: status 9",
            "ignores job: started",
            "cancel ignores job: 0",
            "ignores job: status 9",
            "next job: started",
            "next job: status 11, result 1",
        ]
    ),
    "implicit_names": Expect(
        [
            line
            for i in (1, 2)
            for line in (
                f"job {i}: modules missing: []",
                R(
                    rf"job {i}: node {NODE} at 127\.0\.0\.1, "
                    r"cwd is dispy_job_path: True"
                ),
            )
        ]
    ),
    "logger_default": Expect(
        ["results: [0, 2, 4]"],
        stderr=(
            *(R(rf'dispynb INFO job "{i}" submitted') for i in range(3)),
            *(R(rf'dispynb INFO job "{i}" done with {2 * i}') for i in range(3)),
        ),
        not_in_stderr=("not shown",),
    ),
    "logger_configured_later": Expect(
        ["result: 2"],
        stderr=(
            R(r"dispynb INFO before basicConfig, at dispy's default level"),
            R(r"(?m)^root\|WARNING\|warning after basicConfig$"),
        ),
        # (the cluster's format would say "dispynb WARNING warning after ...")
        not_in_stderr=("info after", "info at the end", "dispynb WARNING"),
    ),
    "logger_handler_later": Expect(
        ["own|INFO|after the handler", "result: 6"],
        stderr=(R(r"dispynb INFO before the handler"),),
        not_in_stderr=("after the handler", "below the level"),
    ),
    "logger_dict_config_later": Expect(
        ["result: 7"],
        stderr=(
            R(r"(?m)^root\|INFO\|info after dictConfig$"),
            R(r"(?m)^root\|INFO\|job 1 submitted$"),
        ),
        not_in_stderr=("below the level", "dispynb INFO"),
    ),
    "logger_level_set": Expect(
        ["result: 8"],
        stderr=(R(r"dispynb INFO job 1 submitted"),),
        not_in_stderr=("below the level",),
    ),
    "module_api": Expect(
        [
            "dispy.logger: True",
            "dispy.JobCluster: True",
            "dispy.DispyJob: True",
            "dispy.DispyNode: True",
            "dispy.NodeAllocate: True",
            "dispy.DispyNodeAvailInfo: True",
            "dispy.recover_jobs: True",
            "DispyJob: Created=5, Running=6, ProvisionalResult=7, Cancelled=8, "
            "Terminated=9, Abandoned=10, Finished=11",
            "DispyNode: Initialized=4, Closed=16, AvailInfo=17",
            "logger levels are increasing: True",
            "job 1: 42",
            "statuses in a list: [5, 11, 4]",
        ],
        stderr=(R(r"shown at level WARNING"),),
    ),
    "node_allocate": Expect(
        [
            "NodeAllocate cpus=-1 and cpus=1: nodes [('local-0', 1), ('local-1', 1)], "
            "job ids 1-4",
            "tuple and dict: nodes [('local-0', 1), ('local-1', 2)], job ids 5-8",
            "host:port strings: nodes [('local-0', 2), ('local-1', 2)], job ids 9-12",
            "DispyNode objects: nodes [('local-0', 2), ('local-1', 2)], job ids 13-16",
            "NodeAllocate subclass: nodes [('local-0', 2)], job ids 17-20",
            "jobs ran on: ['local-0']",
            "allocate local-0: platform Linux",
            "allocate local-1: platform Linux",
            "no node allocated: SetupError: NodeAllocate.allocate gave it no CPUs",
        ],
        # (a warning for each node declined: "node ... cannot be used")
        not_in_stderr=("cannot be used",),
    ),
    "setup_failure": Expect(
        [
            "setup raise: jobs ran on [('local-0', 'ok')]",
            "setup raise: nodes in cluster: ['local-0']",
            "setup return: jobs ran on [('local-0', 'ok')]",
            "setup return: nodes in cluster: ['local-0']",
            "slow setup: status 11, result ('local-1', 'slow')",
        ],
        # the client is told why the node failed, with the traceback
        stderr=(R(r"ValueError: no data for this node"),),
    ),
    "send_file_from_node": Expect(
        [
            line
            for i in range(3)
            for line in (
                f"job {i + 1}: dispy_send_file returned (0, 0)",
                R(rf"  outdir/result{i}\.txt: result {i} from {NODE}"),
                f"  outdir/abs{i}.txt: absolute {i}",
            )
        ],
        outputs={
            **{
                f"outdir/result{i}.txt": R(rf"result {i} from {NODE}\n")
                for i in range(3)
            },
            **{f"outdir/abs{i}.txt": R(rf"absolute {i}\n") for i in range(3)},
        },
        # A file a job sends is no line on the script's stderr (dispy's said
        # nothing; dispynb's said "saved ... from job N" at INFO, its default).
        not_in_stderr=("saved ",),
    ),
    "send_file_to_node": Expect(
        [
            "send params.txt to local-0: 0",
            "send conf/settings.txt to local-0: 0",
            "send params.txt to local-1: 0",
            "send conf/settings.txt to local-1: 0",
            "local-0 read params.txt: params for local-0",
            "local-0 read conf/settings.txt: settings for local-0",
            "local-1 read params.txt: params for local-1",
            "local-1 read conf/settings.txt: settings for local-1",
        ]
    ),
    "node_methods": Expect(
        [
            "node_jobs(local-0): [1, 2]",
            "submitted: [1, 2]",
            "node_jobs(local-1): []",
            "set_node_cpus(local-0, 1): 1",
            "local-0 cpus: 1",
            "deallocate_node(local-0): 0",
            "jobs ran on: ['local-1']",
            "allocate_node(local-0): 0",
            "pinned job after allocate_node ran on: local-0",
            "close_node(local-1): 0",
            "nodes: ['local-0']",
            "jobs ran on: ['local-0']",
        ]
    ),
    "dispy_names": Expect(
        [
            "MsgTimeout: 30 30",
            "NodePort: True",
            "DispyNode: 10.1.2.3 alpha 4",
            "pulse_interval: 1.0, ping_interval: None, poll_interval: None",
            "cluster_status set: True, job_status: None",
            "ClusterStatus: True, jobs_pending 3, end_time None",
            *status_table(2, pending=3),
            "end_time after wait: True, cpu_time >= 1.5: True",
            "close_node(local-1): 0",
            "jobs ran on: ['local-0']",
            "Initialized: ['local-0', 'local-1']",
            "recover_jobs(): []",
        ],
        stderr=(R(r"no recovery file \(_dispy_\*\)"),),
    ),
    "resetup_node": Expect(
        [
            "before resetup: [('first.txt', 1, 'contents of first.txt')]",
            "resetup_node: 0",
            "nodes as it is set up again: 1",
            "initialized again: True",
            "after resetup: [('second.txt', 2, 'contents of second.txt')]",
            "Closed before close: 0",
            "Closed after close: 1",
        ]
    ),
    "callbacks": Expect(
        [
            "job-0: status 11, result 0",
            "job-1: status 11, result 2",
            "job-2: status 11, result 4",
            "job-3: status 9, result None",
            "  exception: ValueError: bad input 3",
            "job-4: status 11, result 8",
            "job_status saw: ['job-0 11', 'job-1 11', 'job-2 11', 'job-3 9', "
            "'job-4 11']",
            "callback threads: 1, main thread among them: False",
        ],
        # reference 3.8: exceptions in callbacks are caught and logged
        stderr=(R(r"this callback failure is logged, not fatal"),),
    ),
    "web_monitor": Expect(
        ["results: [0, 3, 6, 9]"],
        # shown without any logging set up: the monitor needs its token
        stderr=(R(r"web monitor of 'compute' at http://127\.0\.0\.1:\d+/\?token=\S+"),),
    ),
    "exit_jobs": Expect(
        [
            "before exit: 'data before exit', status 11",
            "at exit: 'data sent at exit', status 11",
            "send_file at exit: 0",
            "at exit: 'file sent at exit', status 11",
        ],
        # a file read for a node as the interpreter exits: no traceback
        not_in_stderr=("Traceback", "never retrieved"),
    ),
    "old_keywords": Expect(
        [
            "job: local-0, 9",
            "close_node: 0",
            "allocate_node: 0",
            "job after allocate_node: local-0, 16",
            "dispy_port job: local-0, 25",
        ]
    ),
    "fixed_bugs": Expect(
        [
            "unpicklable result: status 9, exception names the type: True",
            R(
                r"unpicklable argument: (error \w+, names the type: True"
                r"|status (8|9), explained: True)"
            ),
            R(r"lambda: (works: 42|refused: \w+)"),
            R(r"bound method: (works: 42|refused: \w+)"),
            "exception in with block propagates: True",
            "recover_jobs is callable: True",
        ]
    ),
}


@pytest.fixture(scope="module")
def local() -> Iterator[LocalCluster]:
    """Two local nodes (local-0, local-1) with 2 CPUs each, shared by the programs."""
    with LocalCluster(nodes=2, cpus=2) as cluster:
        yield cluster


class Nodes(Protocol):
    """What a program needs of its nodes: their specs and their secret."""

    secret: str

    def node_specs(self) -> list[str]: ...


@dataclass
class DispynodeCommandLines:
    """Two ``dispynb-node`` processes started with dispynode's own options only."""

    secret: str
    procs: list[subprocess.Popen[bytes]]
    ports: list[int]

    def node_specs(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]


#: The node's log line once it listens: "... serving 2 CPUs on 127.0.0.1:PORT ...".
SERVING = re.compile(r"serving \d+ CPUs? on 127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def dispynodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """local-0 and local-1 as dispy's documentation starts dispynode: ``-i``,
    ``--node_port`` (0: a free one), ``--name``, ``-c``, ``-s``, ``-d``,
    ``--dest_path_prefix``, ``--clean``, ``--zombie_interval``, ``--msg_timeout``,
    ``--max_file_size``, ``--daemon``; nothing of dispynb's own."""
    directory = tmp_path_factory.mktemp("dispynodes")
    # hex: a urlsafe secret can begin with '-', and `-s -xyz` is then refused
    secret = secrets.token_hex(32)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for index in range(2):
            log = directory / f"node-{index}.log"
            argv = node_command(
                "-i", "127.0.0.1", "--node_port", "0",
                "--name", f"local-{index}", "-c", "2", "-s", secret, "-d",
                "--dest_path_prefix", str(directory / f"dest-{index}"), "--clean",
                "--zombie_interval", "10", "--msg_timeout", "10",
                "--max_file_size", "100m", "--daemon",
            )  # fmt: skip
            with open(log, "wb") as handle:
                procs.append(
                    subprocess.Popen(
                        argv,
                        env=node_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            logs.append(log)
        ports = [
            _wait_serving(proc, log) for proc, log in zip(procs, logs, strict=True)
        ]
        yield DispynodeCommandLines(secret, procs, ports)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(NODE_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_serving(proc: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + NODE_WAIT
    while (match := SERVING.search(log.read_text(errors="replace"))) is None:
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.02)
    return int(match.group(1))


def run_program(name: str, local: Nodes, cwd: Path) -> tuple[int, str, str]:
    """Run programs/<name>.py in ``cwd`` against ``local``: (exit code, out, err)."""
    shutil.copy2(PROGRAMS / f"{name}.py", cwd)
    for data in EXPECTED[name].files:
        shutil.copy2(FILES / data, cwd / data)
    env = {
        k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)
    }
    env[SECRET_ENV] = local.secret
    env["DISPYNB_TEST_NODES"] = ",".join(local.node_specs())
    env["PYTHONUNBUFFERED"] = "1"
    try:
        proc = subprocess.run(
            [sys.executable, f"{name}.py"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROGRAM_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{name}.py did not finish in {PROGRAM_TIMEOUT} s\n"
            f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n"
            f"{_tail(_text(exc.stderr))}"
        )
    return proc.returncode, _text(proc.stdout), _text(proc.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _matches(expected: str | re.Pattern[str], line: str) -> bool:
    if isinstance(expected, str):
        return line == expected
    return expected.fullmatch(line) is not None


def _show(expected: str | re.Pattern[str]) -> str:
    return expected if isinstance(expected, str) else f"/{expected.pattern}/"


def check_stdout(out: str, expected: list[str | re.Pattern[str]]) -> list[str]:
    """Compare the non-blank lines of ``out`` with ``expected``; describe mismatches.

    Reports the first mismatching lines (later ones are often consequences) and the
    line counts; the caller shows the whole output.
    """
    lines = [line for line in out.splitlines() if line.strip()]
    problems = []
    for index in range(max(len(lines), len(expected))):
        want = expected[index] if index < len(expected) else None
        got = lines[index] if index < len(lines) else None
        if want is None or got is None or not _matches(want, got):
            problems.append(
                f"line {index + 1}: expected {_show(want) if want else '(nothing)'}\n"
                f"         got      {got if got is not None else '(nothing)'}"
            )
            if len(problems) == 3:
                break
    if len(lines) != len(expected):
        problems.append(f"expected {len(expected)} lines, got {len(lines)}")
    return problems


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_program(name: str, local: LocalCluster, tmp_path: Path) -> None:
    check_program(name, local, tmp_path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_program_on_dispynode_command_lines(
    name: str, dispynodes: Nodes, tmp_path: Path
) -> None:
    """The same program, its nodes started as dispy's documentation starts
    dispynode (`dispynodes`), not by LocalCluster."""
    check_program(name, dispynodes, tmp_path)


def check_program(name: str, local: Nodes, tmp_path: Path) -> None:
    """Run programs/<name>.py against ``local`` and compare with `EXPECTED`."""
    expect = EXPECTED[name]
    code, out, err = run_program(name, local, tmp_path)
    problems = []
    if code != 0:
        problems.append(f"exit code {code}")
    problems += check_stdout(out, expect.stdout)
    problems += [
        f"stderr has no match for /{pattern.pattern}/"
        for pattern in expect.stderr
        if not pattern.search(err)
    ]
    problems += [f"stderr has {text!r}" for text in expect.not_in_stderr if text in err]
    for path, pattern in expect.outputs.items():
        target = tmp_path / path
        if not target.is_file():
            problems.append(f"{path} was not saved in the program's directory")
        elif not pattern.fullmatch(target.read_text()):
            problems.append(f"{path} holds {target.read_text()!r}")
    if problems:
        pytest.fail(
            f"{name}.py:\n"
            + "\n".join(problems)
            + f"\n--- stdout ---\n{out}--- stderr ---\n{_tail(err)}"
        )


def test_every_program_has_expectations() -> None:
    programs = sorted(path.stem for path in PROGRAMS.glob("*.py"))
    assert programs == sorted(EXPECTED)


def test_data_files_exist() -> None:
    for name, expect in EXPECTED.items():
        for data in expect.files:
            assert (FILES / data).is_file(), f"{name} needs files/{data}"
    assert _sha1("alpha.txt") != _sha1("beta.txt")  # node_setup tells them apart
