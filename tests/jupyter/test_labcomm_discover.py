"""The lab panel's **Discover** (`dispynb.jupyter.labcomm.discover`) as
`docs/howto/labextension.md` says it: which nodes on this machine answer pings sent
to 127.0.0.1. In a private network namespace with only ``lo`` up, and a PID
namespace so that its nodes end with it; nothing leaves the namespace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb.errors import ConfigurationError
from tests.nodeproc import node_env
from tests.transport.test_discovery_loopback_only import _unshare_reason

#: Starts one node at a time (argv[2:]: JSON lists of dispynb-node options), types
#: 127.0.0.1 into Discover for each, then does the same for a `LocalCluster` (what
#: %dispy local starts); prints the names found each time.
PROGRAM = """
import json
import subprocess
import sys
import time
from pathlib import Path

from dispynb import LocalCluster
from dispynb.jupyter.labcomm import discover
from tests.nodeproc import node_command, write_secret_file

directory = Path(sys.argv[1])
secret = write_secret_file(directory / "secret", "discover-test-secret-0123456789ab")
found = []
for index, options in enumerate(json.loads(arg) for arg in sys.argv[2:]):
    port_file = directory / f"port-{index}"
    node = subprocess.Popen(node_command(
        "--port", "0", "--port-file", str(port_file), "--cpus", "1",
        "--secret-file", str(secret), "--name", f"node-{index}",
        "--dest-path", str(directory / f"dest-{index}"), *options,
    ))
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        assert node.poll() is None and time.monotonic() < deadline, "no node"
        time.sleep(0.02)
    found.append(sorted(n["name"] for n in discover(["127.0.0.1"], timeout=1.0)))
    node.terminate()
    node.wait(20)
with LocalCluster(nodes=1, cpus=1):
    found.append(sorted(n["name"] for n in discover(["127.0.0.1"], timeout=1.0)))
print(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_discover_finds_the_nodes_on_this_machine_the_guide_says(
    tmp_path: Path,
) -> None:
    """A node with a secret answers Discover by default on every address; one
    bound to 127.0.0.1 with a secret only with --discovery (the guide said every
    node answers by default); %dispy local's nodes never (the panel shows them
    already, and another user's kernel would list them too)."""
    reason = _unshare_reason()
    if reason is not None:
        pytest.skip(reason)
    script = tmp_path / "discover.py"
    script.write_text(PROGRAM)
    configs = [[], ["--host", "127.0.0.1"], ["--host", "127.0.0.1", "--discovery"]]
    # sh stays PID 1 (no exec): a node left by a failed run ends with the namespace.
    command = [
        "unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc",
        "sh", "-c", 'ip link set lo up && "$@"; exit $?', "sh",
        sys.executable, str(script), str(tmp_path),
        *(json.dumps(options) for options in configs),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == [["node-0"], [], ["node-2"], []], done.stderr


def test_the_panels_box_pings_discovery_ports_and_says_a_bad_port() -> None:
    """What a person types in Discover's box: each address is pinged at its
    discovery port; a port out of range is said with what the port is (not "use
    host:port", which it was)."""
    from dispynb.jupyter.labtargets import panel_targets

    # A node's address as the panel lists it (its TCP port): its host's default
    # discovery port is pinged too. (Names resolve as well, as the browser test's
    # localhost shows: not here, where a lookup could leave this machine.)
    assert panel_targets(["127.0.0.1", "10.0.0.255", "[::1]:9000"]) == [
        "127.0.0.1:9712",
        "10.0.0.255:9712",
        "[::1]:9000",
        "[::1]:9712",
    ]
    with pytest.raises(ConfigurationError) as bad:
        panel_targets(["127.0.0.1:99999"])
    assert str(bad.value).startswith(
        "'127.0.0.1:99999': the port after ':' is the nodes' UDP discovery port, "
        "a number from 1 to 65535"
    )
