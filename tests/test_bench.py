"""Tests of the benchmark (``bench/``): smoke runs of ``run.py`` and the report code.

CI never installs the peers: the smoke runs use dispynb and ProcessPoolExecutor only
(``--quick``), and the report and markdown code is tested on a synthetic document.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RUN = BENCH / "run.py"
REPEATED = (
    "throughput",
    "latency_median",
    "latency_p95",
    "cpu_efficiency",
    "bandwidth",
    "executor_map",
    "start_first_result",
    "start_close",
)
MEMORY = ("mem_nodes_rest", "mem_nodes_peak", "mem_client_rest", "mem_client_peak")

sys.path.insert(0, str(BENCH))
import markdown  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import venvs  # noqa: E402


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


def _run_bench(tmp_path: Path, *options: str) -> dict[str, Any]:
    """Run ``bench/run.py --quick`` and return the JSON document it wrote."""
    command = [sys.executable, str(RUN), "--quick", "--results-dir", str(tmp_path)]
    proc = subprocess.run(
        [*command, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "W1 throughput" in proc.stdout
    (path,) = tmp_path.glob("*.json")
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def _assert_measured(document: dict[str, Any], backends: tuple[str, ...]) -> None:
    for key in REPEATED + MEMORY:
        results = document["metrics"][key]["results"]
        assert set(results) == set(backends), key
        for name in backends:
            assert results[name]["runs"], (key, name)
            assert (
                results[name]["min"] <= results[name]["median"] <= results[name]["max"]
            )
    for key in REPEATED:
        for name in backends:
            assert document["metrics"][key]["results"][name]["min"] > 0, (key, name)
    assert set(document["closure"]) == set(backends)
    assert document["machine"]["nproc"] >= 1
    assert document["machine"]["python"].startswith("3.")


@pytest.mark.timeout(60)
def test_bench_quick_process_pool_only(tmp_path: Path) -> None:
    """The workloads and the report work with the baseline alone (no sockets)."""
    document = _run_bench(tmp_path, "--backends", "ppe")
    _assert_measured(document, ("ppe",))
    # Pickle cannot ship a closure: W6 fails for ProcessPoolExecutor, with the reason.
    assert document["closure"]["ppe"]["ok"] is False
    assert "pickle" in document["closure"]["ppe"]["error"]
    assert {t["status"] for t in document["targets"]} == {"n/a"}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_quick_dispynb_and_process_pool(tmp_path: Path) -> None:
    if not _can_unshare_net():
        pytest.skip(
            "needs `unshare -n` (root or user namespaces) to isolate the network"
        )
    document = _run_bench(tmp_path, "--backends", "dispynb,ppe")
    _assert_measured(document, ("dispynb", "ppe"))
    assert document["closure"]["dispynb"] == {"ok": True, "error": None, "hung": False}
    statuses = {t["metric"]: t["status"] for t in document["targets"]}
    assert statuses["throughput"] in {"PASS", "MISS"}
    assert statuses["latency_median"] == "n/a"  # no peer ran


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_quick_recover_file_on_dispynb(tmp_path: Path) -> None:
    """W9 alone: dispynb's tiny jobs without and with recover_file, and the ratio,
    in the JSON and the table (the peers and the other workloads not run)."""
    if not _can_unshare_net():
        pytest.skip(
            "needs `unshare -n` (root or user namespaces) to isolate the network"
        )
    command = [sys.executable, str(RUN), "--quick", "--results-dir", str(tmp_path)]
    proc = subprocess.run(
        [*command, "--only", "recover_file", "--backends", "dispynb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    (path,) = tmp_path.glob("*.json")
    metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    off = metrics["recover_file_off"]["results"]["dispynb"]["median"]
    on = metrics["recover_file_on"]["results"]["dispynb"]["median"]
    ratio = metrics["recover_file_ratio"]["results"]["dispynb"]["median"]
    assert off > 0 and on > 0
    assert ratio == pytest.approx(on / off)
    assert "W9 recover_file cost (with/without)" in proc.stdout
    assert "throughput" not in metrics


def _fake_result(scale: float, *, closure: bool = True) -> dict[str, Any]:
    """A driver result whose numbers are all proportional to ``scale``."""
    snap = {
        "client": {"rss": 20 * 2**20, "hwm": 40 * 2**20},
        "nodes": [
            {
                "pid": 1,
                "label": "python -m worker",
                "rss": int(scale * 2**20),
                "hwm": 0,
            },
            {
                "pid": 2,
                "label": "python -m worker",
                "rss": int(scale * 2**20),
                "hwm": 0,
            },
        ],
        "nodes_rss": int(2 * scale * 2**20),
        "nodes_hwm": int(3 * scale * 2**20),
    }
    return {
        "runs": {
            "throughput": [1000 * scale, 900 * scale, 1100 * scale],
            "latency_median": [1.0 / scale] * 3,
            "latency_p95": [2.0 / scale] * 3,
            "cpu_efficiency": [0.5 * scale] * 3,
            "cpu_wall": [5.0] * 3,
            "bandwidth": [100 * scale] * 3,
        },
        "describe": {"version": "1.0", "config": "two workers"},
        "memory_rest": {**snap, "nodes_pss": int(1.5 * scale * 2**20)},
        "memory_peak": snap,
        "memory_after_w1": {**snap, "nodes_pss": int(scale * 2**20)},
        "closure": {"ok": closure, "error": None if closure else "NameError: x"},
        "startup": [{"first_result": 0.4 / scale, "close": 0.1}] * 3,
    }


def _document() -> dict[str, Any]:
    return report.build_report(
        results={
            "dispynb": _fake_result(2.0),
            "ray": _fake_result(1.0),
            "dispy": _fake_result(0.5, closure=False),
            "ppe": _fake_result(3.0),
            "dask": {
                "error": "Traceback ...\nImportError: no module named distributed"
            },
        },
        config={
            "workers": 2,
            "repeat": 3,
            "command": "bench/run.py",
            "wall_seconds": 60,
        },
        scale={
            "nodes": [
                {
                    "nodes": n,
                    "jobs": 100,
                    "jobs_per_s": [1000.0, 1200.0],
                    "client_cpu_us_per_job": [50.0],
                    "nodes_cpu_us_per_job": [80.0],
                }
                for n in (1, 2)
            ],
            "queued": [
                {
                    "queued": 1000,
                    "rss_before": 0,
                    "rss_after": 2**20,
                    "bytes_per_job": 1048.6,
                    "submit_per_s": 5e4,
                    "close_terminate_s": 0.1,
                }
            ],
        },
        machine={"nproc": 2, "python": "3.11.7", "platform": "Linux", "commit": "abc"},
    )


def test_report_statistics_and_targets() -> None:
    """Medians, ranges and issue 7's relative targets on a synthetic run."""
    document = _document()
    throughput = document["metrics"]["throughput"]["results"]
    assert throughput["dispynb"] == {
        "runs": [2000.0, 1800.0, 2200.0],
        "median": 2000.0,
        "min": 1800.0,
        "max": 2200.0,
    }
    assert "dask" not in throughput and "error" in document["backends"]["dask"]
    assert document["metrics"]["mem_nodes_rest"]["results"]["dispynb"]["median"] == 4.0
    targets = {t["target"]: t for t in document["targets"]}
    # Best peer is Ray (1,000 jobs/s): 3 x 1,000 > dispynb's 2,000.
    w1 = targets["W1 >= 3x the best peer"]
    assert (w1["status"], w1["limit"]) == ("MISS", 3000.0)
    assert w1["ratio"] == pytest.approx(2 / 3)
    assert targets["W1 >= half of ProcessPoolExecutor"]["status"] == "PASS"
    w2 = targets["W2 median <= a third of the best peer's"]
    assert (w2["status"], w2["limit"]) == ("MISS", pytest.approx(1 / 3))
    assert targets["W3 efficiency >= 0.95"]["status"] == "PASS"
    assert targets["W4 >= the best peer"]["status"] == "PASS"
    assert targets["W5 start to first result < 0.5 s"]["status"] == "PASS"
    assert targets["node memory at rest <= dispy's"]["status"] == "MISS"
    pss = document["metrics"]["mem_nodes_pss_w1"]["results"]
    assert (pss["dispynb"]["median"], pss["dispy"]["median"]) == (2.0, 0.5)
    assert targets["node PSS after W1 <= dispy's"]["status"] == "MISS"
    rest = document["metrics"]["mem_nodes_pss_rest"]["results"]
    assert (rest["dispynb"]["median"], rest["dispy"]["median"]) == (3.0, 0.75)


