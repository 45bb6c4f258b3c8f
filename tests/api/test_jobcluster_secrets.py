"""`JobCluster` against real node processes on 127.0.0.1: secrets (right, wrong,
missing, from an argument, a file or the environment) and TLS (a trusted node, a
plain client, a node from another CA, mutual TLS refusing the client)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import AuthenticationError, TransportError
from tests import jobs
from tests.jobs import WAIT
from tests.nodeproc import running_node
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow

#: A refusal must be reported within this many seconds.
PROMPT = 5.0


@pytest.fixture
def no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No secret from the environment: only what a test passes counts."""
    monkeypatch.delenv("DISPYNB_SECRET", raising=False)
    monkeypatch.delenv("DISPYNB_SECRET_FILE", raising=False)


def marker_setup(path: Path):
    """A setup function that creates ``path`` on the node: proof that code ran."""

    def setup() -> None:
        with open(path, "w") as handle:
            handle.write("setup ran")

    return setup


def test_jobcluster_right_secret_runs_setup_on_node(local, tmp_path):
    """The control for the wrong-secret tests: this setup does leave its marker."""
    marker = tmp_path / "setup-ran"
    with JobCluster(jobs.square, nodes=local, setup=marker_setup(marker)) as cluster:
        assert cluster.submit(2)() == 4
    assert marker.read_text() == "setup ran"


def test_jobcluster_wrong_secret_raises_authentication_error_and_runs_nothing(
    local, tmp_path
):
    marker = tmp_path / "setup-ran"
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="secret"):
        JobCluster(jobs.square, nodes=local, secret="wrong", setup=marker_setup(marker))
    assert time.monotonic() - started < PROMPT
    assert not marker.exists()


def test_jobcluster_missing_secret_raises_authentication_error_and_runs_nothing(
    local, tmp_path, no_secret_env
):
    marker = tmp_path / "setup-ran"
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="secret"):
        JobCluster(
            jobs.square,
            nodes=local.node_specs(),  # the addresses only: no secret with them
            secret=None,
            setup=marker_setup(marker),
        )
    assert time.monotonic() - started < PROMPT
    assert not marker.exists()


@pytest.mark.parametrize("how", ["argument", "secret_file", "environment"])
def test_jobcluster_explicit_node_started_from_cli_runs_jobs(
    tmp_path, monkeypatch, no_secret_env, how
):
    with running_node(tmp_path / "node", name="cli-node", cpus=2) as node:
        if how == "argument":
            options = {"secret": node.secret}
        elif how == "secret_file":
            options = {"secret_file": str(node.secret_file)}
        else:
            monkeypatch.setenv("DISPYNB_SECRET", node.secret)
            options = {}
        with JobCluster(jobs.square, nodes=[node.spec], **options) as cluster:
            submitted = [cluster.submit(i) for i in range(20)]
            assert cluster.wait(timeout=WAIT)
            nodes = cluster.status().nodes
        assert [job.result for job in submitted] == [i * i for i in range(20)]
        assert [(n.ip_addr, n.port, n.name, n.cpus) for n in nodes] == [
            ("127.0.0.1", node.port, "cli-node", 2)
        ]
    assert node.secret not in node.log_text()


def test_jobcluster_tls_node_with_cafile_runs_jobs(tmp_path, no_secret_env):
    cert, key = make_cert(tmp_path)
    args = ("--certfile", cert, "--keyfile", key)
    with running_node(tmp_path / "node", *args) as node:
        with JobCluster(
            jobs.echo, nodes=[node.spec], secret=node.secret, cafile=cert
        ) as cluster:
            job = cluster.submit("over tls")
            assert job.wait(timeout=WAIT)
        assert (job.status, job.result, job.stdout) == (
            DispyJob.Finished,
            "over tls",
            "out over tls\n",
        )
    assert "with TLS" in node.log_text()


