"""Tests of the cross-host benchmark (``bench/crosshost.py``, ``run.py --cross-host``):
one small real run between namespace hosts, and its report on a synthetic result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.multihost.netns import namespaces, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

sys.path.insert(0, str(BENCH))
import crosshost_report  # noqa: E402
import markdown  # noqa: E402
import report  # noqa: E402


def _positive(values: list[float]) -> bool:
    return bool(values) and all(value > 0 for value in values)


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.timeout(240)
def test_crosshost_quick_run_measures_every_row(tmp_path: Path) -> None:
    """``run.py --cross-host --quick``: 4 node hosts + a client host; W1, W4, raw
    TCP (plain and shaped link) and the scale rows, all positive; nothing left."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    command = [
        sys.executable,
        str(BENCH / "run.py"),
        "--cross-host",
        "--quick",
        "--repeat",
        "2",
        "--results-dir",
        str(tmp_path),
    ]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=220)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # its hosts are named after its pid (netns.Network): none is left
    assert not [n for n in namespaces() if n.startswith(f"dnb{proc.pid}-")]
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "cross-host W4 >= 0.8x raw TCP" in stdout
    (path,) = tmp_path.glob("*.json")
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    crosshost = document["crosshost"]
    assert "error" not in crosshost
    assert document["backends"] == {}
    main = crosshost["main"]
    assert main["nodes"] == 4
    for key in ("throughput", "client_cpu_us_per_job", "bandwidth", "raw_tcp"):
        assert len(main[key]) == 2 and _positive(main[key]), key
    # CPU beside each rate (other processes' in clock ticks: may round to 0 here)
    for key in (
        "nodes_cpu_us_per_job",
        "client_cpu_ms_per_mb",
        "nodes_cpu_ms_per_mb",
        "raw_sender_cpu_ms_per_mb",
        "raw_receivers_cpu_ms_per_mb",
    ):
        assert len(main[key]) == 2 and min(main[key]) >= 0, key
    shaped = crosshost["shaped"]
    assert shaped["rate"] == "1gbit"
    assert _positive(shaped["bandwidth"]) and _positive(shaped["raw_tcp"])
    # 1 Gbit/s is 125 MB/s: the shaping took effect (and the link carried data)
    assert max(shaped["raw_tcp"]) < 140
    assert [row["nodes"] for row in crosshost["scale"]] == [1, 2]
    for row in crosshost["scale"]:
        assert _positive(row["throughput"]) and _positive(row["bandwidth"])
    assert crosshost["link"]["mtu"] > 0
    target = crosshost_report.crosshost_target(crosshost)
    assert target is not None and target["status"] in {"PASS", "MISS"}


def _crosshost(w4: float, raw: float) -> dict[str, Any]:
    return {
        "params": {"cpus_per_node": 1},
        "link": {"mtu": 1500, "qdisc": "noqueue", "sysctl": {}},
        "main": {
            "nodes": 4,
            "jobs": 100,
            "throughput": [1000.0, 1100.0, 900.0],
            "client_cpu_us_per_job": [50.0, 51.0, 52.0],
            "bandwidth": [w4, w4 * 1.1, w4 * 0.9],
            "raw_tcp": [raw] * 3,
            "payloads": {"jobs": 20, "bytes_per_job": 10_000_000},
        },
        "shaped": {"rate": "1gbit", "bandwidth": [110.0], "raw_tcp": [116.0]},
        "scale": [
            {
                "nodes": n,
                "hosts": min(n, 4),
                "throughput": [500.0 * n],
                "client_cpu_us_per_job": [60.0],
                "bandwidth": [300.0],
            }
            for n in (1, 2, 4, 8, 16)
        ],
    }


def test_crosshost_target_table_and_splice() -> None:
    """The 0.8x target per repetition and of the medians, the text lines, and the
    markdown section spliced into a report (replaced on a second splice, the engines
    section left alone)."""
    miss = crosshost_report.crosshost_target(_crosshost(400.0, 1000.0))
    assert miss is not None
    assert miss["status"] == "MISS" and miss["ratio"] == pytest.approx(0.4)
    assert miss["ratios"] == pytest.approx([0.4, 0.44, 0.36])
    hit = crosshost_report.crosshost_target(_crosshost(850.0, 1000.0))
    assert hit is not None and hit["status"] == "PASS"
    assert hit["every_repetition"] is False  # its 0.9x repetition: 765 / 1000
    shaped = crosshost_report.crosshost_target(_crosshost(1.0, 1.0), "shaped")
    assert shaped is not None and shaped["ratio"] == pytest.approx(110 / 116)

    document = report.build_report(
        results={},
        config={"repeat": 3, "command": "bench/run.py --cross-host"},
        crosshost=_crosshost(400.0, 1000.0),
        machine={"nproc": 2, "python": "3.11.7"},
    )
    text = report.format_table(document)
    assert "MISS  cross-host W4 >= 0.8x raw TCP: 0.40x" in text
    assert "PASS  cross-host W4 >= 0.8x raw TCP (client link 1gbit): 0.95x" in text
    assert "scale 16 nodes on 4 hosts" in text

    engines = "## dispynb on Dask and Ray: overhead over the engine alone"
    existing = "\n".join(
        ["# Benchmarks", "", engines, "", "kept", "", "## Reading the numbers", ""]
    )
    once = markdown.splice(existing, document, "crosshost.png")
    assert crosshost_report.HEADING in once and "kept" in once
    assert once.index(crosshost_report.HEADING) < once.index("## Reading the")
    assert "| W4 / raw TCP, veth | 0.40, 0.44, 0.36 | 0.40 |" in once
    assert "![cross-host scale curve](crosshost.png)" in once
    again = markdown.splice(once, document, "crosshost.png")
    assert again == once


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_crosshost_help_says_how_to_run_it(option: str) -> None:
    """``crosshost.py --help`` printed a JSON traceback: it read its parameters
    from stdin."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "crosshost.py"), option],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "python bench/crosshost.py w4 [REPEAT]" in done.stdout
    assert "Traceback" not in done.stderr
