"""`dispynb.status.format_status`: dispy's ``print_status`` table, line for line.

The expected lines are what dispy's ``print_status`` prints for the same numbers
(its heading, its ``%15.15s``/``%8.1f``/``%13.1f`` columns, its byte sizes, its
totals), so programs and people comparing the two see the same table.
"""

from __future__ import annotations

from dispynb.node import DispyNode
from dispynb.status import format_status

HEADING = (
    "            Node |  CPUs |    Jobs |  Sec/Job | Node Time Sec |    Sent |    Rcvd"
)


def node(ip_addr: str, name: str, cpus: int, jobs: int, seconds: float) -> DispyNode:
    made = DispyNode(ip_addr, name, cpus)
    made.jobs_done, made.cpu_time = jobs, seconds
    return made


def test_the_table_is_dispys_line_for_line() -> None:
    named = node("10.0.0.1", "a-node-named-at-length", 8, 4, 10.0)
    named.tx, named.rx = 1024, 1536
    unnamed = node("192.168.10.200", "", 2, 0, 0.0)
    unnamed.tx, unnamed.rx = 0, 3 * 1024 * 1024
    table = format_status([named, unnamed], wall_time=4.0, jobs_pending=3)
    assert table.split("\n") == [
        "",
        HEADING,
        "-" * 81,
        " a-node-named-at |     8 |       4 |"
        "      2.5 |          10.0 |  1024 B |   1.5 K",
        "  192.168.10.200 |     2 |       0 |"
        "      0.0 |           0.0 |     0 B |   3.0 M",
        "",
        "Jobs pending: 3",
        "Total job time: 10.000 sec, wall time: 4.000 sec, speedup: 2.500",
        "",
    ]


def test_byte_sizes_take_dispys_units() -> None:
    sizes = [512, 1025, 5 * 1024**2 + 1, 3 * 1024**3 + 1, 2 * 1024**4 + 1]
    nodes = [node(f"10.0.0.{n}", "", 1, 0, 0.0) for n in range(len(sizes))]
    for each, size in zip(nodes, sizes, strict=True):
        each.tx = each.rx = size
    rows = format_status(nodes, wall_time=1.0).split("\n")[3:-3]
    assert [row.rsplit("|", 1)[1] for row in rows] == [
        "   512 B",
        "   1.0 K",
        "   5.0 M",
        "   3.0 G",
        "   2.0 T",
    ]


def test_an_engine_that_does_not_count_bytes_shows_a_dash() -> None:
    table = format_status([node("10.0.0.1", "ray", 2, 1, 1.0)], 1.0, traffic=False)
    assert table.split("\n")[3] == (
        "             ray |     2 |       1 |"
        "      1.0 |           1.0 |       - |       -"
    )