def test_memory_snapshot_sums_the_pss_of_the_descendants() -> None:
    """PSS splits the pages a parent and its forked child share: their sum stays
    under the sum of their RSS (which counts the shared pages twice)."""
    import memory

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        snap = memory.snapshot(pss=True)
        assert [n["pid"] for n in snap["nodes"]] == [child.pid]
        assert 0 < snap["nodes_pss"] == snap["nodes"][0]["pss"] <= snap["nodes_rss"]
        assert 0 < snap["nodes_uss"] == snap["nodes"][0]["uss"] < snap["nodes_pss"]
        assert "nodes_pss" not in memory.snapshot()
    finally:
        child.communicate(b"")
    assert memory.proportional_size(child.pid) == (0, 0)  # gone


def test_a_pss_that_cannot_be_read_is_unavailable_not_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As non-root, ``smaps_rollup`` of dispynb's node server and zygote (not
    dumpable) refuses to open: their PSS read 0, and the report's sums passed for
    the nodes' memory. The snapshot says unavailable, and so does the report where
    the number would be."""
    import builtins

    import memory

    def open_but_rollups(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/smaps_rollup"):  # what a non-dumpable one does
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(memory, "open", open_but_rollups, raising=False)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        snap = memory.snapshot(pss=True)
        with pytest.raises(PermissionError, match=r"unavailable \(needs root\)"):
            memory.proportional_size(child.pid)
    finally:
        child.communicate(b"")
    [node] = snap["nodes"]
    assert (node["pss"], node["uss"]) == (None, None) and node["rss"] > 0
    assert (snap["nodes_pss"], snap["nodes_uss"]) == (None, None)
    assert snap["pss_unavailable"] == "unavailable (needs root)"

    result = _fake_result(2.0)
    for phase in ("memory_rest", "memory_after_w1"):
        result[phase] = {
            **result[phase],
            "nodes": [{**n, "pss": None, "uss": None} for n in snap["nodes"]],
            "nodes_pss": None,
            "pss_unavailable": snap["pss_unavailable"],
        }
    document = report.build_report(
        results={"dispynb": result, "dispy": _fake_result(0.5)},
        config={"workers": 2, "repeat": 3, "command": "x", "wall_seconds": 1},
        machine={"nproc": 2, "python": "3.11", "platform": "Linux", "commit": "abc"},
    )
    assert "dispynb" not in document["metrics"]["mem_nodes_pss_w1"]["results"]
    rows = {row[0]: row[2:] for row in report.table_rows(document)}
    for label in (
        "nodes/workers at rest (PSS sum)",
        "nodes/workers after W1 (PSS sum)",
    ):
        assert rows[label][0] == "unavailable (needs root)", rows[label]
        assert rows[label][1] != "unavailable (needs root)"  # dispy's was read
    targets = {t["target"]: t for t in document["targets"]}
    assert targets["node PSS after W1 <= dispy's"]["status"] == "n/a"
    text = markdown.render_markdown(document, {})
    assert f"| `{node['label']}` unavailable (needs root) |" in text


def test_report_table_and_markdown() -> None:
    """The text table and the markdown show every framework, the targets, W6."""
    document = _document()
    table = report.format_table(document)
    assert "2,000 [1,800-2,200]" in table
    assert "MISS  W1 >= 3x the best peer" in table
    assert "Dask FAILED: ImportError" in table
    text = markdown.render_markdown(document, {"comparison": "benchmark.png"})
    assert "| W6 __main__ closure + helper | runs? | yes | no | - | yes | yes |" in text
    assert "![comparison of all frameworks](benchmark.png)" in text
    assert "**MISS**" in text and "**PASS**" in text
    assert "2 x `python -m worker` 2.0" in text
    assert "## Scale curve (dispynb)" in text and "| 1,000 | 1.0 MiB | 1,049 |" in text
    assert "- Dask: `ImportError: no module named distributed`" in text


def test_engine_rows_against_the_raw_engine() -> None:
    """Issue 14's targets: dispynb-on-Dask against raw Dask of the same run (W1, W4
    at least 0.9x, W2 at most 1.1x), as a markdown section spliced into a report
    that a run of only those rows must not overwrite."""
    document = report.build_report(
        results={"dask": _fake_result(1.0), "dispynb-dask": _fake_result(0.95)},
        config={"workers": 2, "repeat": 3, "command": "bench/run.py"},
        scale=None,
        machine={"nproc": 2},
    )
    entries = {e["metric"]: e for e in report.evaluate_engine_targets(document)}
    assert set(entries) == {"throughput", "latency_median", "bandwidth"}
    assert entries["throughput"]["ratio"] == pytest.approx(0.95)
    assert entries["throughput"]["status"] == "PASS"  # >= 0.9x
    assert entries["bandwidth"]["status"] == "PASS"
    assert entries["latency_median"]["ratio"] == pytest.approx(1 / 0.95)
    assert entries["latency_median"]["status"] == "PASS"  # <= 1.1x
    slow = report.build_report(
        results={"dask": _fake_result(1.0), "dispynb-dask": _fake_result(0.8)},
        config={"workers": 2, "repeat": 3},
        scale=None,
        machine={},
    )
    statuses = {e["metric"]: e["status"] for e in report.evaluate_engine_targets(slow)}
    assert statuses == {
        "throughput": "MISS",
        "latency_median": "MISS",
        "bandwidth": "MISS",
    }
    assert "MISS  dispynb on Dask, W1" in report.format_table(slow)
    full = markdown.render_markdown(_document(), {})
    # No engine rows in that run: the heading only carries the section's notes.
    assert "| engine | metric |" not in full
    engines = full[full.index(markdown.ENGINES_HEADING) :]
    assert engines.index(markdown.ABSENT) < engines.index("## W6")
    spliced = markdown.splice_engine_section(full, document)
    assert spliced.index(markdown.ENGINES_HEADING) < spliced.index("## W6")
    assert "| Dask | W1 throughput (trivial jobs) |" in spliced
    again = markdown.splice_engine_section(spliced, slow)
    assert again.count(markdown.ENGINES_HEADING) == 1 and "**MISS**" in again
    assert again.replace("**MISS**", "**PASS**").count("## ") == spliced.count("## ")


def test_backend_selection_and_venvs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--backends all`` selects every backend; a missing environment cannot be
    installed inside the namespace and says how to prepare it."""
    args = run.parse_args(["--backends", "all", "--report"])
    assert args.backends == list(report.BACKENDS)
    assert run.needed_venvs(args) == [
        "dispy",
        "ipyparallel",
        "dask",
        "ray",
        "loky",
        "plot",
    ]
    assert run.needs_isolation(args)
    assert not run.needs_isolation(run.parse_args(["--backends", "ppe"]))
    monkeypatch.setattr(venvs, "VENV_ROOT", tmp_path)
    with pytest.raises(venvs.VenvError, match="--prepare"):
        venvs.ensure_venv("loky", install=False)


