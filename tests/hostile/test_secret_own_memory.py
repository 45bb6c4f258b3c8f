"""A job reads its own memory for the secret its node was given on the command line
(or in its ``--config`` file).

The node parses ``--secret VALUE`` (and its config file) before it forks the zygote
that forks computation processes and their workers: every copy of the value the
node held by then (the parsed option, the strings argparse made and dropped, the
config file's text, the interpreter's own copy of its arguments) was inherited by
the processes that run jobs, which may read their own memory.
"""

from __future__ import annotations

import pytest

from dispynb import DispyJob, JobCluster
from tests.hostile.tools import memory_regions, strong_secret
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow


def _find_in_own_memory(reversed_secret: str) -> list[str]:
    """The encodings of the secret (given reversed, so that the job's own arguments
    do not hold it) found in this process's readable memory. It is looked for in
    two halves, never made whole here."""
    cut = len(reversed_secret) // 2
    first, second = reversed_secret[cut:][::-1], reversed_secret[:cut][::-1]
    encodings = ("utf-8", "utf-16-le", "utf-32-le")
    halves = {name: (first.encode(name), second.encode(name)) for name in encodings}
    found: set[str] = set()
    for data in memory_regions():
        for name, (head, tail) in halves.items():
            at = data.find(head)
            while at >= 0 and name not in found:
                if data.startswith(tail, at + len(head)):
                    found.add(name)
                at = data.find(head, at + 1)
    return sorted(found)


@pytest.mark.attack(
    id="secret-in-job-memory",
    title="A job of a node given -s/--secret on its command line, or the secret in "
    "its --config file, reads its own memory (inherited from the zygote the node "
    "forked) for the secret, in UTF-8, UTF-16 and UTF-32",
    goal="found nowhere (was: in the worker's memory in UTF-8 and UTF-32; from "
    "the config file, in UTF-8)",
)
@pytest.mark.parametrize("form", ["--secret", "--secret=", "-s", "--config"])
@pytest.mark.timeout(120)
def test_a_job_does_not_find_the_nodes_parsed_secret_in_its_memory(
    measure, tmp_path, form
):
    secret = strong_secret()
    if form == "--config":
        config = tmp_path / "node.conf"
        config.write_text(f"[DEFAULT]\nsecret = {secret}\n")
        config.chmod(0o600)
        given = [form, str(config)]
    else:
        given = [form + secret] if form != "--secret" else [form, secret]
    # DISPYNB_SECRET holds another (start_node's): the node's is given here.
    node = start_node(tmp_path / "node", *given, secret_in_env=True)
    try:
        with JobCluster(_find_in_own_memory, nodes=[node.spec], secret=secret) as c:
            job = c.submit(secret[::-1])
            found = job()
    finally:
        node.stop()
    assert job.status == DispyJob.Finished, job.exception
    measure(f"{form}: found in {', '.join(found) or 'nothing'}")
    assert found == []
