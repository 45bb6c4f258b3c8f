"""What goes wrong around the Dask engine's jobs, each said clearly: no scheduler at
the address given, node settings Dask cannot honour, a setup failing on a worker
(named with the user's file and line); and ``import dispynb`` loads no Dask.
Runs as test_dask.py does (see its docstring).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dispynb.job import JobStatus
from tests.backends.daskclient import (
    run,
)
from tests.multihost.netns import Network

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

pytest.importorskip("distributed")


WRONG_PORT_PROGRAM = """
import socket
import threading

import dispynb.backends._dasknodes as dasknodes


def compute(n):
    return n


def serve(server, http):
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)
        if http:  # an HTTP server answers what Dask sends with an error status
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\n\\r\\n")


def main(args):
    dasknodes.HANDSHAKE_TIMEOUT = 3.0  # the test's patience, not the user's 20 s
    with socket.socket() as server:  # like the dashboard's port: no Dask there
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(
            target=serve, args=(server, args["server"] == "http"), daemon=True
        ).start()
        address = "127.0.0.1:%d" % server.getsockname()[1]
        start = time.monotonic()
        try:
            dispynb.JobCluster(compute, engine=DaskEngine(address))
            return {"error": None}
        except Exception as exc:
            return {
                "error": [type(exc).__name__, str(exc)],
                "seconds": time.monotonic() - start,
            }
