"""A finished job's `Done`, as its worker sent it, made fit for the job's result
entry: the texts sent after the result's buffers put back in their fields
(`texts_after`), times of this machine (`own_times`), and stdout, stderr and the
traceback kept within what the job may send (`entry_texts`).

The job runs in its worker and may send a `Done` of its own: nothing here trusts
what the worker's code would have made of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dispynb.jobenv import NOTE_BYTES, output_bytes, with_dropped_note
from dispynb.protocol.messages import FINISHED
from dispynb.protocol.records import Utf8Text
from nodeserver.ipc import Done


def was_interrupted(done: Done) -> bool:
    """Whether the job of ``done`` failed on a KeyboardInterrupt (its traceback
    names one): a SIGINT meant for the job before it may have hit it."""
    exception: Any = done.exception or ""
    if type(exception) is memoryview:  # a large one (`texts_after`): seldom here
        exception = bytes(exception)
    word = "KeyboardInterrupt" if isinstance(exception, str) else b"KeyboardInterrupt"
    return done.outcome != FINISHED and word in exception


def entry_texts(done: Done, limit: int, why: str) -> tuple[Any, Any, Any]:
    """A job's stdout, stderr and traceback for its result entry: those its worker
    sent as UTF-8 bytes (`Done.utf8`) kept so (`Utf8Text`), never decoded here. A
    traceback is text whatever the flags say (a job forging its worker's `Done`
    with one in bytes made its client drop the node, failing on it).

    Each is kept to ``limit`` characters (``why``: `output_limit`) here too: the
    worker cuts them, but the job runs in it and may send its own `Done` (its
    client got 8 MiB of output with max_output_size=1000)."""
    texts: list[Any] = [done.stdout, done.stderr, done.exception]
    for index, letter in enumerate("oex"):
        text, name = texts[index], _TEXT_NAMES[index]
        if isinstance(text, str):
            if len(text) > limit + NOTE_BYTES:
                texts[index] = with_dropped_note(
                    text[:limit], len(text) - limit, name, limit, why
                )
        elif not isinstance(text, bytes | memoryview):
            pass  # no traceback
        elif letter in done.utf8 or letter == "x":
            if len(text) > output_bytes(limit):
                texts[index] = _cut_utf8(text, name, limit, why)
            else:
                texts[index] = Utf8Text(text)
        elif len(text) > limit + NOTE_BYTES:  # a program's output, bytes as in dispy
            texts[index] = (
                bytes(text[:limit])
                + (
                    f"\n[dispynb: {len(text) - limit} more bytes of {name} dropped: a "
                    f"job keeps {limit} ({why})]\n"
                ).encode()
            )
    return texts[0], texts[1], texts[2]


#: What `entry_texts` calls a job's stdout, stderr and traceback in the note of a cut.
_TEXT_NAMES = ("stdout", "stderr", "the traceback")

#: UTF-8's continuation bytes, which begin no character.
_CONTINUATION = bytes(range(0x80, 0xC0))


#: Seconds past the node's clock a job's times may be (its worker's clock is the
#: node's: this is for a clock stepped back while it ran).
CLOCK_SLACK = 60.0


def own_times(done: Done, now: float) -> Done:
    """``done`` with a start or end time that is no time of this machine (NaN,
    infinite, negative, far ahead) replaced by ``now``: a job sets them (it may
    replace ``time.time``, or send its own `Done`). A NaN made the node's mean
    job time NaN, and every later submit of the computation failed on it."""

    def own(when: float) -> float:
        return when if 0.0 <= when <= now + CLOCK_SLACK else now

    start = own(done.start_time)
    return dataclasses.replace(
        done, start_time=start, end_time=max(own(done.end_time), start)
    )


def texts_after(done: Done, buffers: list[memoryview]) -> tuple[Done, list[memoryview]]:
    """``done`` with its texts that came after the result's ``buffers``
    (`Done.after`) in their fields, as views of the message read (no copy), and
    the result's buffers. Letters that do not match (only a job forging its
    worker's `Done` sends them) are ignored: the texts stay as the header has them."""
    letters = done.after
    count = len(letters)
    if (
        letters not in _AFTER
        or count > len(buffers)
        or not set(letters) <= set(done.utf8)
    ):
        return done, buffers
    texts: list[Any] = [done.stdout, done.stderr, done.exception]
    for letter, text in zip(letters, buffers[-count:], strict=True):
        texts[_LETTERS[letter]] = text
    done = dataclasses.replace(
        done, stdout=texts[0], stderr=texts[1], exception=texts[2], after=""
    )
    return done, buffers[:-count]


#: `Done.after` as a worker sends it: letters of `Done.utf8`, in its order.
_AFTER = frozenset(("o", "e", "x", "oe", "ox", "ex", "oex"))
_LETTERS = {"o": 0, "e": 1, "x": 2}


def _cut_utf8(data: bytes | memoryview, name: str, limit: int, why: str) -> str:
    """The first ``limit`` characters of ``data`` (UTF-8, over what a job keeps:
    only a job forging its worker's `Done` sends it), with the note saying how
    many more there were; only the part kept is decoded."""
    kept = str(data[: 4 * limit], "utf-8", "replace")[:limit]
    total = len(bytes(data).translate(None, _CONTINUATION))
    return with_dropped_note(kept, max(total - len(kept), 1), name, limit, why)
