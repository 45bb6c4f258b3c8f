"""``%%dispy --on NODE``: a cell's jobs run only on the nodes it names; ``--depends``;
``%dispy local --pulse``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.magics import DispyMagics
from tests import jobs
from tests.jupyter.shell import magic_shell

pytestmark = pytest.mark.slow

WHERE = "def where(x):\n    return dispy_node_name\n"


@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    """A shell with two local nodes of one CPU each, reporting their load often."""
    with magic_shell("--nodes 2 --cpus 1 --pulse 0.5") as shell:
        yield shell


def session(ip: InteractiveShell):  # type: ignore[no-untyped-def]
    return ip.magics_manager.registry[DispyMagics.__name__].session


def addresses(ip: InteractiveShell) -> list[str]:
    return session(ip).local.node_specs()


def run_where(ip: InteractiveShell, on: str, count: int = 6) -> list[str]:
    with capture_output():
        ip.run_cell_magic("dispy", f'--over "range({count})" --into placed {on}', WHERE)
    return ip.user_ns["placed"].results


def test_without_on_jobs_may_use_every_node(ip):
    assert set(run_where(ip, "", 8)) <= {"local-0", "local-1"}


@pytest.mark.parametrize("index", [0, 1])
def test_on_name_runs_every_job_on_that_node(ip, index):
    assert run_where(ip, f"--on local-{index}") == [f"local-{index}"] * 6


def test_on_host_port_runs_on_that_node(ip):
    second = addresses(ip)[1]

    assert run_where(ip, f"--on {second}") == ["local-1"] * 6


def test_on_repeated_uses_both_nodes_and_the_run_knows_only_them(ip):
    results = run_where(ip, "--on local-0 --on local-1", 8)

    assert set(results) <= {"local-0", "local-1"}
    assert len(results) == 8


def test_on_a_local_nodes_name_before_the_node_was_heard(ip, monkeypatch):
    """``%dispy local --nodes 2`` then at once ``--on local-1``: the panel learns a
    node's name only once the node answers it (late on a loaded machine), and the
    run was refused, "not a node in use; the nodes are: local-0 (...),
    127.0.0.1:PORT" (seen in a helper's run). The names LocalCluster gave its
    nodes serve until then."""
    monkeypatch.setattr(session(ip).panel, "rows", list)  # none heard yet

    assert run_where(ip, "--on local-1") == ["local-1"] * 6


def test_on_unknown_node_fails_naming_the_known_nodes(ip):
    first, second = addresses(ip)
    ip.user_ns.pop("placed", None)

    with pytest.raises(UsageError) as error:
        run_where(ip, "--on elsewhere:9711")

    message = str(error.value)
    assert "--on elsewhere:9711: not a node in use" in message
    assert f"local-0 ({first})" in message and f"local-1 ({second})" in message
    assert "placed" not in ip.user_ns  # nothing ran


def test_on_a_host_with_two_nodes_is_ambiguous(ip):
    with pytest.raises(UsageError, match=r"--on 127\.0\.0\.1 matches 2 nodes"):
        run_where(ip, "--on 127.0.0.1")


def test_depends_sends_a_data_file_the_setup_reads(ip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.txt").write_text("fox 3\ndog 30\n")
    ip.run_cell(
        "def read_table():\n"
        "    global table\n"
        "    with open('table.txt') as f:\n"
        "        table = dict((w, int(n)) for w, n in (l.split() for l in f))\n"
    )

    with capture_output():
        ip.run_cell_magic(
            "dispy",
            "--over \"['fox', 'dog', 'cat']\" --into looked --setup read_table "
            "--depends \"['table.txt']\" --on local-1",
            "def look(word):\n    return table.get(word, 0), dispy_node_name\n",
        )

    assert ip.user_ns["looked"].results == [
        (3, "local-1"),
        (30, "local-1"),
        (0, "local-1"),
    ]


def test_status_shows_the_nodes_load(ip):
    run_where(ip, "", 2)  # a run: its cluster's pulses report the load

    text = repr(ip.run_line_magic("dispy", "status"))

    assert text.count("memory_free=") == 2
    assert "memory_free=-" not in text  # reported by the nodes when runs connect


def test_pulse_is_only_for_local_and_nodes(ip):
    assert session(ip).options == {"pulse_interval": 0.5}  # what runs are given
    with pytest.raises(UsageError, match="--pulse is for"):
        ip.run_line_magic("dispy", "status --pulse 1")


def test_run_submit_node_pins_jobs_and_names_the_nodes_when_unknown(ip):
    from dispynb import JobCluster
    from dispynb.jupyter.run import Run

    def where(x: int) -> str:
        return dispy_node_name  # type: ignore[name-defined]  # noqa: F821

    local = session(ip).local
    run = Run(name="pinned")
    with JobCluster(where, nodes=local, **run.callbacks()) as cluster:
        run.attach(cluster)
        # JobCluster() returns once one node is set up; submit_node needs the other.
        jobs.wait_until(lambda: len(cluster.status().nodes) == 2)
        for x in range(4):
            run.submit_node("local-1", x)
        with pytest.raises(ValueError, match=r"'elsewhere' is not a node") as error:
            run.submit_node("elsewhere", 9)
        assert run.wait(timeout=10, echo=False)

    assert "local-0 (127.0.0.1:" in str(error.value)
    assert run.results == ["local-1"] * 4
    assert len(run.jobs) == 4


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("127.0.0.1:notaport", "node port must be an integer from 1 to 65535"),
        ("127.0.0.1:99999", "node port must be an integer from 1 to 65535"),
        (":9711", "has no host before the port"),
    ],
)
def test_a_malformed_node_address_is_a_usage_error_that_keeps_the_nodes(ip, host, says):
    """A typo in `%dispy nodes HOST:PORT` says what is wrong with the address, not
    'cannot use ... nodes[0]: ...' with a hint to check that dispynb-node runs
    there; and it does not first stop the nodes in use (it stopped them: the next
    cell then started new local nodes)."""
    before = addresses(ip)
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", f"nodes 127.0.0.2:9711 {host}")
    message = str(raised.value)
    assert message.startswith(f"%dispy nodes {host}: ") and says in message, message
    assert "nodes[" not in message, message
    assert addresses(ip) == before and session(ip).nodes is session(ip).local


def test_nodes_that_do_not_answer_keep_the_nodes_in_use(ip, held_port):
    """`%dispy nodes HOST ...` where no node answers names every host that failed
    and the fix, and keeps the notebook's nodes, which the next cell runs on (it
    stopped them first, leaving the notebook with no nodes at all)."""
    before = addresses(ip)
    ports = [held_port(), held_port()]  # nothing listens there

    with pytest.raises(MagicError) as raised:
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:{ports[0]} 127.0.0.1:{ports[1]}")

    message = str(raised.value)
    for port in ports:
        assert message.count(f"cannot connect to 127.0.0.1:{port}") == 1, message
    assert "start nodes here with %dispy local" in message, message
    assert f"still in use: local nodes {', '.join(before)}" in message, message
    assert session(ip).nodes is session(ip).local
    assert addresses(ip) == before and not session(ip).local.exited()
    placed = run_where(ip, "", 4)
    assert len(placed) == 4 and set(placed) <= {"local-0", "local-1"}, placed


def test_stop_while_new_local_nodes_start_keeps_the_nodes_in_use(ip, monkeypatch):
    """Stop while `%dispy local` checks its new nodes (the probe waits for them):
    the new nodes stop, the notebook keeps the nodes it had and says so (it had
    stopped them first: 'did not finish; no nodes')."""
    from dispynb.jupyter.errors import MagicInterrupted
    from dispynb.local import LocalCluster

    before = addresses(ip)
    started: list[int] = []

    def stopped_while_probing(computation: Any, nodes: Any, **options: Any) -> Any:
        assert isinstance(nodes, LocalCluster)
        started.extend(nodes.pids)
        raise KeyboardInterrupt

    monkeypatch.setattr(session(ip), "cluster_factory", stopped_while_probing)
    with pytest.raises(MagicInterrupted) as raised:
        ip.run_line_magic("dispy", "local --nodes 1 --cpus 1")
    monkeypatch.undo()

    assert str(raised.value) == (
        f"Interrupted: %dispy local did not finish; local nodes {', '.join(before)}"
    )
    assert started and not any(psutil.pid_exists(pid) for pid in started)
    assert addresses(ip) == before and not session(ip).local.exited()
    placed = run_where(ip, "", 4)
    assert len(placed) == 4 and set(placed) <= {"local-0", "local-1"}, placed


def test_nodes_with_an_unreachable_host_use_the_others_and_say_it_once(
    ip, tmp_path, caplog, held_port
):
    """`%dispy nodes GOOD BAD`, BAD not answering: the notebook uses GOOD, says
    once which host failed and how to fix it, and does not list BAD as in use;
    later cells run on GOOD without logging BAD again (before, BAD was kept:
    listed as in use, and every cell logged 'node ... cannot be used')."""
    state = session(ip)
    local = state.local
    secret = tmp_path / "secret"
    secret.write_text(local.secret)
    secret.chmod(0o600)
    good, bad = addresses(ip)[0], f"127.0.0.1:{held_port()}"
    try:
        state.local = None  # keep the local nodes: attach to one by address
        with capture_output() as captured:
            ip.run_line_magic("dispy", f"nodes {good} {bad} --secret-file {secret}")
        assert captured.stdout == f"dispynb: nodes {good}\n"
        assert f"not using {bad}: cannot connect to {bad}" in captured.stderr
        assert "check that dispynb-node runs there" in captured.stderr
        assert bad not in repr(state.status())
        caplog.clear()
        placed = run_where(ip, "", 4)
        assert placed == ["local-0"] * 4
        assert not [r for r in caplog.records if bad in r.getMessage()], caplog.text
    finally:
        state.local = local
        state.nodes = local


def test_nodes_of_another_notebook_say_how_to_share_nodes(ip):
    """`%dispy nodes` at the address another notebook's `%dispy local` printed (its
    nodes have a random secret): the cell names the node once, says how a notebook
    gives a secret (not a script's secret= or secret_file=), and how to share nodes
    between notebooks; the nodes in use stay."""
    from dispynb.jupyter.magicsupport import SHARE_HINT

    before = addresses(ip)
    other = before[0]  # refuses this session's (absent) secret alike

    with pytest.raises(MagicError) as raised:
        ip.run_line_magic("dispy", f"nodes {other}")

    message = str(raised.value)
    first, second = message.splitlines()[:2]
    assert first.startswith(f"%dispy nodes: cannot use {other}: the client's proof")
    assert first.count(other) == 1, first
    assert "--secret-file FILE on the %dispy nodes line" in first, first
    assert "secret_file=" not in message, message
    assert second == SHARE_HINT
    assert f"still in use: local nodes {', '.join(before)}" in message, message
    assert addresses(ip) == before