"""


@pytest.mark.parametrize(
    ("server", "found"),
    [
        ("silent", "within 3 s: something listens there but does not speak Dask's"),
        (
            "http",
            ": something listens there but it is not a Dask scheduler: an HTTP "
            "server (it answered 'HTTP/1.1 400 Bad Request')",
        ),
    ],
)
def test_an_address_where_no_scheduler_answers_is_a_clear_error(
    net: Network, tmp_path: Path, server: str, found: str
) -> None:
    """``DaskEngine("host:8787")`` (the dashboard's port, or any server that is not
    a Dask scheduler): the connection opens but no handshake comes. Dask's client
    waited for it for ever and so did `JobCluster`; now it gives up within its
    bound with a `TransportError` that says what is likely wrong. A server that
    answers (an HTTP server) made Dask's client fail with ``MemoryError: Unable to
    allocate 3.07 EiB`` (the answer's first bytes read as a frame count); now the
    error names what answered."""
    out = run(net, tmp_path, WRONG_PORT_PROGRAM, server=server)
    assert out["error"] is not None, out
    kind, text = out["error"]
    assert kind == "TransportError", text
    assert text.startswith("no Dask scheduler answered at tcp://127.0.0.1:"), text
    assert found in text, text
    assert "8786" in text and "dashboard" in text
    assert out["seconds"] < 30


NOBODY_PROGRAM = """
import socket


def compute(n):
    return n


def main(args):
    import dispynb.backends._dasknodes as dasknodes

    # A patient setting: Dask's client retried the refused connection this long.
    dasknodes.CONNECT_TIMEOUT = dasknodes.HANDSHAKE_TIMEOUT = 60.0
    with socket.socket() as held:  # a port nothing listens on, as no scheduler runs
        held.bind(("127.0.0.1", 0))
        address = "tcp://127.0.0.1:%d" % held.getsockname()[1]
        start = time.monotonic()
        try:
            dispynb.JobCluster(compute, engine=DaskEngine(address))
            return {"error": None}
        except Exception as exc:
            return {
                "error": [type(exc).__name__, str(exc)],
                "address": address,
                "seconds": time.monotonic() - start,
            }
"""


def test_an_address_where_nothing_listens_says_to_start_the_scheduler(
    net: Network, tmp_path: Path
) -> None:
    """No Dask scheduler started yet (or a wrong port): Dask's client retries the
    refused connection, then says only "Timed out trying to connect to ... after
    10 s", which reads as a network problem; now the error says that nothing
    listens there and how to start the scheduler, without waiting for Dask's
    retries (its whole connect timeout, 10 s by default: 60 s here)."""
    out = run(net, tmp_path, NOBODY_PROGRAM)
    assert out["error"] is not None, out
    kind, text = out["error"]
    assert kind == "TransportError", text
    assert text == (
        f"cannot connect to the Dask scheduler at {out['address']}: nothing listens "
        "there (connection refused): start the scheduler (`dask scheduler` prints "
        "the address to give), or check the address (the scheduler's port is 8786 "
        "by default)"
    )
    assert out["seconds"] < 60, out  # the refusal, not the end of Dask's retries


def test_import_dispynb_loads_no_dask() -> None:
    """Dask stays an optional extra: ``import dispynb`` (and its engine seam) does
    not import it."""
    import subprocess
    import sys

    code = (
        "import sys, dispynb, dispynb.backends.base;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('dask', 'distributed')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_node_settings_dask_cannot_honour_are_one_clear_error() -> None:
    """``nodes=`` on Dask selects workers; a `NodeAllocate`'s per-node ``cpus``,
    ``setup_args`` or ``depends`` cannot apply to a Dask worker, so they are refused
    (before anything connects) instead of being ignored; its port selects."""
    from dispynb import JobCluster, NodeAllocate
    from dispynb.backends.dask import DaskEngine, _wanted_workers
    from dispynb.errors import NotSupportedError

    engine = DaskEngine("127.0.0.1:1")  # nothing listens: it must not be reached
    for spec, what in (
        (NodeAllocate("127.0.0.1", cpus=1), "cpus"),
        (NodeAllocate("127.0.0.1", setup_args=(1,)), "setup_args"),
        (NodeAllocate("127.0.0.1", depends=[__file__]), "depends"),
    ):
        with pytest.raises(NotSupportedError, match=f"with {what}: per-node"):
            JobCluster(abs, nodes=[spec], engine=engine)
    assert _wanted_workers([NodeAllocate("10.0.0.2", port=40123)]) == ["10.0.0.2:40123"]
    assert _wanted_workers(NodeAllocate("10.0.0.2")) == ["10.0.0.2"]


SETUP_LOG_PROGRAM = """
def compute(x):
    return x


def fails():
    raise RuntimeError("no data here")


class Logged(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(args):
    logged = Logged()
    logging.getLogger("dispynb").addHandler(logged)
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        try:
            dispynb.JobCluster(compute, engine=engine, setup=fails).close()
        except dispynb.errors.SetupError:
            pass
    return {"logged": logged.lines}
"""


def test_a_setup_failing_on_a_worker_is_logged_with_the_users_file_and_line(
    net: Network, tmp_path: Path
) -> None:
    """It was logged with the node's ``<dynamic-code>`` frames."""
    out = run(net, tmp_path, SETUP_LOG_PROGRAM)
    setup = [line for line in out["logged"] if "setup failed on Dask worker" in line]
    assert setup, out["logged"]
    assert "<dynamic-code>" not in setup[0], setup[0]
    assert re.search(r'File ".*client-\w+\.py", line \d+, in fails', setup[0]), setup


SETUP_ON_A_NEW_WORKER_PROGRAM = """
from distributed import Client

MARKER = None


def setup():
    if os.path.exists(MARKER):
        raise RuntimeError("no data here")
    return 0


def compute(x):
    return x


def main(args):
    global MARKER
    MARKER = args["marker"]
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("dispynb").addHandler(handler)
    with local_cluster(workers=1) as dask_cluster, Client(dask_cluster) as client:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(compute, engine=engine, setup=setup) as cluster:
            assert cluster.submit(1)() == 1
            open(MARKER, "w").close()
            client.restart()  # the worker comes back: setup fails there now
            deadline = time.monotonic() + 30
            while not any("setup failed on Dask worker" in m for m in logged):
                assert time.monotonic() < deadline, logged
                time.sleep(0.05)
            job = cluster.submit(2)
            job()
            return {"status": int(job.status), "reason": job.exception}
"""


def test_a_job_on_a_worker_whose_setup_failed_names_the_users_file_and_line(
    net: Network, tmp_path: Path
) -> None:
    """The only worker came back and its setup failed: the job sent there ends
    Abandoned, its reason giving setup's traceback with the user's file and
    line, not the worker's ``<dynamic-code>``."""
    out = run(net, tmp_path, SETUP_ON_A_NEW_WORKER_PROGRAM, marker=str(tmp_path / "m"))
    reason = out["reason"]
    assert out["status"] == int(JobStatus.Abandoned), out
    assert reason.startswith("setup failed on Dask worker "), reason
    assert "<dynamic-code>" not in reason, reason
    assert re.search(r'File ".*client-\w+\.py", line \d+, in setup', reason), reason
    assert reason.rstrip().endswith("RuntimeError: no data here"), reason
