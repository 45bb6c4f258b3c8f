"""Named wire records: built and read by name, on the wire as they always were."""

from __future__ import annotations

import math

import pytest

from dispynb.errors import MessageError
from dispynb.protocol.messages import (
    CANCELLED,
    FINISHED,
    JobResults,
    pack_header,
    unpack_header,
)
from dispynb.protocol.records import ResultEntry, avail_figures


def wire_bytes(results: list[list[object]]) -> bytes:
    return pack_header(JobResults(comp_id=3, results=results).to_header())


def test_result_entry_travels_as_the_positional_array_it_was():
    entry = ResultEntry(7, 2, FINISHED, 10.0, 11.5, "out", "", None, 1)
    assert wire_bytes([entry.to_wire()]) == wire_bytes(
        [[7, 2, FINISHED, 10.0, 11.5, "out", "", None, 1]]
    )
    assert wire_bytes([entry.to_wire(streamed=True)]) == wire_bytes(
        [[7, 2, FINISHED, 10.0, 11.5, "out", "", None, 1, True]]
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_result_entry_round_trips_through_the_codec(streamed):
    sent = ResultEntry.unrun(5, 1, CANCELLED, "cancelled before it ran")
    header = unpack_header(wire_bytes([sent.to_wire(streamed)]), trusted=True)
    message = JobResults.from_header(header)
    (item,) = message.results
    assert ResultEntry.from_wire(item) == (sent, streamed)
    assert sent.buffer_count == 0 and sent.exception == "cancelled before it ran"


@pytest.mark.parametrize(
    "item",
    [
        [1, 2, FINISHED],  # too short
        [1, 2, FINISHED, 0.0, 0.0, "", "", None, 1, True, "extra"],  # too long
        ["1", 2, FINISHED, 0.0, 0.0, "", "", None, 1],  # key not an int
        [1, 2, FINISHED, 0.0, 0.0, "", "", None, -1],  # negative buffer count
        {"key": 1},  # not an array
    ],
)
def test_malformed_result_entry_is_a_message_error(item):
    with pytest.raises(MessageError, match="malformed result entry"):
        ResultEntry.from_wire(item)


def test_a_tenth_item_other_than_true_is_not_streamed():
    item = [1, 2, FINISHED, 0.0, 0.0, "", "", None, 1, 1]
    assert ResultEntry.from_wire(item)[1] is False


def test_avail_figures_keeps_numbers_and_unknowns():
    assert avail_figures([]) == []
    assert avail_figures([50, 1024, 2.5, None]) == [50.0, 1024.0, 2.5, None]
    assert all(type(v) is float for v in avail_figures((1, 2, 3, 4)))


@pytest.mark.parametrize(
    "avail",
    [
        ["x", 1, 2, 3],
        [[1], {}, None, 1],
        [math.nan, 1, 2, 3],
        [math.inf, 1, 2, 3],
        [True, 1, 2, 3],
        [1, 2, 3],
        "1234",
        None,
    ],
)
def test_avail_figures_refuses_what_is_not_a_report(avail):
    with pytest.raises(MessageError, match="malformed resource report"):
        avail_figures(avail)
