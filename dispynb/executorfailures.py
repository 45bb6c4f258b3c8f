"""What an `Executor`'s user is told when a job fails as a whole: the node's advice on
limits rewritten as the executor's options (a call cannot pass ``dispy_job_*``
keywords), the traceback's frames in the user's file, and a value or argument that
cannot be pickled named by its call."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.errors import SerializationError
from dispynb.job import DispyJob
from dispynb.protocol import serialize
from dispynb.tracebacks import LazySourceMap

#: One call's positional arguments.
Args = tuple[Any, ...]

#: How a node names a value its runner returned that does not pickle: by its
#: place in the runner's `Outcomes` (``result[0][index]``, then inside it).
_UNPICKLABLE_VALUE = re.compile(
    r"result of type 'tuple' cannot be pickled; "
    r"result\[0\]\[(?P<index>\d+)\](?P<inside>\S*) is a"
)


#: A node's advice on a job's limits, given to `JobCluster` users (a submit's
#: ``dispy_job_*`` keyword), and what an executor's user is told instead: a call
#: cannot pass those (they would go to the function), the executor's options can
#: (``depends`` too, for a module the node lacks).
_LIMIT_ADVICE: tuple[
    tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...
] = (
    (
        re.compile(
            r"\(job_timeout / dispy_job_timeout\)(?P<middle>.*?)"
            r"submit\(\.\.\., dispy_job_timeout=(?P<value>[^)]+)\)"
        ),
        r"(the executor's job_timeout)\g<middle>Executor(..., job_timeout=\g<value>)",
    ),
    (
        re.compile(
            r"mem_limit of (?P<value>\d+) bytes \(mem_limit / dispy_job_mem_limit\): "
            r"give a larger limit"
        ),
        lambda match: (
            f"mem_limit of {match['value']} bytes (the executor's mem_limit): give a "
            f"larger limit, e.g. Executor(..., mem_limit={2 * int(match['value'])})"
        ),
    ),
    (
        re.compile(
            r"pickles to (?P<size>\d+) bytes, over the limit of (?P<cap>\d+) bytes "
            r"\(max_result_size\)(?P<middle>.*?)"
            r"or give the cluster a larger max_result_size"
            r"(?: \(within its max_message_size\))?"
        ),
        lambda match: (
            f"pickles to {match['size']} bytes, over the limit of {match['cap']} "
            f"bytes (the executor's max_result_size, within its max_message_size)"
            f"{match['middle']}or give a larger limit, e.g. "
            f"{_larger_result_limit(2 * int(match['size']))}"
        ),
    ),
    (
        re.compile(
            r"start the nodes with a larger one, e.g\. dispynb-node "
            r"--max-message-size (?P<value>\d+) \(LocalCluster\(max_message_size="
            r"\.\.\.\)\), and give the cluster as large a max_message_size"
        ),
        r"give a larger one, e.g. Executor(..., max_message_size=\g<value>) (the "
        r"local nodes it starts take it too; nodes you started need "
        r"dispynb-node --max-message-size \g<value>)",
    ),
    (re.compile(r"JobCluster\(\.\.\., depends="), "Executor(..., depends="),
)


def _larger_result_limit(size: int) -> str:
    """The executor's arguments letting results of ``size`` bytes come back
    (beyond the default message size, the client's and its local nodes' limit
    must grow too)."""
    if size <= MAX_MESSAGE_SIZE:
        return f"Executor(..., max_result_size={size})"
    return f"Executor(..., max_message_size={size}, max_result_size={size})"


def executor_advice(text: str) -> str:
    """``text`` with the node's advice on limits (`_LIMIT_ADVICE`) as an
    executor's user follows it."""
    for advice, instead in _LIMIT_ADVICE:
        text = advice.sub(instead, text, count=1)
    return text


def explain_failure(job: DispyJob, sources: tuple[Any, ...], batch: str = "") -> None:
    """``job`` failed as a whole (it did not return the calls' outcomes): its
    traceback's frames in the code of ``sources`` (the calls' functions) point
    at their file or cell, as a call's own exception's do (the cluster knows
    only the runner's code); a value that cannot be pickled is named by its call
    (in its ``batch``, see `Executor._submit_call`)."""
    text = job.exception
    if not isinstance(text, str):
        return
    text = LazySourceMap(*sources).rerender(text) or text
    text = job.exception = executor_advice(text)
    if "result of type 'tuple'" not in text:
        return
    count = job._args[2]

    def name(match: re.Match[str]) -> str:
        who = (
            "the call" if count == 1 else f"call {int(match['index']) + 1} of its chunk"
        )
        inside = match["inside"]
        place = re.match(r"\[(\d+)\]", inside) if batch and count == 1 else None
        if place is not None:  # the batch's list: the place of the batch's call
            who = f"call {int(place[1]) + 1} of its {batch}"
            inside = inside[place.end() :]
        return f"the value returned by {who}" + (
            f" has {inside}, a" if inside else " is a"
        )

    job.exception = _UNPICKLABLE_VALUE.sub(name, text, count=1)


def unpicklable_call(
    calls: list[Args], kwargs: dict[str, Any], error: SerializationError
) -> str:
    """Name the argument of the call (of a ``map`` chunk) that cannot be pickled."""
    for index, args in enumerate(calls):
        found = serialize.unpicklable_argument(args, kwargs)
        if found is not None:
            name, exc = found
            where = f" (call {index + 1} of the chunk)" if len(calls) > 1 else ""
            return f"{name}{where} cannot be sent to a node: {exc}"
    return f"the call cannot be sent to a node: {error}"
