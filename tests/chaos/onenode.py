"""A ``dispynb-scheduler`` over one node, both from the command line, with one
user: what the chaos tests of the shared scheduler start from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.nodeproc import start_node
from tests.sharedsched.harness import SchedulerProcess, add_user


@contextlib.contextmanager
def scheduler_over_one_node(
    tmp_path: Path, *args: str, cpus: int = 1
) -> Iterator[tuple[SchedulerProcess, Path]]:
    """A node of ``cpus`` CPUs and a scheduler over it (``args``, more of its
    options), started; yields the scheduler and the credential of its user alice.
    Both are stopped at the end."""
    node = start_node(tmp_path / "node", cpus=cpus)
    credential = add_user(tmp_path, "alice")
    scheduler = SchedulerProcess(tmp_path, [node.spec], node.secret, args=args)
    try:
        scheduler.start()
        yield scheduler, credential
    finally:
        scheduler.stop()
        node.stop()
