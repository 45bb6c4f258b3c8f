"""SharedJobCluster through a real dispynb-scheduler: results, output, exceptions,
several client processes (users) at once, per-user credentials and revocation."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispynb import JobCluster, LocalCluster, SharedJobCluster
from dispynb import config as dispy_config
from dispynb.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosedError,
)
from dispynb.job import JobStatus
from dispynb.protocol.messages import Error, JobCancel, JobResults
from dispynb.secret import read_secret_file
from tests.ports import PortHolder
from tests.sharedsched.harness import (
    TIMED_CLIENT,
    SchedulerProcess,
    add_user,
    env_for,
    finish_client,
    raw_reply,
    scheduler_cli,
    start_client,
)

pytestmark = pytest.mark.slow


def compute(n: int) -> int:
    print(f"job {n}")
    if n == 3:
        raise ValueError(f"bad {n}")
    return n * n


def test_results_output_and_exceptions_as_job_cluster(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    with SharedJobCluster(
        compute, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        jobs = [cluster.submit(n) for n in range(6)]
        results = [job() for job in jobs]
        assert results == [0, 1, 4, None, 16, 25]
        assert [job.stdout for job in jobs] == [f"job {n}\n" for n in range(6)]
        assert jobs[3].status == JobStatus.Terminated
        assert "ValueError: bad 3" in jobs[3].exception
        assert all(
            job.status == JobStatus.Finished for job in jobs if job is not jobs[3]
        )
        deadline = time.monotonic() + 20  # the second node may still be set up
        while len(cluster.status().nodes) < 2:
            assert time.monotonic() < deadline, cluster.status()
            time.sleep(0.05)
        assert [node.cpus for node in cluster.status().nodes] == [2, 2]  # real nodes


def test_two_client_processes_share_the_nodes(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    procs = [
        start_client(
            TIMED_CLIENT,
            scheduler.address,
            str(users[name]),
            "12",
            "0.05",
            cwd=tmp_path,
            name=name,
        )
        for name in ("alice", "bob")
    ]
    for proc in procs:
        out = finish_client(proc)
        assert out["results"] == list(range(12))
        assert set(out["statuses"]) == {int(JobStatus.Finished)}
    log = scheduler.log_text()
    assert "user 'alice' connected" in log and "user 'bob' connected" in log


def test_a_user_cannot_cancel_another_users_job(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Alice, with her own credential, names Bob's computation and job: refused,
    and Bob's job, still running then, ends normally."""

    def held(n: int, go: str) -> int:
        import os
        import time

        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
        return n

    go = tmp_path / "go"
    with SharedJobCluster(
        held, scheduler_host=scheduler.address, secret_file=str(users["bob"])
    ) as cluster:
        job = cluster.submit(7, str(go))  # runs until the attack was answered
        comp_id = cluster._backend.driver.config.comp_id  # type: ignore[union-attr]

        attack = JobCancel(comp_id=comp_id, key=job._key or 0, attempt=1)
        refusal = raw_reply(
            scheduler.port, users["alice"], attack, until=Error, never=(JobResults,)
        )
        assert "alice" in refusal.message and "own computations" in refusal.message
        go.touch()
        assert job() == 7
        assert job.status == JobStatus.Finished


