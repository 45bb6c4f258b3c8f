"""Smoke tests of the benchmark script ``bench/run.py`` (run as a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
METRICS = ("throughput", "latency_median", "latency_p95", "bandwidth")


def _can_unshare_net() -> bool:
    """Whether this process may create a network namespace (root or user ns)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        probe = subprocess.run(
            ["unshare", "-n", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _run_bench(tmp_path: Path, *options: str, isolated: bool) -> dict[str, Any]:
    """Run ``bench/run.py --quick`` and return the JSON document it wrote."""
    command = [sys.executable, str(RUN), "--quick", "--results-dir", str(tmp_path)]
    command += options
    if isolated:
        # The same wrapper as ./dev bench: a private network namespace, only lo up.
        wrapper = 'ip link set lo up && exec "$@"'
        command = ["unshare", "-n", "sh", "-c", wrapper, "sh", *command]
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=45, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "throughput" in proc.stdout
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_positive(document: dict[str, Any], backends: tuple[str, ...]) -> None:
    assert set(document["metrics"]) == set(METRICS)
    for key in METRICS:
        results = document["metrics"][key]["results"]
        assert set(results) == set(backends), key
        for name in backends:
            result = results[name]
            assert result["runs"], (key, name)
            assert all(value > 0 for value in result["runs"]), (key, name)
            assert result["median"] > 0 and result["best"] > 0, (key, name)
    assert document["machine"]["nproc"] >= 1
    assert document["machine"]["python"].startswith("3.")
    assert document["machine"]["platform"]


def test_bench_quick_process_pool_only(tmp_path: Path) -> None:
    """The workloads and the report work with the baseline alone (no nodes started)."""
    document = _run_bench(tmp_path, "--backends", "ppe", isolated=False)
    _assert_positive(document, ("ppe",))
    assert document["backends"]["ppe"]["max_workers"] == 2
    assert document["metrics"]["throughput"]["ratio"] is None


@pytest.mark.slow
def test_bench_quick_dispynb_and_process_pool(tmp_path: Path) -> None:
    if not _can_unshare_net():
        pytest.skip(
            "needs `unshare -n` (root or user namespaces) to isolate the network"
        )
    document = _run_bench(tmp_path, "--backends", "dispynb,ppe", isolated=True)
    _assert_positive(document, ("dispynb", "ppe"))
    for key in METRICS:
        assert document["metrics"][key]["ratio"] > 0, key
    assert document["metrics"]["throughput"]["status"] in {"PASS", "MISS"}