def test_jobcluster_plain_client_to_tls_node_fails_cleanly(tmp_path, no_secret_env):
    cert, key = make_cert(tmp_path)
    marker = tmp_path / "setup-ran"
    args = ("--certfile", cert, "--keyfile", key)
    with running_node(tmp_path / "node", *args) as node:
        started = time.monotonic()
        with pytest.raises(TransportError) as info:
            JobCluster(
                jobs.square,
                nodes=[node.spec],
                secret=node.secret,
                setup=marker_setup(marker),
            )
        assert time.monotonic() - started < PROMPT
        # Told so by the node, in dispynb's protocol: not a guess.
        assert str(info.value) == (
            f"{node.spec}: the node uses TLS, this client does not: give the "
            "client cafile= (the CA that signed the node's certificate), and "
            "certfile= and keyfile= if the node checks clients' certificates "
            "(--cafile)"
        )
        # The node keeps serving proper clients.
        with JobCluster(
            jobs.square, nodes=[node.spec], secret=node.secret, cafile=cert
        ) as cluster:
            assert cluster.submit(3)() == 9
    assert not marker.exists()


def test_jobcluster_tls_client_to_plain_node_says_the_node_has_no_tls(
    tmp_path, no_secret_env
):
    cert, _key = make_cert(tmp_path)
    with running_node(tmp_path / "node") as node:
        with pytest.raises(TransportError) as info:
            JobCluster(jobs.square, nodes=[node.spec], secret=node.secret, cafile=cert)
        # It read "connection ... failed: ; is dispynb-node running there?".
        assert str(info.value).startswith(
            f"node {node.spec} answered without TLS: it does not use TLS; connect "
            "without cafile=, certfile= and keyfile=, or start the node with "
            "--certfile and --keyfile"
        )
        with JobCluster(jobs.square, nodes=[node.spec], secret=node.secret) as cluster:
            assert cluster.submit(3)() == 9


def test_jobcluster_tls_client_rejects_node_cert_from_other_ca(tmp_path, no_secret_env):
    cert, key = make_cert(tmp_path, "node")
    other, _ = make_cert(tmp_path, "other")
    marker = tmp_path / "setup-ran"
    args = ("--certfile", cert, "--keyfile", key)
    with (
        running_node(tmp_path / "node", *args) as node,
        pytest.raises(TransportError, match=r"(?i)certificate"),
    ):
        JobCluster(
            jobs.square,
            nodes=[node.spec],
            secret=node.secret,
            cafile=other,
            setup=marker_setup(marker),
        )
    assert not marker.exists()


@pytest.mark.parametrize("client_cert", ["none", "from another CA"])
def test_jobcluster_mutual_tls_node_refusing_the_client_says_why(
    tmp_path, no_secret_env, client_cert
):
    cert, key = make_cert(tmp_path, "node")
    client_ca, _ = make_cert(tmp_path, "client")  # the only CA the node trusts
    other, other_key = make_cert(tmp_path, "other")
    given = {"certfile": other, "keyfile": other_key} if client_cert != "none" else {}
    args = ("--certfile", cert, "--keyfile", key, "--cafile", client_ca)
    with (
        running_node(tmp_path / "node", *args) as node,
        pytest.raises(TransportError) as info,
    ):
        JobCluster(
            jobs.square, nodes=[node.spec], secret=node.secret, cafile=cert, **given
        )
    message = str(info.value)
    assert f"node {node.spec} closed the TLS connection during the handshake" in message
    # The node's TLS alert said why: no guess.
    if given:
        assert "it does not trust this client's certificate: the node's --cafile" in (
            message
        )
        assert f"signed the client's certificate {other!r}" in message
        assert "UNKNOWN_CA" in message
    else:
        assert (
            "it requires a client certificate: give the client certfile= and "
            "keyfile=" in message
        )
        assert "CERTIFICATE_REQUIRED" in message
    assert "may" not in message
