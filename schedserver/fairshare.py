"""Who gets the next free CPU: fair share between users, exclusive clusters, quotas.

Pure bookkeeping (no I/O), so that the policy is tested on its own. The scheduler
asks `FairShare.pick` for a computation each time a node has a free slot; the
answer is the computation of the user with the fewest jobs in flight (ties: the
user served least recently), within that user's quota, and respecting exclusive
computations (dispy's ``SharedJobCluster(exclusive=True)``): while one is active it
alone gets CPUs, and only once the others' jobs in flight have ended.

Since one user's exclusive computation stops every other user's jobs for as long
as it is open, only the users the administrator names (``--exclusive_users``) get
one: another user's ``exclusive=True`` is declined (`exclusive_refusal`) and its
computation runs shared, so a dispy program asking for it still runs.

It never preempts: a slot is given only when one is free, so a user's running jobs
keep their CPUs whoever else waits (``max_cpus`` is the administrator's cap).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Account:
    """What the scheduler knows of one computation for its choice."""

    user: str
    #: Creation order (earlier exclusive computations go first).
    order: int
    exclusive: bool = False
    queued: int = 0
    in_flight: int = 0
    #: Nodes where the computation is set up (so its jobs can go there).
    nodes: set[str] = field(default_factory=set)
    #: Its jobs wait (its client is away and it may keep no more results).
    held: bool = False
    #: Of ``queued``, those pinned to one node (``submit_node``), per node name:
    #: only that node takes them.
    pinned: dict[str, int] = field(default_factory=dict)
    #: Per node name, the most of its jobs in flight there at once, as its client
    #: limited them (``set_node_cpus``; 0: ``deallocate_node`` took it out), until
    #: it gives the node back (``allocate_node``) or the node leaves.
    limits: dict[str, int] = field(default_factory=dict)
    #: Its jobs in flight per node name (what ``limits`` bound).
    busy: dict[str, int] = field(default_factory=dict)

    def may_run(self) -> bool:
        """Whether a node it is set up on takes its jobs at all (its client took
        none of them out: ``allocates`` undecided, ``deallocate_node``)."""
        limits = self.limits
        return any(limits.get(node) != 0 for node in self.nodes)

    def takes(self, node: str) -> bool:
        """Whether one of its queued jobs may run on ``node``."""
        if self.queued <= 0:
            return False
        limit = self.limits.get(node)
        if limit is not None and self.busy.get(node, 0) >= limit:
            return False
        pinned = self.pinned
        if not pinned:
            return True
        return self.queued > sum(pinned.values()) or pinned.get(node, 0) > 0


class FairShare:
    """Fair share of CPU slots between users; see the module docstring.

    ``max_cpus``: jobs in flight per user at most (None: no limit);
    ``exclusive_users``: who may run exclusive computations (None: every user).
    """

    def __init__(
        self,
        max_cpus: int | None = None,
        exclusive_users: frozenset[str] | None = None,
    ) -> None:
        self.max_cpus = max_cpus
        self.exclusive_users = exclusive_users
        self._in_flight: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._stamps = itertools.count(1)

    def exclusive_refusal(self, user: str) -> str:
        """Why ``user``'s exclusive computation runs shared ("": it may be
        exclusive), in words for its client: what to ask the administrator."""
        allowed = self.exclusive_users
        if allowed is None or user in allowed:
            return ""
        who = (
            "lets only the users its administrator names" if allowed else "lets no user"
        )
        return (
            f"exclusive=True declined for user {user!r}: this scheduler {who} "
            "run exclusive clusters (each stops every other user's jobs while it is "
            "open), so this cluster runs shared with other users' jobs. To run it "
            f"alone, ask the scheduler's administrator to add {user!r} to "
            "dispynb-scheduler --exclusive_users; to run it shared without this "
            "warning, leave exclusive=True out"
        )

    def in_flight(self, user: str) -> int:
        """Jobs of ``user`` sent to nodes and not ended."""
        return self._in_flight.get(user, 0)

    def started(self, account: Account, count: int = 1, node: str = "") -> None:
        """``count`` jobs of ``account`` went to ``node``."""
        account.in_flight += count
        account.queued -= count
        if node:
            account.busy[node] = account.busy.get(node, 0) + count
        self._in_flight[account.user] = self._in_flight.get(account.user, 0) + count
        self._served[account.user] = next(self._stamps)

    def ended(self, account: Account, count: int = 1, node: str = "") -> None:
        """``count`` jobs of ``account`` ended on ``node`` (or it was lost; "":
        all its jobs, wherever they were)."""
        account.in_flight -= count
        busy = account.busy
        if not node:
            busy.clear()
        elif busy.get(node, 0) > count:
            busy[node] -= count
        else:
            busy.pop(node, None)
        left = self._in_flight.get(account.user, 0) - count
        if left > 0:
            self._in_flight[account.user] = left
        else:
            self._in_flight.pop(account.user, None)

    def pick(self, accounts: Iterable[Account], node: str) -> Account | None:
        """The computation whose job takes the next slot on ``node`` (None: none)."""
        accounts = list(accounts)
        exclusive = [a for a in accounts if a.exclusive]
        if exclusive:
            first = min(exclusive, key=lambda a: a.order)
            if any(a.in_flight for a in accounts if a is not first):
                return None  # the exclusive one waits for the others to drain
            accounts = [first]
        best: Account | None = None
        best_rank: tuple[int, int, int, int] | None = None
        for account in accounts:
            if account.held or node not in account.nodes or not account.takes(node):
                continue
            user_flight = self._in_flight.get(account.user, 0)
            if self.max_cpus is not None and user_flight >= self.max_cpus:
                continue
            rank = (
                user_flight,
                self._served.get(account.user, 0),
                account.in_flight,
                account.order,
            )
            if best_rank is None or rank < best_rank:
                best, best_rank = account, rank
        return best


__all__ = ["Account", "FairShare"]
