"""Program computations on a node: `dispynb.programs` with the node's output limit.

dispy's contract (see `dispynb.programs`): the job's arguments become command-line
arguments, the result is the exit code, ``stdout``/``stderr`` are the program's
output as bytes.
"""

from __future__ import annotations

from typing import Any

from dispynb.programs import ProgramOutput, install_program, read_bounded
from dispynb.programs import ProgramRunner as _ProgramRunner
from nodeserver.jobapi import CONTEXT


class ProgramRunner(_ProgramRunner):
    """Callable computation that runs ``path`` once per job, keeping at most the
    node's ``max_output`` bytes of each stream."""

    def __init__(self, path: str, names: dict[str, Any]) -> None:
        super().__init__(path, names, lambda: CONTEXT.max_output)


__all__ = ["ProgramOutput", "ProgramRunner", "install_program", "read_bounded"]
