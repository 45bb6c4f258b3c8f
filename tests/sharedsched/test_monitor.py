"""``dispynb-scheduler --httpd``: the operator's web monitor, for real.

A scheduler process started with ``--httpd``; its page and JSON API fetched over
HTTP with the token of its ``--httpd_token_file``: nodes, users (CPU share,
queued, running, quota) and each user's jobs; a wrong token, Host or Origin, and
a POST without the CSRF token, refused; revoking a user from it ends the user's
session and jobs."""

from __future__ import annotations

import re
import resource
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dispynb import LocalCluster, NodeAllocate, SharedJobCluster
from dispynb.job import JobStatus
from tests.browser import chromium_page, requires_chromium
from tests.hostile.tools import lowest_free_descriptor
from tests.httpd.client import MonitorClient
from tests.jobs import wait_until
from tests.nodeproc import running_node
from tests.ports import held_ports
from tests.sharedsched.harness import SchedulerProcess, scheduler_cli
from tests.sharedsched.nodeuse import by_name

pytestmark = pytest.mark.slow

WAIT = 20.0
URL = re.compile(r"web monitor at http://127\.0\.0\.1:(\d+)/ ")


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@dataclass
class Site:
    """Where the scheduler's monitor is (what `MonitorClient` needs)."""

    port: int
    token: str


@contextmanager
def monitor(
    tmp_path: Path, nodes: LocalCluster, *args: str
) -> Iterator[tuple[SchedulerProcess, MonitorClient]]:
    """A scheduler of ``nodes`` with its web monitor (and ``args``), and a client
    of the monitor."""
    token_file = tmp_path / "monitor.token"
    with SchedulerProcess(
        tmp_path,
        nodes.node_specs(),
        nodes.secret,
        args=(
            "--httpd", "--httpd_port", "0", "--httpd_token_file", str(token_file),
            *args,
        ),
    ) as sched:  # fmt: skip
        sched.wait_for_log("web monitor at")
        match = URL.search(sched.log_text())
        assert match, sched.log_text()
        token = token_file.read_text().strip()
        yield sched, MonitorClient(Site(int(match[1]), token))  # type: ignore[arg-type]