def test_the_projects_bytecode_is_compiled_before_the_run_even_where_none_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peers run from environments pip installed, bytecode compiled; dispynb from
    the tree. Where ``PYTHONDONTWRITEBYTECODE`` is set every process the run started
    compiled dispynb's sources again (0.2 s of CPU per W5 start, 1.3-1.8 MiB of node
    PSS): the run now compiles them first, as ``pip install`` does, and says so."""
    package = tmp_path / "benchpkg"
    (package / "sub").mkdir(parents=True)
    for module in (package / "__init__.py", package / "sub" / "deep.py"):
        module.write_text("VALUE = 1\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    said = run.compile_project(("benchpkg", "not_a_package_here"))
    assert said.startswith("compiled before the run") and str(package) in said
    for module in (package / "__init__.py", package / "sub" / "deep.py"):
        assert Path(importlib.util.cache_from_source(str(module))).is_file()
    assert run.compile_project(("not_a_package_here",)).startswith("not compiled")
    document = _document()
    document["config"]["bytecode"] = said
    text = markdown.render_markdown(document, {})
    assert f"dispynb's bytecode: {said}." in text


_CLIENT_IMPORTS = """
import sys
sys.path.insert(0, sys.argv[1])
import backends
before = {"dispynb.cluster", "dispynb.local"} & set(sys.modules)
backends.DispynbBackend(2)
print(sorted(before), sorted({"dispynb.cluster", "dispynb.local"} & set(sys.modules)))
"""


def test_w5_imports_what_a_program_imports_before_its_clock_starts() -> None:
    """W5's clock covers making the cluster, not importing the package (the README,
    and every peer's row: ``import dask`` or ``import ray`` loads their clusters'
    code). dispynb's package loads its classes when a name is first used, so
    ``import dispynb`` alone left 178 modules (75 ms of CPU) inside the clock."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT_IMPORTS, str(BENCH)],
        capture_output=True, text=True, cwd=BENCH, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["[]", "['dispynb.cluster',", "'dispynb.local']"]


