"""The figures a node reports about its resources (`nodeserver.monitor`): on Linux
read from ``/proc`` by the node itself, they agree with psutil's."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from nodeserver import monitor

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/stat, /proc/meminfo"
)


@linux_only
def test_the_figures_agree_with_psutils(tmp_path: os.PathLike[str]) -> None:
    cpu, memory, disk, swap = monitor.avail_info(str(tmp_path))
    theirs = psutil.virtual_memory().available
    assert cpu is not None and 0.0 <= cpu <= 100.0
    assert memory is not None and abs(memory - theirs) < 0.05 * theirs
    assert disk is not None
    assert abs(disk - psutil.disk_usage(str(tmp_path)).free) < 64 * 1024 * 1024
    # As dispy's nodes: no swap at all reads as 100% free, not 0.
    assert swap == pytest.approx(100.0 - psutil.swap_memory().percent, abs=1.0)


@linux_only
def test_cpu_available_is_measured_since_the_previous_look() -> None:
    meter = monitor._CpuMeter()
    started = time.process_time()
    while time.process_time() - started < 0.3:  # this process keeps a CPU busy
        sum(range(10_000))
    # One of the N CPUs was busy throughout (give or take a clock tick of 10 ms).
    assert meter.available() <= 100.0 - 100.0 / (os.cpu_count() or 1) + 10.0


def test_elsewhere_psutil_reads_them(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor, "_LINUX", False)
    cpu, memory, disk, swap = monitor.avail_info(str(tmp_path))
    assert cpu is not None and 0.0 <= cpu <= 100.0
    assert memory == pytest.approx(psutil.virtual_memory().available, rel=0.05)
    assert disk is not None and disk > 0
    assert swap is not None and 0.0 <= swap <= 100.0