@pytest.fixture
def monitored(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[tuple[SchedulerProcess, MonitorClient]]:
    with monitor(tmp_path, nodes, "--max_queued", "50") as both:
        yield both


def wait_for(fetch: Callable[[], Any], check: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = fetch()
        if check(value):
            return value
        assert time.monotonic() < deadline, value
        time.sleep(0.1)


def test_page_and_api_show_nodes_users_and_their_jobs(
    monitored: tuple[SchedulerProcess, MonitorClient],
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    sched, client = monitored
    page = client.get(f"/?token={client.server.token}", auth=False)
    assert page.status == 302 and page.cookies  # the cookie, then the clean URL
    cookie = page.cookies[0].split(";", 1)[0]
    html = client.get("/", auth=False, headers={"Cookie": cookie})
    assert html.status == 200 and b"dispynb-scheduler" in html.body
    script = client.get("/static/scheduler.js", auth=False, headers={"Cookie": cookie})
    assert script.status == 200 and b"/api/scheduler" in script.body

    def snapshot() -> dict[str, Any]:
        reply = client.get("/api/scheduler")
        assert reply.status == 200, reply.body
        return reply.json()  # type: ignore[no-any-return]

    snap = wait_for(snapshot, lambda s: sum(n["alive"] for n in s["nodes"]) == 2)
    assert sorted(n["id"] for n in snap["nodes"]) == sorted(nodes.node_specs())
    assert [n["cpus"] for n in snap["nodes"]] == [2, 2] and snap["cpus"] == 4
    assert [u["name"] for u in snap["users"]] == ["alice", "bob"]
    with SharedJobCluster(
        nap, scheduler_host=sched.address, secret_file=str(users["alice"])
    ) as cluster:
        jobs = [cluster.submit(30.0) for _ in range(6)]  # 4 CPUs: 2 wait
        snap = wait_for(
            snapshot,
            lambda s: (
                [u["running"] for u in s["users"]] == [4, 0]
                and sum(
                    j["state"] == "running"
                    for c in s["computations"]
                    for j in c["jobs"]
                )
                == 4
            ),
        )
        alice = snap["users"][0]
        assert alice["queued"] == 2 and alice["cpu_share"] == 1.0
        assert alice["max_queued"] == 50 and len(alice["sessions"]) == 1
        (comp,) = snap["computations"]
        assert (comp["user"], comp["name"], comp["client"]) == (
            "alice",
            "nap",
            "connected",
        )
        assert sorted(j["key"] for j in comp["jobs"]) == sorted(j._key for j in jobs)
        assert {j["node"] for j in comp["jobs"] if j["state"] != "queued"} == set(
            nodes.node_specs()
        )
        assert sum(n["jobs"] for n in snap["nodes"]) == 4

        # Refusals: no token, a wrong one, another Host, another Origin, no CSRF.
        api = "/api/scheduler"
        assert client.get(api, auth=False).status == 403
        wrong = {"Authorization": "Token " + "y" * 43}
        assert client.get(api, auth=False, headers=wrong).status == 403
        assert client.get(api, headers={"Host": "evil.example:80"}).status == 403
        port = client.server.port
        assert client.get(api, headers={"Host": f"evil.example:{port}"}).status == 403
        assert client.get(api, headers={"Origin": "http://evil.example"}).status == 403
        revoke = "/api/users/alice/revoke"
        refused = client.request("POST", revoke)  # no CSRF token
        assert refused.status == 403
        # Where the token is: this API's route (it named the client monitor's).
        assert (
            "send the value that GET /api/scheduler returned"
            in (refused.json()["reason"])
        )
        assert not any(job.done() for job in jobs)
        csrf = client.get(api).headers["x-csrf-token"]
        nobody = "/api/users/nobody/revoke"
        assert (
            client.request("POST", nobody, headers={"X-CSRF-Token": csrf}).status == 404
        )

        # Revoking alice: her session ends and her jobs stop.
        done = client.request("POST", revoke, headers={"X-CSRF-Token": csrf})
        assert done.status == 200 and done.json() == {"revoked": "alice"}
        assert cluster.wait(timeout=WAIT)
        assert all(job.status != JobStatus.Finished for job in jobs)
        snap = wait_for(snapshot, lambda s: not s["computations"])
        assert [(u["name"], u["revoked"]) for u in snap["users"]] == [("bob", False)]
    listed = scheduler_cli("user", "list", "--users", str(sched.directory / "users"))
    assert listed.stdout.split() == ["bob"]
    sched.wait_for_log("revoked from the web monitor")


def test_refused_requests_not_logged_yet_are_counted_when_it_stops(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """Refused requests are logged as counts once a minute: those of the last
    minute are logged when the scheduler stops, not lost."""
    with monitor(tmp_path, nodes) as (sched, _client):
        port = int(URL.search(sched.log_text())[1])  # type: ignore[index]
        request = f"GET /api/scheduler HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        for _ in range(5):  # without the token
            with socket.create_connection(("127.0.0.1", port), 10) as sock:
                sock.sendall(request.encode())
                assert sock.recv(1 << 16).startswith(b"HTTP/1.1 403")
    # The first is logged at once, the other 4 counted.
    # (it said "from 1 source(s)")
    assert "refused web requests: 4 more from 1 source in" in sched.log_text()


def test_the_token_is_never_logged_and_kept_in_its_file(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """The URL with its token was logged at INFO, into the service's journal or
    shared log file, readable by others. Now the token goes only to
    ``--httpd_token_file`` (mode 600, kept across restarts); without it (and no
    terminal) the log says how to get one."""
    with monitor(tmp_path, nodes) as (sched, client):
        token_file = tmp_path / "monitor.token"
        token = client.server.token
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert client.get("/api/scheduler").status == 200
        sched.stop()
        sched.start()  # a restart reads it again: the same URL works
        sched.wait_for_log("web monitor at", 2)
        assert token_file.read_text().strip() == token
        port = int(URL.findall(sched.log_text())[-1])
        assert MonitorClient(Site(port, token)).get("/api/scheduler").status == 200  # type: ignore[arg-type]
    log = sched.log_text()
    assert token not in log and "token=" not in log, log
    assert f"(its token is in {token_file})" in log
    plain = SchedulerProcess(
        tmp_path / "plain", nodes.node_specs(), nodes.secret,
        args=("--httpd", "--httpd_port", "0"),
    )  # fmt: skip
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "users").write_bytes((tmp_path / "users").read_bytes())
    (tmp_path / "plain" / "users").chmod(0o600)
    plain.start()
    try:
        plain.wait_for_log("web monitor at")
    finally:
        plain.stop()
    assert "token=" not in plain.log_text()
    assert "give --httpd_token_file FILE" in plain.log_text()


def test_a_terminal_gets_the_url_with_its_token_once(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """Started on a terminal, as Jupyter is: the URL with the token is printed
    there, once, and the log line names the address only."""
    import os
    import pty
    import subprocess
    import sys

    from tests.sharedsched.harness import env_for

    main, side = pty.openpty()
    command = [
        sys.executable, "-m", "schedserver", "--users", str(tmp_path / "users"),
        "-p", "0", "--httpd", "--httpd_port", "0", "-n", nodes.node_specs()[0],
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        env=env_for(DISPYNB_SECRET=nodes.secret),
        stdin=subprocess.DEVNULL,
        stdout=side,
        stderr=side,
    )
    os.close(side)
    seen = b""
    try:
        deadline = time.monotonic() + WAIT
        while b"serving" not in seen:
            assert time.monotonic() < deadline, seen
            try:
                seen += os.read(main, 1 << 16)
            except OSError:  # the process ended: its side closed
                raise AssertionError(seen) from None
    finally:
        proc.terminate()
        proc.wait(WAIT)
        os.close(main)
    text = seen.decode(errors="replace")
    printed = re.findall(
        r"web monitor: open (http://127\.0\.0\.1:\d+/\?token=\S+)", text
    )
    assert len(printed) == 1, text
    assert text.count("token=") == 1, text


def test_a_token_file_others_may_read_is_refused(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    token_file = tmp_path / "monitor.token"
    token_file.write_text("a-token-others-have-read-0123\n")
    token_file.chmod(0o644)
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "--users", str(tmp_path / "users"), "-p", "0",
        "--httpd", "--httpd_port", "0", "--httpd_token_file", str(token_file),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"chmod 600 {token_file}" in done.stderr
    # which option's file: it said only "secret file ... is accessible"
    assert done.stderr.startswith(
        "dispynb-scheduler: --httpd_token_file: secret file "
    ), done.stderr
    token_file.write_text("")  # emptied: a new one is what it needs, not a secret
    token_file.chmod(0o600)
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "--users", str(tmp_path / "users"), "-p", "0",
        "--httpd", "--httpd_port", "0", "--httpd_token_file", str(token_file),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"dispynb-scheduler: --httpd_token_file {token_file}: the file is empty: "
        "remove it to have a new token written"
    )


def test_a_monitor_on_another_address_needs_https(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "--users", str(tmp_path / "users"), "-p", "0",
        "--httpd", "--httpd_host", "0.0.0.0", "--httpd_port", "0",
    )  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "0.0.0.0" in line and "certfile" in line


@pytest.mark.browser
@requires_chromium
def test_the_page_in_a_browser_shows_the_scheduler_and_revokes(
    monitored: tuple[SchedulerProcess, MonitorClient], users: dict[str, Path]
) -> None:
    """Chromium opens the URL the scheduler logged: nodes, users and alice's jobs
    appear; names are text, never markup; Revoke (confirmed) revokes bob."""
    from playwright.sync_api import expect

    sched, client = monitored
    origin = f"http://127.0.0.1:{client.server.port}"
    with (
        SharedJobCluster(
            nap, scheduler_host=sched.address, secret_file=str(users["alice"])
        ) as cluster,
        chromium_page() as page,
    ):
        job = cluster.submit(30.0)
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "request",
            lambda req: req.url.startswith(origin) or problems.append(req.url),
        )
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{origin}/?token={client.server.token}")
        assert page.url == f"{origin}/"  # the token left the address bar
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#nodes tbody tr")).to_have_count(2)
        expect(page.locator("#users tbody tr")).to_have_count(2)
        expect(page.locator("#computations h3")).to_contain_text("alice / nap")
        expect(page.locator("#computations td", has_text="running")).to_have_count(1)
        bob = page.locator("#users tbody tr", has_text="bob")
        bob.get_by_role("button", name="Revoke").click()
        expect(page.locator("#message")).to_have_text("revoked bob")
        expect(page.locator("#users tbody tr")).to_have_count(1)  # bob is gone
        assert not problems, problems
        cluster.cancel(job)
    listed = scheduler_cli("user", "list", "--users", str(sched.directory / "users"))
    assert listed.stdout.split() == ["alice"]


@contextmanager
def squeezed(pid: int) -> Iterator[None]:
    """Process ``pid`` may open no more descriptors (prlimit(2): its soft limit at
    its lowest free one) until the block ends."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_descriptor(pid), hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.browser
@requires_chromium
def test_the_page_shows_a_node_whose_load_is_unknown(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """A node out of descriptors reports its figures unknown (None): the page
    still renders every node, saying the unknown CPU figure is unknown. It threw
    (``null.toFixed``) and showed nothing more from then on."""
    from playwright.sync_api import expect

    with (
        monitor(tmp_path, nodes, "--pulse_interval", "0.2") as (sched, client),
        SharedJobCluster(
            nap, scheduler_host=sched.address, secret_file=str(users["alice"])
        ) as cluster,
    ):

        def snapshot() -> dict[str, Any]:
            return client.get("/api/scheduler").json()  # type: ignore[no-any-return]

        # Its computation on the nodes has them report their figures: one job for
        # each of the 4 CPUs puts it on both.
        jobs = [cluster.submit(0.5) for _ in range(4)]
        assert [job() for job in jobs] == [0.5] * 4
        wait_for(snapshot, lambda s: all(n["avail"] for n in s["nodes"]))
        with squeezed(nodes.pids[0]), chromium_page() as page:
            wait_for(snapshot, lambda s: any(n["avail"][0] is None for n in s["nodes"]))
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"error: {exc}"))
            port, token = client.server.port, client.server.token
            page.goto(f"http://127.0.0.1:{port}/?token={token}")
            expect(page.locator("#connection")).to_have_text("live")
            expect(page.locator("#nodes tbody tr")).to_have_count(2)
            expect(page.locator("#users tbody tr")).to_have_count(2)
            expect(page.locator("#nodes td", has_text="unknown")).to_have_count(1)
            assert not problems, problems


def test_the_api_says_why_a_node_is_down(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """A script watching the scheduler (``GET /api/scheduler`` with ``Authorization:
    Token``) learns why a node is not up, not only that: one never reached, and one
    stopped (and not back), each with its reason; the nodes up say nothing."""
    with (
        held_ports() as hold,
        running_node(tmp_path / "n", secret=nodes.secret) as stopping,
    ):
        absent = f"127.0.0.1:{hold()}"
        args = ("-n", absent, "-n", stopping.spec)
        with monitor(tmp_path, nodes, *args) as (_, client):

            def snapshot() -> dict[str, Any]:
                snap = client.get("/api/scheduler").json()
                return {node["id"]: node for node in snap["nodes"]}

            wait_for(snapshot, lambda s: s[stopping.spec]["alive"])
            assert stopping.stop() == 0
            snap = wait_for(snapshot, lambda s: "not back" in s[stopping.spec]["down"])
            down = snap[stopping.spec]["down"]
            assert "is shutting down (SIGTERM)" in down, down
            assert "is dispynb-node running there?" in down, down
            assert "is dispynb-node running there?" in snap[absent]["down"], snap
            assert not snap[absent]["alive"]
            for spec in nodes.node_specs():
                assert snap[spec]["alive"] and snap[spec]["down"] == "", snap[spec]


class FirstOnly(NodeAllocate):
    """All of ``local-0``'s CPUs, none of any other node's."""

    def allocate(
        self, cluster: Any, ip_addr: str, name: str, cpus: int, **kw: Any
    ) -> int:
        return cpus if name == "local-0" else 0


@contextmanager
def managed_nodes(
    address: str, users: dict[str, Path], nodes: LocalCluster
) -> Iterator[dict[str, str]]:
    """Alice's exclusive=True cluster (declined: no --exclusive_users) with one
    node limited to 1 CPU and the other closed, and Bob's, whose NodeAllocate
    declines the second node; yields each node's id by name."""
    first, second = nodes.names
    with (
        SharedJobCluster(
            nap, scheduler_host=address, secret_file=str(users["alice"]),
            exclusive=True,
        ) as alice,
        SharedJobCluster(
            nap, scheduler_host=address, secret_file=str(users["bob"]),
            nodes=[FirstOnly("*")],
        ) as bob,
    ):  # fmt: skip
        wait_until(lambda: sorted(by_name(alice)) == [first, second])
        wait_until(lambda: sorted(by_name(bob)) == [first])
        ids = {
            name: f"{node.ip_addr}:{node.port}" for name, node in by_name(alice).items()
        }
        assert alice.set_node_cpus(first, 1) == 1
        assert alice.close_node(second) == 0
        yield ids


def test_the_api_shows_each_computations_node_limits_and_closed_nodes(
    monitored: tuple[SchedulerProcess, MonitorClient],
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    """What a client did with its nodes is the operator's to see too: a node
    limited (set_node_cpus), one closed (close_node), one its NodeAllocate
    declined, an exclusive=True declined. Before, the API had none of it."""
    sched, client = monitored
    first, second = nodes.names

    def computations() -> dict[str, dict[str, Any]]:
        snap = client.get("/api/scheduler").json()
        return {comp["user"]: comp for comp in snap["computations"]}

    with managed_nodes(sched.address, users, nodes) as ids:
        comps = wait_for(
            computations,
            lambda c: c["alice"]["nodes_closed"] and c["bob"]["nodes_declined"],
        )
        alice, bob = comps["alice"], comps["bob"]
        assert alice["limits"] == {ids[first]: 1}, alice
        assert alice["nodes_closed"] == [ids[second]], alice
        assert alice["nodes_declined"] == alice["nodes_undecided"] == []
        assert (alice["exclusive"], alice["exclusive_declined"]) == (False, True)
        assert bob["nodes_declined"] == [ids[second]], bob
        assert (bob["limits"], bob["nodes_closed"]) == ({}, []), bob
        assert (bob["exclusive"], bob["exclusive_declined"]) == (False, False)
        users = client.get("/api/scheduler").json()["users"]
        # --exclusive_users not given: nobody may (see test_exclusive.py)
        assert [(u["name"], u["exclusive"]) for u in users] == [
            ("alice", False),
            ("bob", False),
        ]


@pytest.mark.browser
@requires_chromium
def test_the_page_shows_each_computations_node_limits_and_closed_nodes(
    monitored: tuple[SchedulerProcess, MonitorClient],
    nodes: LocalCluster,
    users: dict[str, Path],
) -> None:
    """The operator's page says, under each computation, which of its nodes its
    client limited, closed or declined, by node name and address."""
    from playwright.sync_api import expect

    sched, client = monitored
    first, second = nodes.names
    with (
        managed_nodes(sched.address, users, nodes) as ids,
        chromium_page() as page,
    ):
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.goto(f"http://127.0.0.1:{client.server.port}/?token={client.server.token}")
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#computations ul.node-uses li")).to_have_text(
            [
                f"{first} ({ids[first]}): at most 1 of its jobs at once "
                "(set_node_cpus)",
                f"{second} ({ids[second]}): closed (close_node), until allocate_node",
                "exclusive=True declined (its user is not in --exclusive_users): "
                "runs shared",
                f"{second} ({ids[second]}): declined by its NodeAllocate",
            ]
        )
        assert not problems, problems


def test_the_api_says_which_users_may_run_exclusive_clusters(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """``--exclusive_users alice``: the operator sees it per user."""
    with monitor(tmp_path, nodes, "--exclusive_users", "alice") as (_, client):
        snap = client.get("/api/scheduler").json()
    assert [(u["name"], u["exclusive"]) for u in snap["users"]] == [
        ("alice", True),
        ("bob", False),
    ]
