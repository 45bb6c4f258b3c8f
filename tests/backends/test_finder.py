"""`NodeFinder`: which address a discovered node is reached at (the ext_host rule)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dispynb.backends.finder import NodeFinder, ping_targets, trusted_ext_spec
from dispynb.node import NodeAllocate


class FakeDiscovery:
    """Stands for `Discovery`: only the claimed ext addresses matter here."""

    def __init__(self, ext: dict[tuple[str, int], str]) -> None:
        self.ext = ext
        self.unsent: dict[str, str] = {}  # address: why its ping was not sent

    def ext_address(self, ip: str, port: int) -> str:
        return self.ext.get((ip, port), "")


def finder(
    specs: list[str], ext: dict[tuple[str, int], str]
) -> tuple[NodeFinder, list]:
    used: list[tuple[str, int, str]] = []
    found = NodeFinder(
        [NodeAllocate(s) for s in specs],
        lambda ip, port, spec: used.append((ip, port, spec.host)),
    )
    found._discovery = FakeDiscovery(ext)  # type: ignore[assignment]
    return found, used


@pytest.mark.parametrize(
    ("specs", "local", "loopback"),
    [
        (["*"], True, True),
        (["127.0.0.*"], True, True),
        (["10.1.0.*", "*"], True, True),
        (["10.1.0.*"], False, False),
        (["10.1.0.*"], True, False),  # no node on 127.0.0.1 would fit
        (["*"], False, False),  # a client with a secret: its nodes are elsewhere
    ],
)
def test_a_client_without_secret_pings_this_machine_too(
    specs: list[str], local: bool, loopback: bool
) -> None:
    """Nodes without a secret listen on loopback only: a client without one (dispy's
    default) also pings 127.0.0.1, where they answer, if such a node fits a spec."""
    targets = ping_targets([NodeAllocate(s) for s in specs], local=local)
    assert ("127.0.0.1" in targets) is loopback
    assert targets[0] != "127.0.0.1"  # the specs' networks are pinged as before


def test_without_ext_the_sender_address_is_used() -> None:
    nodes, used = finder(["10.1.0.*"], {})
    nodes._found("10.1.0.2", 9711, "n", 1)
    nodes._found("10.9.0.2", 9711, "other", 1)  # fits no spec
    assert used == [("10.1.0.2", 9711, "10.1.0.*")]


def test_ext_in_a_narrow_spec_is_used() -> None:
    nodes, used = finder(["*", "10.2.0.*"], {("10.1.0.2", 9711): "10.2.0.2"})
    nodes._found("10.1.0.2", 9711, "n", 1)
    assert used == [("10.2.0.2", 9711, "10.2.0.*")]


def test_ext_claim_under_bare_star_is_ignored_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nodes, used = finder(["*"], {("10.1.0.2", 9711): "192.0.2.66"})
    with caplog.at_level(logging.INFO, "dispynb.backends.finder"):
        nodes._found("10.1.0.2", 9711, "n", 1)
        nodes._found("10.1.0.2", 9711, "n", 1)
    assert used == [("10.1.0.2", 9711, "*")] * 2
    notes = [r.message for r in caplog.records if "192.0.2.66" in r.message]
    assert len(notes) == 1 and "fits no node spec narrower than '*'" in notes[0]


def test_ext_claim_outside_the_specs_is_ignored() -> None:
    # A node on 10.1.0.* claiming a third party's address gets no connection there.
    nodes, used = finder(["10.1.0.*"], {("10.1.0.2", 9711): "10.3.0.7"})
    nodes._found("10.1.0.2", 9711, "n", 1)
    assert used == [("10.1.0.2", 9711, "10.1.0.*")]


def test_ext_matches_addresses_not_claimed_names() -> None:
    assert trusted_ext_spec([NodeAllocate("node-*")], "10.2.0.2") is None
    assert trusted_ext_spec([NodeAllocate(" * ")], "10.2.0.2") is None
    spec = trusted_ext_spec([NodeAllocate("fd00:77::*")], "fd00:77::2")
    assert spec is not None and spec.host == "fd00:77::*"


def quiet_finder(ready: bool) -> NodeFinder:
    found = NodeFinder(
        [NodeAllocate("10.1.0.*")],
        lambda ip, port, spec: None,
        ready=lambda: ready,
        warn_after=0.01,
    )
    fake = FakeDiscovery({})
    fake.port = 9712  # type: ignore[attr-defined]
    found._discovery = fake  # type: ignore[assignment]
    return found


def test_no_node_warning_names_the_likely_causes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "dispynb.backends.finder"):
        asyncio.run(quiet_finder(False)._warn_if_no_node(["10.1.0.255"]))
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "no node found in 0.01 s of discovery" in message
    assert "pinged 10.1.0.255 on UDP port 9712; no node answered" in message
    assert "still waiting" in message
    for cause in (
        "no dispynb-node running",
        "--no-discovery",
        "127.0.0.1",
        "firewall dropping UDP 9712-9713",
        "nodes=[",
        # A newcomer's JobCluster(compute) on one machine, with no node started:
        "with LocalCluster() as local: JobCluster(..., nodes=local)",
    ):
        assert cause in message
    # A node with another secret answers discovery (it carries no secret), then
    # refuses the client saying so: that is never why no node answered.
    assert "Not a wrong secret: discovery carries none" in message


def test_no_node_warning_when_nodes_answered_or_are_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answered = quiet_finder(False)
    answered._found("10.1.0.2", 9711, "n", 1)
    with caplog.at_level(logging.WARNING, "dispynb.backends.finder"):
        asyncio.run(answered._warn_if_no_node(["10.1.0.255"]))
        asyncio.run(quiet_finder(True)._warn_if_no_node(["10.1.0.255"]))
    (record,) = caplog.records  # none once a node is ready
    message = record.getMessage()
    assert "1 node answered (pinged 10.1.0.255 on UDP port 9712) but none" in message
    assert "see the warnings above" in message
    assert "Likely causes" not in message  # of silence: the node answered


def test_no_node_warning_says_which_pings_were_refused_and_which_went(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ping the socket refused (not a missing route: a local firewall rule,
    say) is named as such; the targets pinged are still named."""
    found = quiet_finder(False)
    found._discovery.unsent["10.1.0.255"] = "Operation not permitted"  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, "dispynb.backends.finder"):
        asyncio.run(found._warn_if_no_node(["10.1.0.255", "127.0.0.1"]))
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith(
        "no node found in 0.01 s of discovery: could not send its ping to "
        "10.1.0.255 (Operation not permitted) on UDP port 9712; pinged 127.0.0.1 "
        "too, no node answered; still waiting"
    ), message
    assert "The ping never left: this machine refused to send it." in message
    assert "no route" not in message
