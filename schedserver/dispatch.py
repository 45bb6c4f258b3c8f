"""The shared scheduler's dispatch: its queued jobs handed to the nodes' free slots,
whose job each slot gets chosen with `fairshare.FairShare`."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from dispynb.errors import DispynbError
from dispynb.protocol.messages import Error, Message
from dispynb.scheduler.policy import window
from dispynb.transport.connection import describe_error
from schedserver.computation import SharedComputation, Upstream
from schedserver.state import NodeState, _ServerState, logger

#: Mean job duration (s) from which a node gets no job ahead of a free CPU, even
#: while one user alone has jobs: sending ahead hides a round trip (a millisecond),
#: nothing for jobs this long, and the jobs sent ahead run before those of a user
#: who comes next (who waited a whole job more: an hour, for hour-long jobs).
NO_AHEAD_FROM = 1.0


class _Dispatch(_ServerState):
    """Jobs handed out to the nodes' free slots, fairly."""

    def write(
        self,
        upstream: Upstream,
        message: Message,
        buffers: list[memoryview] | None = None,
    ) -> None:
        """Send to a node (a lost one is handled by its reader)."""
        if upstream.conn is None:
            return
        try:
            upstream.conn.write(message, buffers or ())
        except DispynbError as exc:
            logger.debug("node %s: %s", upstream.node.name, describe_error(exc))

    def queued_of(self, user: str) -> int:
        """Jobs of ``user`` waiting at the scheduler."""
        return sum(c.account.queued for c in self.computations if c.user == user)

    def job_left(self, comp: SharedComputation, node: NodeState) -> None:
        """A job of ``comp`` no longer holds a slot of ``node``."""
        self.fair.ended(comp.account, node=node.name)
        node.in_flight = max(0, node.in_flight - 1)

    def schedule(self) -> None:
        """Hand free slots out now (a job waits for no other loop turn: W2)."""
        self._dispatch_due = False
        computations = self.computations
        active = []
        exclusive = None
        for c in computations:
            if c.queue:  # (only a computation with jobs queued is picked)
                held = c.account.held = c.held
                if not c.closing and not held:
                    active.append(c)
            if (
                c.account.exclusive
                and not c.closing
                and (exclusive is None or c.account.order < exclusive.account.order)
            ):
                exclusive = c  # the one `FairShare.pick` lets run alone
        if active:
            self._dispatch(active)
            if exclusive is not None:
                self._tell_who_waits(active, exclusive)

    def _tell_who_waits(
        self, active: list[SharedComputation], exclusive: SharedComputation
    ) -> None:
        """Tell the client of each computation of ``active`` (jobs queued) that
        ``exclusive`` keeps waiting why, once per exclusive computation: before,
        another user's jobs waited, for as long as an exclusive cluster stayed open,
        with no word of why (its user's name is not said: a user learns nothing of
        another's)."""
        for comp in active:
            if (
                comp is exclusive
                or comp.told_waiting is exclusive
                or comp.session is None
                or not comp.queue
            ):
                continue
            comp.told_waiting = exclusive
            whose = (
                f"your exclusive cluster {exclusive.name.partition('/')[2]!r}"
                if exclusive.user == comp.user
                else "another user's exclusive cluster (exclusive=True)"
            )
            comp.session.send(
                Error(
                    code="waiting",
                    message=(
                        f"the jobs of {comp.name.partition('/')[2]!r} wait: {whose} "
                        "runs alone on this scheduler's nodes, and they start once "
                        "it closes"
                    ),
                )
            )

    def schedule_soon(self) -> None:
        """Hand free slots out once the messages read with this one are handled:
        the slots a burst of results frees go out together (fewer, larger
        messages to the nodes); at the loop's next turn at the latest."""
        if not self._dispatch_due:
            self._dispatch_due = True
            asyncio.get_running_loop().call_soon(self._dispatch_if_due)

    def _dispatch_if_due(self) -> None:
        if self._dispatch_due:
            self.schedule()

    def _dispatch(self, active: list[SharedComputation]) -> None:
        """Hand free slots to the jobs of ``active`` (the computations with jobs
        queued that may run some)."""
        computations = self.computations
        # Jobs sent ahead of a free CPU (to hide round trips, as many as the jobs'
        # mean duration calls for: the client's policy) run in the node's order,
        # not ours: only a user alone gets them, so that users in contention share
        # what runs, not only what is sent.
        per_cpu = self.config.jobs_per_cpu
        if len(computations) > 1:
            # (jobs that may run on no node contend for no CPU: an ``allocates``
            # computation whose client never decides would slow the others')
            users = {
                c.user
                for c in computations
                if c.account.in_flight or (c.queue and c.account.may_run())
            }
            if len(users) > 1:
                per_cpu = 1
        if len(active) == 1:  # the usual case: one computation has jobs waiting
            by_account = {id(active[0].account): active[0]}
            waiting = len(active[0].queue)
        else:
            by_account = {id(c.account): c for c in active}
            waiting = sum([len(c.queue) for c in active])
        accounts = [c.account for c in computations if not c.closing]
        batches: dict[
            tuple[int, str], tuple[SharedComputation, Upstream, list[Any]]
        ] = {}
        # Least loaded first (then in join order): jobs that arrive one at a time
        # (a client sends each as it is submitted when its loop is idle) spread
        # over the nodes as a burst's do, instead of all going to the first node.
        nodes = [n for n in self.nodes if n.alive and not n.leaving]
        if len(nodes) > 1:
            nodes.sort(key=_load)
        progress = True
        while progress and waiting:
            progress = False
            for node in nodes:  # one slot per node per round: spread evenly
                # Before its jobs' duration is known, a node gets one per CPU: a
                # burst of long jobs must not all go to the node ready first.
                ahead = (
                    node.cpus
                    if node.mean is None or node.mean >= NO_AHEAD_FROM
                    else min(window(node.cpus, node.mean), node.cpus * per_cpu)
                )
                if node.in_flight >= ahead:
                    continue
                account = self.fair.pick(accounts, node.name)
                if account is None:
                    continue
                comp = by_account[id(account)]
                upstream = comp.upstream[node.name]
                job = comp.take(node.name)
                self.fair.started(account, node=node.name)
                node.in_flight += 1
                batch = batches.setdefault((id(comp), node.name), (comp, upstream, []))
                batch[2].append(job)
                progress = True
                waiting -= 1
                if not waiting:
                    break
        for comp, upstream, jobs in batches.values():
            comp.send_jobs(upstream, jobs)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "dispatch: %s",
                [
                    (
                        c.name,
                        c.account.queued,
                        c.account.in_flight,
                        sorted(c.account.nodes),
                    )
                    for c in self.computations
                ],
            )


def _load(node: NodeState) -> float:
    """Jobs in flight per CPU of ``node``, the sort key of `_Dispatch._dispatch`."""
    return node.in_flight / node.cpus if node.cpus > 0 else math.inf