def test_bandwidth_waits_the_backends_release_wait_before_each_timed_repetition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """W4 waits ``release_wait`` (the Ray rows: Ray frees a repetition's arguments
    late) before the clock starts, each repetition; 0 for a backend without it."""
    import workloads

    events: list[Any] = []
    monkeypatch.setattr(workloads.time, "sleep", lambda s: events.append(("wait", s)))

    class Fake:
        name = "fake"

        def submit_and_wait(self, fn: Any, arglists: list[tuple[Any, ...]]) -> list:
            events.append("run")
            return [len(args[0]) for args in arglists]

    class Waiting(Fake):
        release_wait = 1.5

    w4 = workloads.Bandwidth(fn=len, jobs=2, size=16)
    w4.warm_up(Waiting())
    for _ in range(2):
        assert w4.measure(Waiting())["bandwidth"] > 0
    assert events == ["run", ("wait", 1.5), "run", ("wait", 1.5), "run"]
    events.clear()
    w4.measure(Fake())
    assert events == [("wait", 0.0), "run"]


class _FakeCpus:
    """`/proc/stat` totals for `quiet.wait_until_quiet`: each sample adds 100 ticks,
    of which the given share was busy; a clock that only the fake sleep moves."""

    def __init__(self, busy: list[float]) -> None:
        self.busy = busy
        self.total = self.idle = 0
        self.now = 0.0
        self.sleeps: list[float] = []

    def sample(self) -> tuple[int, int]:
        return self.total, self.idle

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        share = self.busy.pop(0) if self.busy else 1.0
        self.total += 100
        self.idle += round(100 * (1 - share))

    def clock(self) -> float:
        return self.now


