"""The nodes a notebook uses: ``%dispy local`` nodes that exited, ``%dispy status``,
``%dispy nodes`` attaching to running nodes (with a secret file, over TLS)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.magics import DispyMagics
from dispynb.jupyter.run import Run
from tests import jobs
from tests.jupyter.shell import cell
from tests.nodeproc import running_node
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow


def test_a_local_node_that_died_says_to_run_dispy_local_again():
    """The news of a %dispy local node that exited (a warning in the cell) said
    'start a new LocalCluster (an Executor without nodes starts its own)', a
    program's fix, not the notebook's."""
    import os
    import signal

    from dispynb.jupyter import session

    local = session._local_nodes(2, 1)  # as %dispy local --nodes 2 --cpus 1
    try:
        os.kill(local.pids[1], signal.SIGKILL)
        host, port = local.addresses[1]
        jobs.wait_until(lambda: local.exit_reason(host, port) is not None)
        reason = local.exit_reason(host, port)
        assert reason.endswith(
            "has exited (killed by SIGKILL): its jobs cannot run there any more; "
            "run %dispy local again for new nodes"
        ), reason
    finally:
        local.close()


def test_a_cell_runs_on_the_local_nodes_left_when_one_exited(ip):
    """One of two %dispy local nodes killed (the out-of-memory killer): the next
    cell runs on the other, saying which exited and how to get it back, as a dispy
    cluster goes on with the nodes it has. It stopped, saying 'no job was sent',
    while %dispy status listed the other node as idle. ``--on`` the exited node
    says so."""
    import os
    import signal

    from dispynb.jupyter.session import Session

    magics = ip.magics_manager.registry[DispyMagics.__name__]
    kept, magics.session = magics.session, Session()
    try:
        with capture_output():
            ip.run_line_magic("dispy", "local --nodes 2 --cpus 1")
        local = magics.session.local
        os.kill(local.pids[1], signal.SIGKILL)
        jobs.wait_until(lambda: local.exited() != [])
        _, _, err = cell(
            ip, '--over "range(4)" --into survived', "def where(x):\n    return x\n"
        )
        host, port = local.addresses[1]
        assert (
            f"dispynb: 1 of the 2 local nodes has exited: {host}:{port} (status -9); "
            "running on the other 1: run %dispy local again for new nodes"
        ) in err, err
        run = ip.user_ns["survived"]
        assert run.results == [0, 1, 2, 3], run.df
        assert list(run.df["status"]) == ["Finished"] * 4
        with pytest.raises(UsageError, match=f"node {host}:{port} .*has exited"):
            cell(ip, f'--over "[1]" --on {host}:{port}', "def f(x):\n    return x\n")
    finally:
        magics.session.close()
        magics.session = kept


def test_a_launched_node_that_exited_leaves_the_cell_the_others():
    """One of two launched nodes (%dispy ssh, %dispy slurm) ended: a launcher's
    addresses are those still running, so the cell said 'the nodes have exited',
    with one running. It runs on the other, saying so. The panel marks the one
    that ended gone, as it does a local node (its ``exited()`` item said ``name:
    why``, no address: no row of its own)."""
    import os
    import signal

    from dispynb.jupyter.session import Session
    from tests.deploy.test_launcher import LocalProcesses

    session = Session()
    launcher = LocalProcesses()
    session.local = session.nodes = launcher
    try:
        launcher.start(2)
        launcher.wait_for(2, timeout=30)
        dead = launcher._launched[0]
        assert dead.handle is not None and dead.node is not None
        os.kill(dead.handle.pid, signal.SIGKILL)
        jobs.wait_until(lambda: launcher.exited() != [])
        address = f"{dead.node.host}:{dead.node.port}"
        assert session.exited_nodes() == {address}
        gone = [row for row in session.rows() if row.address == address]
        assert [row.gone for row in gone] == [True], session.rows()
        assert session.exited_error() is None
        news = session.exited_news()
        assert news.startswith(f"1 of the 2 {launcher.kind} nodes has exited: "), news
        assert "; running on the other 1: " in news, news
        run = Run.map(abs, [-1, -2, -3], nodes=session.nodes, progress="none")
        assert run.results == [1, 2, 3], run.df
    finally:
        session.close()


def test_dispy_status_lists_a_local_node_that_exited_before_the_probe_met_it():
    """A %dispy local node killed as the nodes start, before the session's probe
    reached it, is listed gone in %dispy status (the where-line names it): it was
    left out, as if there were one node fewer."""
    import os
    import signal

    from dispynb.jupyter import session as sessions
    from dispynb.jupyter.session import Session

    def start() -> object:  # as %dispy local --nodes 2, one killed at once
        local = sessions._local_nodes(2, 1)
        os.kill(local.pids[1], signal.SIGKILL)
        jobs.wait_until(lambda: local.exited() != [])
        return local

    session = Session()
    try:
        session._start_then_replace(start, {}, "%dispy local", hint="")
        host, port = session.local.addresses[1]
        text = repr(session.status())
    finally:
        session.close()
    assert f"  local-1 {host}:{port} gone cpus=0" in text, text
    assert "local-0 " in text and " idle " in text, text


def test_a_finished_run_a_variable_holds_stays_in_status_after_new_nodes():
    """As the guide says: a finished run stays in %dispy status as long as a
    variable holds it. New nodes (%dispy local again) dropped every run from it.
    (A session of its own: this module's shell keeps its nodes.)"""
    from dispynb.jupyter.session import Session

    session = Session()
    try:
        session.start_local(1, 1)
        kept = Run.map(abs, [-1, -2], nodes=session.nodes, progress="none")
        session.add_run(kept)
        session.start_local(1, 1)  # %dispy local again: new nodes
        assert session.runs == [kept], session.runs
        assert "<Run 'abs' 2/2 done" in repr(session.status())
    finally:
        session.close()


def test_magic_line_status_lists_nodes_and_runs(ip):
    cell(ip, '--over "[1, 2]" --into counted', "def one(x):\n    return 1\n")

    status = ip.run_line_magic("dispy", "status")

    text = repr(status)
    assert text.startswith("local nodes 127.0.0.1:")
    assert "local-0" in text
    assert "<Run 'counted' 2/2 done" in text
    html = status._repr_html_()
    assert "local-0" in html and "counted" in html


def test_dispy_status_after_dispy_close_lists_no_node():
    """``%dispy status`` after ``%dispy close`` said "no nodes: use %dispy local
    ..." and then listed the closed nodes, as gone, for 30 s. The notebook has no
    nodes: none is listed (the panel keeps them, saying %dispy close stopped
    them), and the runs a variable holds stay. (A session of its own: this
    module's shell keeps its nodes.)"""
    from dispynb.jupyter.session import Session

    session = Session()
    try:
        session.start_local(1, 1)
        kept = Run.map(abs, [-1, -2], nodes=session.nodes, progress="none")
        session.add_run(kept)
        assert "local-0" in repr(session.status())
        session.close(ended=True)  # %dispy close
        status = session.status()
    finally:
        session.close()
    text = repr(status)
    assert text.splitlines()[0].startswith("no nodes: use %dispy local"), text
    assert "local-0" not in text and "127.0.0.1" not in text, text
    assert "<Run 'abs' 2/2 done" in text, text
    assert "local-0" not in status._repr_html_()


def test_magic_line_nodes_attaches_with_secret_file(ip, tmp_path):
    magics = ip.magics_manager.registry[DispyMagics.__name__]
    local = magics.session.local
    secret = tmp_path / "secret"
    secret.write_text(local.secret)
    secret.chmod(0o600)
    spec = local.node_specs()[0]
    try:
        magics.session.local = None  # keep the local node: attach to it by address
        with capture_output() as captured:
            ip.run_line_magic("dispy", f"nodes {spec} --secret-file {secret}")
        assert captured.stdout == f"dispynb: nodes {spec}\n"
        cell(ip, '--over "[3]" --into remote', "def triple(x):\n    return 3 * x\n")
        assert ip.user_ns["remote"].results == [9]
    finally:
        magics.session.local = local
        magics.session.nodes = local


def test_nodes_without_a_secret_say_how_a_notebook_gives_it(ip, tmp_path):
    """The node's answer names secret= and DISPYNB_SECRET, a program's ways, and
    the magic's hint only 'the same secret': it now says how the line gives it,
    --secret-file FILE."""
    with (
        running_node(tmp_path, secret="a-node-secret-0123456789abcdef") as node,
        pytest.raises(MagicError) as raised,
    ):
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:{node.port}")
    message = str(raised.value)
    assert (
        "\ncheck that dispynb-node runs there with the same secret (a copy of its "
        "file, given with --secret-file FILE) and TLS options, or start nodes "
        "here with %dispy local\n"
    ) in message, message
    assert message.endswith("still in use: local nodes " + local_spec(ip)), message


def local_spec(ip: InteractiveShell) -> str:
    return ip.magics_manager.registry[DispyMagics.__name__].session.local.node_specs()[
        0
    ]


@pytest.mark.slow
def test_magic_line_nodes_attaches_over_tls(ip, tmp_path):
    magics = ip.magics_manager.registry[DispyMagics.__name__]
    local, nodes = magics.session.local, magics.session.nodes
    cert, key = make_cert(tmp_path)
    with running_node(tmp_path / "node", "--certfile", cert, "--keyfile", key) as node:
        try:
            magics.session.local = None  # keep the local node for the other tests
            ip.run_line_magic(
                "dispy",
                f"nodes {node.spec} --secret-file {node.secret_file} --cafile {cert}",
            )
            cell(
                ip, '--over "[4]" --into tls_run', "def square(x):\n    return x * x\n"
            )
            assert ip.user_ns["tls_run"].results == [16]
        finally:
            magics.session.local, magics.session.nodes = local, nodes
    assert "with TLS" in node.log_text()
