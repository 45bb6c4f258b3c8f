"""A scheduler user manages its use of a node (``set_node_cpus``, ``deallocate_node``,
``allocate_node``) in a loop: the scheduler's log does not grow with it; and names
another user's computation: refused. Real scheduler process, real nodes, the
users' real `SharedJobCluster`s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.protocol.messages import Error, NodeManage, NodeManaged
from tests.hostile.test_scheduler import people, shared_nodes  # noqa: F401
from tests.hostile.tools import count_lines
from tests.sharedsched.harness import raw_reply
from tests.sharedsched.nodeuse import by_name, where

pytestmark = pytest.mark.slow

#: Changes of one node's use the attacker makes.
CHANGES = 600


def square(n: int) -> int:
    return n * n


@pytest.mark.attack(
    id="sched-node-manage-flood",
    title=f"A scheduler user changes its use of a node {CHANGES} times in a loop "
    "(set_node_cpus 1, 2, deallocate_node, allocate_node)",
    goal="each change answered; the scheduler's log grows by at most 20 lines, not one "
    f"per change (was: {CHANGES} info lines, as many as the user liked)",
)
@pytest.mark.timeout(120)
def test_a_user_changing_its_node_use_in_a_loop_does_not_flood_the_log(
    tmp_path: Path,
    people: dict[str, Path],  # noqa: F811
    measure,
) -> None:
    with (
        shared_nodes(tmp_path, people) as sched,
        SharedJobCluster(
            square, scheduler_host=sched.address, secret_file=str(people["mallory"])
        ) as cluster,
    ):
        assert cluster.submit(3)() == 9
        node = cluster.status().nodes[0].name
        before = count_lines(sched.log)
        started = time.monotonic()
        answers = []
        for _ in range(CHANGES // 4):
            answers += [
                cluster.set_node_cpus(node, 1),
                cluster.set_node_cpus(node, 2),
                cluster.deallocate_node(node),
                cluster.allocate_node(node),
            ]
        took = time.monotonic() - started
        grown = count_lines(sched.log) - before
        assert cluster.submit(4)() == 16
    measure(
        f"{len(answers)} changes in {took:.1f} s; the scheduler's log grew by "
        f"{grown} lines"
    )
    assert answers == [1, 2, 0, 0] * (CHANGES // 4), answers[:8]
    assert grown <= 20, sched.log_text()[-2000:]


@pytest.mark.attack(
    id="sched-node-manage-other-user",
    title="A scheduler user sends set_node_cpus 0, close_node, deallocate_node and "
    "allocate_node naming another user's computation and node",
    goal="each refused ('a session can only address its own computations'); the "
    "victim keeps all of the node's CPUs and her jobs pinned there run",
)
@pytest.mark.timeout(120)
def test_a_user_cannot_manage_another_users_use_of_a_node(
    tmp_path: Path,
    people: dict[str, Path],  # noqa: F811
    measure,
) -> None:
    with (
        shared_nodes(tmp_path, people) as sched,
        SharedJobCluster(
            where, scheduler_host=sched.address, secret_file=str(people["alice"])
        ) as cluster,
    ):
        assert cluster.submit(0.0)()
        comp_id = cluster._backend.driver.config.comp_id  # type: ignore[union-attr]
        node = cluster.status().nodes[0].name
        refusals = [
            raw_reply(
                sched.port,
                people["mallory"],
                NodeManage(
                    comp_id=comp_id, request=1, node=node, action=action, cpus=0
                ),
                until=NodeManaged,
                never=(Error,),  # one answer, the request's
            ).error
            for action in ("cpus", "close", "deallocate", "allocate")
        ]
        cpus = by_name(cluster)[node].cpus
        pinned = [cluster.submit_node(node, 0.0) for _ in range(2)]
        ran = [job() if job is not None else None for job in pinned]
    refused = sum("can only address its own computations" in r for r in refusals)
    measure(
        f"{refused} of 4 refused; alice's node has {cpus} CPUs after; her pinned "
        f"jobs ran on {ran}"
    )
    assert refused == 4, refusals
    assert cpus == 2
    assert all(ran), ran
