"""dispyscheduler's ``--cluster_certfile``/``--cluster_keyfile``: clients reach the
scheduler over TLS (checking its certificate with ``cafile=``), a plain client is
refused; ``--node_certfile`` and ``--node_keyfile`` towards nodes that check their
clients' certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import DispynbError
from tests.nodeproc import running_node
from tests.sharedsched.harness import SchedulerProcess, add_user, start_tls_scheduler
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow


def test_clients_reach_the_scheduler_over_tls(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    sched, cert = start_tls_scheduler(tmp_path, nodes.node_specs(), nodes.secret)
    try:
        with SharedJobCluster(
            abs,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            cafile=cert,
        ) as cluster:
            assert cluster.submit(-3)() == 3
        with pytest.raises(DispynbError):
            SharedJobCluster(
                abs, scheduler_host=sched.address, secret_file=str(users["bob"])
            )
    finally:
        sched.stop()


def test_the_scheduler_reaches_mutual_tls_nodes_with_its_own_certificate(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """dispyscheduler's ``--node_certfile``/``--node_keyfile`` (and ``--node_cafile``):
    a node that checks its clients' certificates (``--cafile``) takes the
    scheduler's; the scheduler checks the node's."""
    node_cert, node_key = make_cert(tmp_path, "node")
    sched_cert, sched_key = make_cert(tmp_path, "scheduler")
    with running_node(
        tmp_path / "node",
        "--certfile", node_cert, "--keyfile", node_key, "--cafile", sched_cert,
        cpus=2,
    ) as node:  # fmt: skip
        sched = SchedulerProcess(
            tmp_path,
            [node.spec],
            node.secret,
            args=(
                "--node_cafile", node_cert,
                "--node_certfile", sched_cert, "--node_keyfile", sched_key,
            ),
        )  # fmt: skip
        sched.start()  # waits for the node to be up
        try:
            with SharedJobCluster(
                abs, scheduler_host=sched.address, secret_file=str(users["alice"])
            ) as cluster:
                assert cluster.submit(-4)() == 4
        finally:
            sched.stop()


def test_a_tls_mismatch_names_the_schedulers_options_not_a_nodes(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """A user who forgets ``cafile=`` for a TLS scheduler, or gives it for a plain
    one, or the wrong CA, is told what the scheduler does and which of its options
    and the client's set it right: not a node's ``--certfile``."""
    other, _key = make_cert(tmp_path, "other")

    def refusal(sched: SchedulerProcess, **tls: str) -> str:
        with pytest.raises(DispynbError) as caught:
            SharedJobCluster(
                abs,
                scheduler_host=sched.address,
                secret_file=str(users["alice"]),
                **tls,
            )
        return str(caught.value)

    with_tls, cert = start_tls_scheduler(tmp_path, nodes.node_specs(), nodes.secret)
    try:
        plain_client = refusal(with_tls)
        wrong_ca = refusal(with_tls, cafile=other)
    finally:
        with_tls.stop()
    plain = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret).start()
    try:
        tls_client = refusal(plain, cafile=cert)
    finally:
        plain.stop()
    # The scheduler's own log names itself, not a node.
    assert "a client without TLS (this scheduler uses TLS)" in with_tls.log_text()
    assert "a TLS client (this scheduler does not use TLS)" in plain.log_text()
    for text in (plain_client, wrong_ca, tls_client):
        assert "node" not in text.replace("dispynb-node", ""), text
    assert (
        f"{with_tls.address}: dispynb-scheduler uses TLS (--cluster_certfile), "
        "this client does not: give the client cafile= (the CA that signed the "
        "scheduler's certificate)" in plain_client
    ), plain_client
    assert (
        "does dispynb-scheduler use TLS (--cluster_certfile), with a certificate "
        "that this client trusts (cafile)?" in wrong_ca
    ), wrong_ca
    assert (
        f"dispynb-scheduler {plain.address} answered without TLS: it does not use "
        "TLS; connect without cafile=, certfile= and keyfile=, or start "
        "dispynb-scheduler with --cluster_certfile and --cluster_keyfile"
    ) in tls_client, tls_client


def test_a_tls_mismatch_with_a_node_names_the_schedulers_node_options(
    tmp_path: Path,
) -> None:
    """A scheduler without --node_cafile for a TLS node (or with it for a plain
    one) logged the Python client's fix, ``give the client cafile=``: its admin
    has options, not keywords."""
    cert, key = make_cert(tmp_path, "node")
    with (
        running_node(tmp_path / "tls", "--certfile", cert, "--keyfile", key) as tls,
        running_node(tmp_path / "plain") as plain,
    ):
        told = {}
        for name, node, args in (
            ("plain scheduler", tls, ()),
            ("tls scheduler", plain, ("--node_cafile", cert)),
        ):
            directory = tmp_path / name.replace(" ", "-")
            directory.mkdir()
            add_user(directory, "alice")
            sched = SchedulerProcess(
                directory, [], node.secret, args=("-n", node.spec, *args)
            ).start()
            try:
                sched.wait_for_log(f"node {node.spec}:")
            finally:
                sched.stop()
            told[name] = sched.log_text()
    assert (
        "the node uses TLS, this client does not: give --node_cafile (the CA that "
        "signed the node's certificate), and --node_certfile and --node_keyfile if "
        "the node checks clients' certificates" in told["plain scheduler"]
    ), told["plain scheduler"]
    assert (
        "connect without --node_cafile, --node_certfile and --node_keyfile"
        in told["tls scheduler"]
    ), told["tls scheduler"]
    assert "cafile=" not in told["plain scheduler"] + told["tls scheduler"]