def test_quiet_waits_for_one_quiet_window_or_gives_up_after_max_wait() -> None:
    """W4 cold's clock starts after the first window with the CPUs at most BUSY
    busy; on a machine that stays busy, after MAX_WAIT, with the load it had."""
    import quiet

    def wait(cpus: _FakeCpus) -> quiet.Settled:
        return quiet.wait_until_quiet(
            window=0.2,
            busy=0.15,
            max_wait=1.0,
            sample=cpus.sample,
            sleep=cpus.sleep,
            clock=cpus.clock,
        )

    quiet_now = _FakeCpus([0.05])
    assert wait(quiet_now) == {"waited": 0.2, "busy": 0.05}
    later = _FakeCpus([0.9, 0.6, 0.1])
    assert wait(later) == {"waited": 0.6, "busy": 0.1}
    assert later.sleeps == [0.2, 0.2, 0.2]
    never = _FakeCpus([])
    assert wait(never) == {"waited": 1.0, "busy": 1.0}
    assert len(never.sleeps) == 5

    def unreadable() -> tuple[int, int]:
        raise OSError("no /proc/stat")

    settled = quiet.wait_until_quiet(sample=unreadable, sleep=never.sleep)
    assert settled == {"waited": 0.0, "busy": None}
    assert len(never.sleeps) == 5  # no window was sampled
    total, idle = quiet.cpu_times()  # this machine's (Linux)
    assert 0 <= idle <= total