def test_unknown_user_and_wrong_token_are_refused(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    token = read_secret_file(users["alice"]).rsplit(b":", 1)[1]
    for credential in (
        b"dispynb-user:mallory:" + token,
        b"dispynb-user:alice:x" + token,
    ):
        with pytest.raises(AuthenticationError):
            SharedJobCluster(
                compute, scheduler_host=scheduler.address, secret=credential
            )
    with pytest.raises(ConfigurationError, match="credential"):
        SharedJobCluster(compute, scheduler_host=scheduler.address, secret="plain")


def test_a_scheduler_names_the_address_of_a_user_with_a_stale_credential(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """Its log line names the address (and port) of the user's client, as well
    as the user: before, the address alone ("from 127.0.0.1")."""
    token = read_secret_file(users["alice"]).rsplit(b":", 1)[1]
    with pytest.raises(AuthenticationError):
        SharedJobCluster(
            compute,
            scheduler_host=scheduler.address,
            secret=b"dispynb-user:alice:x" + token,
        )
    said = "it does not hold the credential this server has for user 'alice'"
    scheduler.wait_for_log(said)
    line = re.search(
        r"rejected connections from 127\.0\.0\.1:\d+ \(client 'alice'\): the "
        "client's proof is wrong: " + said,
        scheduler.log_text(),
    )
    assert line, scheduler.log_text()


def test_revoked_user_loses_its_session_and_cannot_come_back(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    with SharedJobCluster(
        compute, scheduler_host=scheduler.address, secret_file=str(users["bob"])
    ) as cluster:
        assert cluster.submit(2)() == 4
        done = scheduler_cli(
            "user", "revoke", "bob", "--users", str(tmp_path / "users")
        )
        assert done.returncode == 0, done.stderr
        scheduler.wait_for_log("user 'bob' was revoked")
        scheduler.wait_for_log("bob/compute: its user was revoked: closed")
    with pytest.raises(AuthenticationError):
        SharedJobCluster(
            compute, scheduler_host=scheduler.address, secret_file=str(users["bob"])
        )
    # alice is unaffected
    with SharedJobCluster(
        compute, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        assert cluster.submit(5)() == 25


def test_user_add_writes_private_files(tmp_path: Path) -> None:
    users = {name: add_user(tmp_path, name) for name in ("alice", "bob")}
    for path in (tmp_path / "users", users["alice"]):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_secret_file(users["alice"]).startswith(b"dispynb-user:alice:")
    listed = scheduler_cli("user", "list", "--users", str(tmp_path / "users"))
    assert listed.stdout.split() == ["alice", "bob"]
    again = scheduler_cli("user", "add", "alice", "--users", str(tmp_path / "users"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_a_file_that_does_not_match_its_digest_is_refused(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """Files are shared between users by digest: a user cannot plant content under
    the digest of another user's file."""
    from dispynb.protocol.files import digest_of
    from dispynb.protocol.messages import FilePut

    victim = digest_of(b"bob's data\n")

    plant = FilePut(digest=victim, size=5)
    refusal = raw_reply(
        scheduler.port, users["alice"], plant, [memoryview(b"evil\n")], until=Error
    )
    assert "does not match its digest" in refusal.message


def test_dispys_older_scheduler_node_keyword_names_the_scheduler(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """``SharedJobCluster(compute, scheduler_node=HOST, scheduler_port=PORT)``, as
    dispy up to 4.10 and its documentation write it, reaches the scheduler (before:
    TypeError, an unexpected keyword); given with a different scheduler_host it is
    refused, naming both."""
    with SharedJobCluster(
        compute,
        scheduler_node="127.0.0.1",
        scheduler_port=scheduler.port,
        secret_file=str(users["alice"]),
    ) as cluster:
        assert cluster.submit(6)() == compute(6)
    with pytest.raises(ConfigurationError, match="scheduler_node="):
        SharedJobCluster(
            compute,
            scheduler_node="127.0.0.1",
            scheduler_host="127.0.0.2",
            secret_file=str(users["alice"]),
        )


def test_dispy_port_names_the_schedulers_port_as_dispynb_scheduler_p_pairs_it(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dispy's scripts start ``dispyscheduler.py -p P`` and their programs give
    ``dispy_port=P`` (or set ``dispy.config.DispyPort = P``), with a
    ``scheduler_host`` that names no port: with ``dispynb-scheduler -p P`` in
    its place the cluster reaches it, as a JobCluster's ``dispy_port`` pairs
    with ``dispynb-node -p P`` (before: it connected to port 9712, refused)."""
    with SharedJobCluster(
        compute,
        scheduler_host="127.0.0.1",
        dispy_port=scheduler.port,
        secret_file=str(users["alice"]),
    ) as cluster:
        assert cluster.submit(7)() == compute(7)
    monkeypatch.setattr(dispy_config, "DispyPort", scheduler.port)
    with SharedJobCluster(
        compute, scheduler_host="127.0.0.1", secret_file=str(users["alice"])
    ) as cluster:
        assert cluster.submit(8)() == compute(8)


def test_no_scheduler_listening_is_named_as_the_scheduler(
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    held_port: PortHolder,
) -> None:
    """A SharedJobCluster started before its dispynb-scheduler (dispy's first
    step is often that one): the error asks whether the scheduler runs there, not
    a node (before: "is dispynb-node running there?")."""
    port = held_port()  # nothing listens there
    with pytest.raises(ConnectionClosedError) as raised:
        SharedJobCluster(
            compute,
            scheduler_host="127.0.0.1",
            scheduler_port=port,
            secret_file=str(users["alice"]),
        )
    message = str(raised.value)
    assert message.startswith(f"cannot connect to 127.0.0.1:{port}"), message
    assert message.endswith("is dispynb-scheduler running there?"), message
    # Said once, by the error (not also by a "cannot be used" warning).
    assert not [r for r in caplog.records if "cannot be used" in r.message]


@pytest.mark.usefixtures("allow_error_logs")  # the nodes' refusal is logged
def test_a_users_credential_does_not_open_the_nodes(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """The node secret stays with the scheduler: a user who reaches the nodes
    directly with the credential that works at the scheduler is refused there,
    and nothing runs; through the scheduler the same credential runs the job."""
    with pytest.raises(AuthenticationError, match="secret"):
        JobCluster(compute, nodes=nodes.node_specs(), secret_file=str(users["alice"]))
    with SharedJobCluster(
        compute, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        assert cluster.submit(4)() == 16


#: A ``dispynb-scheduler`` process that has imported everything and waits for a
#: line on stdin before running its command: released together, they race.
_READY_CLI = (
    "import sys; from schedserver.cli import main; sys.stdin.readline(); "
    "sys.exit(main(sys.argv[1:]))"
)


def _race(*commands: list[str]) -> None:
    """Run ``dispynb-scheduler COMMAND`` for each command, released at once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _READY_CLI, *command],
            env=env_for(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err


# 7 races of 4 CLI processes and 7 listings: 35 Pythons importing the scheduler's
# CLI (about 0.4 s of CPU each), 35 to 63 s on 2 busy CPUs: over the 60 s default.
@pytest.mark.timeout(180)
def test_concurrent_user_adds_and_revokes_lose_nothing(tmp_path: Path) -> None:
    """Two admins (or a script) running ``user add`` at once: no user is lost."""
    users = str(tmp_path / "users")
    for round_ in range(6):
        names = [f"u{round_}-{n}" for n in range(4)]
        _race(*(
            ["user", "add", name, "--users", users, "-o", str(tmp_path / name)]
            for name in names
        ))  # fmt: skip
        listed = scheduler_cli("user", "list", "--users", users).stdout.split()
        assert set(names) <= set(listed), f"round {round_}: {listed}"
    _race(*(["user", "revoke", f"u0-{n}", "--users", users] for n in range(4)))
    listed = scheduler_cli("user", "list", "--users", users).stdout.split()
    assert len(listed) == 5 * 4 and not [n for n in listed if n.startswith("u0-")]


def test_a_scheduler_started_before_its_users_file_says_so_and_takes_it(
    tmp_path: Path, nodes: LocalCluster
) -> None:
    """``--users FILE`` that does not exist yet (a typo, or no user added yet):
    one warning naming the file and the command, and the users added after
    connect."""
    scheduler = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret).start()
    try:
        scheduler.wait_for_log(f"the users file {tmp_path / 'users'} does not exist")
        assert "dispynb-scheduler user add NAME" in scheduler.log_text()
        credential = add_user(tmp_path, "carol")
        with SharedJobCluster(
            compute, scheduler_host=scheduler.address, secret_file=str(credential)
        ) as cluster:
            assert cluster.submit(4)() == 16
    finally:
        scheduler.stop()
