"""`ResultObjects`: the results one computation's workers wrote to shared memory.

A worker writes a large result for a client on this machine into an object of
``/dev/shm`` and reports only its name (`dispynb.protocol.shm.write_result`); the
client unlinks the object once it has read it. Every object the client will not
read is the node's to unlink, at once: the result of a job the node drops (it was
cancelled, or its client gave it up), and what a worker that died abruptly wrote
but never reported (killed between the object's rename and its report: the
out-of-memory killer, a timeout's SIGKILL). Left, such an object held its bytes of
the machine's memory until the client's session ended, hours later in a notebook.
"""

from __future__ import annotations

from dispynb.errors import SerializationError
from dispynb.protocol import shm

#: Names passed on that are remembered before those already read are forgotten
#: (the set is pruned, then grows to twice what is left).
PRUNE_FROM = 256


class ResultObjects:
    """The result objects of one computation (see the module docstring)."""

    def __init__(self, path: str) -> None:
        #: `shm.result_prefix` of the computation's directory: its workers' names.
        self.prefix = shm.result_prefix(path)
        #: Jobs came through shared memory, so results may: until then no result
        #: is looked at (a reference check per result on the hot path).
        self.used = False
        self._start = f"dnr-{self.prefix}"
        # Objects passed on to the client, which unlinks each once read.
        self._sent: set[str] = set()
        self._prune_at = PRUNE_FROM

    def name(self, buffers: list[memoryview]) -> str | None:
        """The name of this computation's result object that ``buffers`` refer
        to, if they do (a job may forge a reference: only our own names count)."""
        if not self.used or not shm.is_reference(buffers):
            return None
        try:
            name = shm.reference_name(buffers[0])
        except SerializationError:
            return None
        return name if name.startswith(self._start) else None

    def sent(self, buffers: list[memoryview]) -> None:
        """``buffers`` go to the client: the object they refer to is its to unlink."""
        name = self.name(buffers)
        if name is None:
            return
        self._sent.add(name)
        if len(self._sent) > self._prune_at:
            self._sent = {n for n in self._sent if (shm.SHM_DIR / n).exists()}
            self._prune_at = max(PRUNE_FROM, 2 * len(self._sent))

    def unless_sent(self, buffers: list[memoryview]) -> None:
        """A job's result was handled: unlink its object if it did not go on."""
        name = self.name(buffers)
        if name is not None and name not in self._sent:
            shm.unlink(name)

    def worker_lost(self, pid: int) -> None:
        """The worker ``pid`` died abruptly: unlink what it wrote and did not send."""
        if self.used:
            shm.unlink_worker_results(self.prefix, pid, self._sent)

    def client_gone(self) -> None:
        """The client's session ended: it reads none of those sent any more."""
        for name in self._sent:
            shm.unlink(name)
        self._sent.clear()
