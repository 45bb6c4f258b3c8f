"""What a scheduler's node may tell a client: about the jobs it runs, no others.

Every node holds the node secret, and one may be compromised. A client of the
scheduler sees one link, the scheduler's, so it cannot tell which node ran a job:
the scheduler checks that a result, a start, a provisional result, a result chunk
or a file names a job running on the node that sent it (that attempt), and drops it
otherwise, before the client gets it, as a client does with its own nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispynb.errors import MessageError
from dispynb.protocol.messages import JobResults, unpack_header
from dispynb.protocol.records import ResultEntry, is_start

#: ``runs_here(key, attempt)``: whether that attempt of the job runs on the node.
RunsHere = Callable[[int, int], bool]


def only_own(
    message: JobResults, buffers: list[memoryview], runs_here: RunsHere
) -> tuple[JobResults, list[memoryview], int]:
    """``message`` with only the results and starts of jobs that run on its node,
    with their buffers; and how many results or starts it named of other jobs."""
    results: list[Any] = []
    kept: list[memoryview] = []
    offset = 0
    for item in message.results:
        entry, streamed = ResultEntry.from_wire(item)
        count = 0 if streamed else entry.buffer_count
        if runs_here(entry.key, entry.attempt):
            results.append(item)
            kept.extend(buffers[offset : offset + count])
        offset += count
    started = [s for s in message.started if is_start(s) and runs_here(s[0], s[1])]
    foreign = len(message.results) - len(results) + len(message.started) - len(started)
    if not foreign:
        return message, buffers, 0
    trimmed = JobResults(comp_id=message.comp_id, results=results, started=started)
    return trimmed, kept, foreign


def all_own(header: bytes, runs_here: RunsHere) -> bool:
    """Whether the results message whose header is ``header`` names only jobs that
    run on its node (False if it cannot tell: decoding it later says what is
    wrong)."""
    try:
        fields = unpack_header(header, trusted=True)
        items = [ResultEntry.from_wire(item)[0] for item in fields.get("results", [])]
    except (MessageError, TypeError):
        return False
    started = fields.get("started", [])
    return (
        isinstance(started, list)
        and all(runs_here(entry.key, entry.attempt) for entry in items)
        and all(is_start(s) and runs_here(s[0], s[1]) for s in started)
    )