def test_w4_cold_starts_its_clock_once_the_cpus_are_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warm-up job, fresh payloads, wait for quiet CPUs, then the timed jobs; the
    wait and the load are in the result, and the report prints them."""
    import workloads

    events: list[Any] = []

    def settle(max_wait: float) -> dict[str, float]:
        events.append(("quiet", max_wait))
        return {"waited": 1.5, "busy": 0.1}

    monkeypatch.setattr(workloads, "wait_until_quiet", settle)

    class Fake:
        name = "fake"

        def round_trip(self, fn: Any, arg: Any) -> Any:
            events.append("warm")
            return fn(arg)

        def submit_and_wait(self, fn: Any, arglists: list[tuple[Any, ...]]) -> list:
            events.append("run")
            return [len(args[0]) for args in arglists]

    w4 = workloads.Bandwidth(fn=len, jobs=2, size=16, quiet_max_wait=3.0)
    result = w4.measure_cold(Fake())
    assert events == ["warm", ("quiet", 3.0), "run"]
    # A smoke run (--quick) waits little: its numbers are not read.
    assert workloads.QUICK.quiet_max_wait < workloads.FULL.quiet_max_wait
    assert result["quiet_wait"] == 1.5
    assert result["busy_at_start"] == 0.1
    assert result["bandwidth_cold"] > 0
    fake = _fake_result(2.0)
    fake["runs"]["bandwidth_cold"] = [2000.0, 2500.0]
    fake["cold_start"] = [{"waited": 1.5, "busy": 0.1}, {"waited": 0.2, "busy": None}]
    document = report.build_report(
        results={"dispynb": fake},
        config={"workers": 2, "repeat": 2},
        scale=None,
        machine={},
    )
    assert document["backends"]["dispynb"]["cold_start"] == fake["cold_start"]
    text = report.format_table(document)
    assert "W4 cold per repetition, dispynb: 2,000, 2,500 MB/s" in text
    assert "started after 1.5 s, CPUs 10% busy; no wait (load unknown)" in text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_w7_on_an_engine_that_refuses_put_is_reported_unsupported(
    tmp_path: Path,
) -> None:
    """dispynb on Dask refuses ``put`` (its engine lacks ``job_depends``): the
    driver says W7 is not supported there, with dispynb's reason, instead of
    failing; the report lists it under "What did not run" as not supported."""
    out = tmp_path / "result.json"
    params = {"mode": "objects", "backend": "dispynb-dask", "quick": True}
    # Not `run.run_driver`: it reaps every child of this process (pytest's own too).
    subprocess.run(
        [sys.executable, str(BENCH / "driver.py")],
        input=json.dumps({**params, "out": str(out)}),
        text=True,
        cwd=BENCH,
        timeout=100,
        check=False,
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    assert "error" not in result, result.get("error")
    assert "put is not supported on the 'dask' engine" in result["unsupported"]
    document = report.build_report(
        results={
            "dispynb": _fake_result(2.0),
            "dispynb-dask": {**_fake_result(1.0), "unsupported": {"W7": "no put"}},
        },
        config={"workers": 2, "repeat": 3},
        scale=None,
        machine={},
    )
    text = markdown.render_markdown(document, {})
    assert "- dispynb on Dask, W7: not supported (`no put`)" in text
    assert "dispynb on Dask, W7: not supported (no put)" in report.format_table(
        document
    )
