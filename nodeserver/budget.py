"""`CpuBudget`: at most one busy worker per CPU across all computations of the node."""

from __future__ import annotations

from collections.abc import Callable


class CpuBudget:
    """Counts busy workers node-wide and shares freed CPUs among computations.

    A worker holds a CPU from the moment it is given a job until it has none left.
    When a CPU frees up, the waiting computations are offered it in turn
    (round-robin), so one client's long queue cannot starve another's.
    """

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.busy = 0
        self._waiters: dict[int, Callable[[], None]] = {}
        self._next = 0

    def resize(self, cpus: int) -> None:
        """Serve ``cpus`` CPUs from now on: more are offered to the waiting
        computations at once; fewer take effect as running jobs end."""
        self.cpus = cpus
        self._offer()

    def try_acquire(self) -> bool:
        """Take a CPU if one is free."""
        if self.busy < self.cpus:
            self.busy += 1
            return True
        return False

    def free(self) -> bool:
        """Whether a CPU is free now (nothing taken)."""
        return self.busy < self.cpus

    def take(self) -> None:
        """Take a CPU back that was lent, even if none is free (busy may exceed
        the count for a while: no CPU is offered until it is under again)."""
        self.busy += 1

    def release(self) -> None:
        """Give a CPU back and offer it to the waiting computations."""
        self.busy -= 1
        self._offer()

    def wait(self, owner: int, pump: Callable[[], None]) -> None:
        """Register ``pump``, called when a CPU may be free, for ``owner``."""
        self._waiters[owner] = pump

    def forget(self, owner: int) -> None:
        """Stop offering CPUs to ``owner``."""
        self._waiters.pop(owner, None)

    def _offer(self) -> None:
        owners = list(self._waiters)
        if not owners:
            return
        start = self._next % len(owners)
        self._next += 1
        for owner in owners[start:] + owners[:start]:
            if self.busy >= self.cpus:
                return
            pump = self._waiters.get(owner)
            if pump is not None:
                pump()
