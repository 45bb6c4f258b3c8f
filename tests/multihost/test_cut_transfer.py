"""The link to a node cut (``ip link set down``) while a large argument is on its
way to it, then brought back.

The node has part of a frame it will never get the rest of. The client must end the
job (not reentrant) ``Abandoned`` after its pulses, the node must not run it nor
break, and once the link is back the same client uses the node again. The node's
link is slowed (``tc`` token bucket) so that the transfer lasts seconds and the cut
lands in its middle: the test cuts once the node's port has passed 2 MiB of it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.multihost.conftest import Site
from tests.multihost.netns import Host, Network, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

#: Bytes of the argument: 6 s at the slowed link's 40 Mbit/s.
ARGUMENT = 30 << 20

CLIENT = """
import logging, os, sys, time
import dispynb

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

def compute(n, blob, marks):
    import os
    open(os.path.join(marks, str(n)), "w").close()
    return len(blob)

def main(args):
    cluster = dispynb.JobCluster(
        compute, nodes=[args["node"]], secret=args["secret"], pulse_interval=0.2
    )
    try:
        job = cluster.submit(0, os.urandom(args["size"]), args["marks"])
        print("submitted", flush=True)
        job()
        out = [int(job.status), str(job.exception)]
        open(args["ended"], "w").close()
        while not os.path.exists(args["healed"]):  # the test's cue
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while not cluster.status().nodes and time.monotonic() < deadline:
            time.sleep(0.01)  # the node is tried again: back once it answers
        return out + [cluster.submit_node(args["node"], 1, b"x", args["marks"])()]
    finally:
        cluster.close()
"""


def sent_bytes(network: Network, host: Host) -> int:
    """Bytes the bridge has sent to ``host`` through the slowed port so far."""
    shown = subprocess.run(
        ["ip", "netns", "exec", network.bridge, "tc", "-s", "qdisc", "show", "dev",
         host.port],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"Sent (\d+) bytes", shown)
    return int(match.group(1)) if match else 0


@pytest.mark.timeout(120)
def test_a_link_cut_mid_argument_then_back_leaves_the_node_serving(site: Site) -> None:
    if shutil.which("tc") is None:
        pytest.skip("needs tc (iproute2) to slow the link")
    host = site.node_hosts[0]
    node = site.start(host)
    subprocess.run(
        ["ip", "netns", "exec", site.network.bridge, "tc", "qdisc", "add", "dev",
         host.port, "root", "tbf", "rate", "40mbit", "burst", "32kbit",
         "latency", "400ms"],
        check=True, timeout=10,
    )  # fmt: skip
    marks, ended, healed = (site.directory / n for n in ("marks", "ended", "healed"))
    marks.mkdir()
    args = {
        "node": node.spec, "secret": site.secret, "size": ARGUMENT,
        "marks": str(marks), "ended": str(ended), "healed": str(healed),
    }  # fmt: skip
    client = site.start_client(CLIENT, args, site.directory / "client")
    try:
        assert client.proc.stdout is not None
        assert client.proc.stdout.readline().strip() == "submitted"
        wait_for(lambda: sent_bytes(site.network, host) > 2 << 20, 30, "2 MiB sent")
        assert sent_bytes(site.network, host) < ARGUMENT  # mid-transfer
        site.network.cut(host)
        wait_for(ended.exists, 30, "the job ended by the client")
        site.network.heal(host)
        healed.touch()
        status, reason, size = client.result(60)
    finally:
        client.stop()
    assert status == 10, reason  # Abandoned
    assert reason.startswith(f"node {node.spec} was lost ("), reason
    assert size == 1  # the node serves the client again
    assert sorted(p.name for p in marks.iterdir()) == ["1"]  # the cut job never ran
    assert "Traceback" not in node.log_text()
