"""What jobs print, written in the notebook cell that started them, when they end.

ipykernel sends what a thread writes to ``sys.stdout`` to the cell of that thread's
context (its parent header is a context variable), else to the cell running now.
JupyterLab shows a finished cell's late output in that cell. An ``Executor.map``
in a notebook follows its jobs with `MapOutput`: each job's output is written as
the job ends, in the context of the cell that called ``map``, even if the map is
never iterated (before, it was written only as the iteration reached the job, in
the cell that iterated, and never for ``executor.map(save, items)``). A
``submit``'s future writes its job's output in the context of the cell that
called ``submit`` (`cell_context`): it went to the cell that made the executor.

Imports no IPython (the core may not import `dispynb.jupyter`): the executor uses
it whenever ipykernel is loaded.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from dispynb._interruptible import start_thread

if TYPE_CHECKING:
    from dispynb.job import DispyJob

__all__ = ["MapOutput", "cell_context", "in_kernel"]


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel's streams are in use)."""
    return "ipykernel" in sys.modules and hasattr(sys.stdout, "parent_header")


def cell_context() -> contextvars.Context | None:
    """In a kernel, the calling cell's context, to write a job's output in later
    (``context.run(echo, job)``) from whichever thread sees the job end: there
    it went to the cell that had started that thread. None outside a kernel."""
    return contextvars.copy_context() if in_kernel() else None


class MapOutput:
    """Writes each job's output once (``echo(job)``), whoever comes first: the
    thread following the jobs, or the iteration reaching the job (which waits for
    a write under way, so the output still comes before the job's values)."""

    def __init__(self, echo: Callable[[DispyJob], None]) -> None:
        self._echo = echo
        self._lock = threading.Lock()
        self._written: set[object] = set()  # job ids

    @classmethod
    def follow(
        cls, jobs: Iterable[DispyJob], echo: Callable[[DispyJob], None]
    ) -> MapOutput:
        """Write the output of each of ``jobs`` as it ends, in the calling cell."""
        output = cls(echo)
        context = contextvars.copy_context()  # the calling cell's parent header
        thread = threading.Thread(
            target=context.run,
            args=(output._follow, list(jobs)),
            name="dispynb-map-output",
            daemon=True,  # its jobs end (or the process does): never joined
        )
        start_thread(thread)
        return output

    def _follow(self, jobs: list[DispyJob]) -> None:
        for job in jobs:
            job.wait()
            self.echo(job)

    def echo(self, job: DispyJob) -> None:
        """Write ``job``'s output unless it was written already."""
        with self._lock:
            if job.id in self._written:
                return
            self._written.add(job.id)
            self._echo(job)
