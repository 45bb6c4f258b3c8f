"""The cross-host part of the results document (``crosshost.py``): issue 17's target
(W4 at least 0.8x raw TCP), the text lines of the table and the markdown section.

Pure Python, like ``report.py``: ``plot.py`` imports it from the plotting environment.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "HEADING",
    "RAW_TCP_BOUND",
    "crosshost_markdown",
    "crosshost_target",
    "crosshost_text",
]

#: Heading of the markdown section (``markdown.py`` splices it by this line).
HEADING = "## Across hosts: network-namespace hosts on a bridge"
#: Issue 17 item 4: W4 across hosts at least this fraction of raw TCP.
RAW_TCP_BOUND = 0.8


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _range(values: Sequence[float], fmt: str) -> str:
    median = fmt.format(_median(values))
    if len(values) == 1:
        return median
    return f"{median} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def _runs(values: Sequence[float], fmt: str) -> str:
    return ", ".join(fmt.format(v) for v in values)


def crosshost_target(
    crosshost: Mapping[str, Any], part: str = "main"
) -> dict[str, Any] | None:
    """W4 / raw TCP across hosts (``part``: ``"main"``, or ``"shaped"`` for the
    1 Gbit/s client link): per repetition (each W4 repetition against the raw one
    right after it) and of the medians; None without both measured."""
    main = crosshost.get(part) or {}
    w4, raw = main.get("bandwidth"), main.get("raw_tcp")
    if not w4 or not raw:
        return None
    ratios = [a / b for a, b in zip(w4, raw, strict=True)]
    ratio = _median(w4) / _median(raw)
    link = f" (client link {main['rate']})" if part == "shaped" else ""
    return {
        "target": f"cross-host W4 >= {RAW_TCP_BOUND}x raw TCP{link}",
        "value": _median(w4),
        "raw": _median(raw),
        "ratio": ratio,
        "ratios": ratios,
        "status": "PASS" if ratio >= RAW_TCP_BOUND else "MISS",
        "every_repetition": all(r >= RAW_TCP_BOUND for r in ratios),
    }


def crosshost_text(document: Mapping[str, Any]) -> list[str]:
    """Lines for ``report.format_table`` (empty without a cross-host run)."""
    crosshost = document.get("crosshost")
    if not crosshost:
        return []
    lines = ["", "Across hosts (namespace hosts on a bridge):"]
    if crosshost.get("error"):
        last = crosshost["error"].strip().splitlines()[-1]
        lines.append(f"cross-host FAILED: {last}")
    main = crosshost.get("main") or {}
    if main.get("throughput"):
        lines.append(
            f"  W1 on {main['nodes']} node hosts: "
            f"{_runs(main['throughput'], '{:,.0f}')} jobs/s"
        )
    if main.get("bandwidth"):
        lines.append(f"  W4: {_runs(main['bandwidth'], '{:,.0f}')} MB/s")
    if main.get("raw_tcp"):
        lines.append(f"  raw TCP: {_runs(main['raw_tcp'], '{:,.0f}')} MB/s")
    shaped = crosshost.get("shaped") or {}
    if shaped.get("bandwidth"):
        lines.append(
            f"  client link {shaped['rate']}:"
            f" W4 {_runs(shaped['bandwidth'], '{:,.0f}')} MB/s,"
            f" raw TCP {_runs(shaped.get('raw_tcp', []), '{:,.0f}')} MB/s"
        )
    for part in ("main", "shaped"):
        target = crosshost_target(crosshost, part)
        if target:
            lines.append(
                f"{target['status']:4}  {target['target']}: {target['ratio']:.2f}x"
                f" (per repetition {_runs(target['ratios'], '{:.2f}')})"
            )
    for row in crosshost.get("scale") or []:
        lines.append(
            f"  scale {row['nodes']:>2} nodes on {row['hosts']} hosts:"
            f" {_range(row['throughput'], '{:,.0f}')} jobs/s,"
            f" W4 {_range(row['bandwidth'], '{:,.0f}')} MB/s"
        )
    link = crosshost.get("link") or {}
    if "mtu" in link:
        lines.append(f"  link: {_link_text(link)}")
    return lines


def _link_text(link: Mapping[str, Any]) -> str:
    sysctl = link.get("sysctl", {})
    parts = [
        f"veth MTU {link.get('mtu')}",
        f"qdisc {link.get('qdisc')}",
        f"GSO/GRO max {link.get('gso_max_size')}/{link.get('gro_max_size')} bytes",
        f"TSO max {link.get('tso_max_size')} bytes",
        f"{link.get('num_tx_queues')} TX queues",
    ]
    if sysctl:
        parts += [
            f"tcp_wmem {' '.join(sysctl.get('net.ipv4.tcp_wmem', '?').split())}",
            f"tcp_rmem {' '.join(sysctl.get('net.ipv4.tcp_rmem', '?').split())}",
            f"congestion control {sysctl.get('net.ipv4.tcp_congestion_control')}",
        ]
    offload = link.get("offload")
    if isinstance(offload, Mapping):
        on = [k for k, v in offload.items() if v == "on"]
        parts.append("offloads on: " + ", ".join(on))
    elif offload:
        parts.append(f"offloads {offload}")
    return "; ".join(parts)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("| " + " | ".join("---" for _ in rows[0]) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return lines


def crosshost_markdown(
    document: Mapping[str, Any], image: str | None = None
) -> list[str]:
    """The report's cross-host section (empty without a cross-host run)."""
    crosshost = document.get("crosshost")
    if not crosshost:
        return []
    config = document["config"]
    params = crosshost.get("params", {})
    lines = [
        HEADING,
        "",
        f"Issue 17 item 4. Four node hosts and one client host, each a network"
        " namespace with a veth on one bridge (the multi-host tests' hosts,"
        " `tests/multihost/netns.py`); one `dispynb-node"
        f" --cpus {params.get('cpus_per_node', 1)}` per node host, started as a user"
        " starts it (secret in `DISPYNB_SECRET`), `JobCluster(fn, nodes=[...])` in"
        " the client host. Large arguments go over TCP (shared memory is for nodes on"
        " the client's loopback only). The raw TCP reference sends the same payloads"
        " (same number, same size) from the client host with plain blocking sockets,"
        " one connection and one thread per node host, to a receiver on each node"
        " host that reads them and answers with their length; each W4 repetition is"
        " followed by a raw one. From the run of"
        f" {document.get('timestamp')} ({config.get('repeat')} repetitions, each"
        " listed):",
        "",
        "```sh",
        f".venv/bin/python {config.get('command', 'bench/run.py --cross-host')}",
        "```",
        "",
    ]
    if crosshost.get("error"):
        last = crosshost["error"].strip().splitlines()[-1]
        lines += [f"The cross-host run failed: `{last}`", ""]
    main = crosshost.get("main") or {}
    target = crosshost_target(crosshost)
    rows = [["measure", "per repetition", "median"]]
    if main.get("throughput"):
        rows.append(
            [
                f"W1, {main['jobs']:,} `inc` jobs on {main['nodes']} node hosts"
                " (jobs/s)",
                _runs(main["throughput"], "{:,.0f}"),
                f"{_median(main['throughput']):,.0f}",
            ]
        )
    payloads = main.get("payloads", {})
    what = (
        f"{payloads.get('jobs')} x {payloads.get('bytes_per_job', 0) / 1e6:g} MB"
        if payloads
        else "payloads"
    )
    shaped = crosshost.get("shaped") or {}
    for part, link in (
        ("main", "veth"),
        ("shaped", f"client link {shaped.get('rate')}"),
    ):
        measured = crosshost.get(part) or {}
        for key, label in (("bandwidth", "W4, dispynb"), ("raw_tcp", "raw TCP")):
            if measured.get(key):
                rows.append(
                    [
                        f"{label}, {what}, {link} (MB/s)",
                        _runs(measured[key], "{:,.0f}"),
                        f"{_median(measured[key]):,.0f}",
                    ]
                )
        for here, there, label in (
            (
                "client_cpu_ms_per_mb",
                "nodes_cpu_ms_per_mb",
                "W4 CPU ms/MB, client + nodes",
            ),
            (
                "raw_sender_cpu_ms_per_mb",
                "raw_receivers_cpu_ms_per_mb",
                "raw TCP CPU ms/MB, sender + receivers",
            ),
        ):
            if measured.get(here) and measured.get(there):
                pairs = list(zip(measured[here], measured[there], strict=True))
                middle = _median(measured[here]), _median(measured[there])
                rows.append(
                    [
                        f"{label}, {link}",
                        ", ".join(f"{a:.2f} + {b:.2f}" for a, b in pairs),
                        f"{middle[0]:.2f} + {middle[1]:.2f}",
                    ]
                )
        part_target = crosshost_target(crosshost, part)
        if part_target:
            rows.append(
                [
                    f"W4 / raw TCP, {link}",
                    _runs(part_target["ratios"], "{:.2f}"),
                    f"{part_target['ratio']:.2f}",
                ]
            )
    if len(rows) > 1:
        lines += [*_table(rows), ""]
    if target:
        every = "in every repetition" if target["every_repetition"] else "not in every"
        lines += [
            f"Target: W4 at least {RAW_TCP_BOUND}x raw TCP between the same"
            f" namespaces: **{target['status']}** ({target['ratio']:.2f}x of the"
            f" medians; {every} repetition).",
            "",
        ]
    shaped_target = crosshost_target(crosshost, "shaped")
    if shaped_target:
        lines += [
            f"With the client host's veth limited to {shaped['rate']} (`tc` token"
            " bucket: a client with a 1 Gbit/s network card, where the network and"
            " not the CPUs is the limit): W4"
            f" {shaped_target['ratio']:.2f}x raw TCP,"
            f" **{shaped_target['status']}**.",
            "",
        ]
    if crosshost.get("scale"):
        lines += [
            "Scale curve: N one-CPU `dispynb-node` processes spread round-robin over"
            " the four node hosts (several per host on distinct ports), a fresh"
            " client for each N; the machine has 2 CPUs for all of them. Median"
            " [min-max].",
            "",
        ]
        rows = [
            [
                "nodes",
                "hosts",
                "W1 jobs/s",
                "client CPU us/job",
                "nodes CPU us/job",
                "W4 MB/s",
            ]
        ]
        for row in crosshost["scale"]:
            nodes_cpu = row.get("nodes_cpu_us_per_job")
            rows.append(
                [
                    str(row["nodes"]),
                    str(row["hosts"]),
                    _range(row["throughput"], "{:,.0f}"),
                    _range(row["client_cpu_us_per_job"], "{:.0f}"),
                    _range(nodes_cpu, "{:.0f}") if nodes_cpu else "-",
                    _range(row["bandwidth"], "{:,.0f}"),
                ]
            )
        lines += [*_table(rows), ""]
    link = crosshost.get("link") or {}
    if "mtu" in link:
        lines += [f"Link (as made, veth defaults): {_link_text(link)}.", ""]
    if image:
        lines += [f"![cross-host scale curve]({image})", ""]
    return lines
