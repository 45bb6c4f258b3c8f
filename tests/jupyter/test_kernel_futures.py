"""Futures, the Executor and recover_jobs in a real kernel's cells, where the
kernel's event loop is running: ``await`` on jobs and futures, as people type it."""

from __future__ import annotations

import pytest

from tests.jupyter.kernel import kernel

pytestmark = pytest.mark.slow


def test_await_jobs_and_executor_futures_in_notebook_cells(tmp_path):
    with kernel(tmp_path) as k:
        k.run_ok(
            "from dispynb import Executor, JobCluster, LocalCluster\n"
            "local = LocalCluster(cpus=2)\n"
            "executor = Executor(nodes=local)\n"
            "def square(x):\n"
            "    return x * x\n"
            "cluster = JobCluster(square, nodes=local)"
        )
        try:
            out = k.run_ok("job = cluster.submit(7)\n(await job, await job.future)")
            assert out.data[-1]["text/plain"] == "(49, 49)"
            out = k.run_ok("await executor.submit(pow, 2, 10)")
            assert out.data[-1]["text/plain"] == "1024"
            failed = k.execute("await executor.submit(divmod, 1, 0)")
            assert failed.ename == "ZeroDivisionError", failed.text
            assert "RemoteError" in failed.error_text, failed.text  # its cause
            failed = k.execute("await cluster.submit('x').future")
            assert failed.ename == "RemoteError", failed.text
            assert "TypeError" in failed.error_text and "in square" in failed.error_text
        finally:
            k.run_ok("cluster.close(); executor.shutdown(); local.close()")


def test_an_executor_call_opening_a_file_uses_pythons_open_not_ipythons(tmp_path):
    """A notebook function given to the Executor calls open(): the open of the
    notebook's namespace is IPython's wrapper, which travelled by value with the
    function, so the node's traceback showed a frame of IPython's own code (as
    %%dispy cells did before they sent Python's open in its place)."""
    with kernel(tmp_path) as k:
        k.run_ok(
            "from dispynb import Executor, LocalCluster\n"
            "local = LocalCluster(cpus=1)\n"
            "executor = Executor(nodes=local)\n"
            "def head(path):\n"
            "    with open(path) as table:\n"
            "        return table.read()"
        )
        try:
            failed = k.execute("executor.submit(head, 'data.csv').result()")
            assert failed.ename == "FileNotFoundError", failed.text
            shown = failed.error_text
            assert "in head" in shown, shown
            assert "interactiveshell" not in shown and "io_open" not in shown, shown
            k.run_ok(f"absolute = {str(tmp_path / 'data.csv')!r}")
            k.run_ok("open(absolute, 'w').write('x,y')")
            out = k.run_ok("list(executor.map(head, [absolute] * 2))")
            assert out.data[-1]["text/plain"] == "['x,y', 'x,y']"
        finally:
            k.run_ok("executor.shutdown(); local.close()")


def test_the_web_monitor_shows_a_link_to_its_page_in_the_notebook(tmp_path):
    """A notebook user starting the web monitor gets a link to click, as a notebook
    shows one: its URL (token and all) came only as text on stderr, shown as if an
    error, and the monitor itself showed as ``<DispyHTTPServer http://...>``."""
    import html

    with kernel(tmp_path) as k:
        k.run_ok(
            "from dispynb import JobCluster, LocalCluster\n"
            "from dispynb.httpd import DispyHTTPServer\n"
            "local = LocalCluster(cpus=1)\n"
            "cluster = JobCluster(len, nodes=local)"
        )
        try:
            started = k.run_ok("monitor = DispyHTTPServer(cluster, port=0)")
            url = k.value("monitor.url")
            link = f'<a href="{html.escape(url)}" target="_blank">'
            shown = k.run_ok("monitor")
            for out in (started, shown):
                assert [d for d in out.data if link in d.get("text/html", "")], out
            assert url in started.data[0]["text/plain"], started
            assert url not in started.stderr, started.stderr
        finally:
            k.run_ok("monitor.shutdown(); cluster.close(); local.close()")


def _streams_until(k, msg_id: str, done, timeout: float = 60.0) -> dict[str, str]:
    """What cells printed, by their message id, gathered from the kernel's output
    until cell ``msg_id`` is idle and ``done(printed)`` holds."""
    import queue
    import time

    printed: dict[str, str] = {}
    idle = False
    deadline = time.monotonic() + timeout
    while not (idle and done(printed)):
        assert time.monotonic() < deadline, printed
        try:
            msg = k.client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        parent = msg["parent_header"].get("msg_id", "")
        content = msg["content"]
        if msg["msg_type"] == "stream":
            printed[parent] = printed.get(parent, "") + content["text"]
        elif msg["msg_type"] == "status" and parent == msg_id:
            idle = idle or content["execution_state"] == "idle"
    return printed


def test_a_map_never_iterated_prints_in_the_cell_that_called_it(tmp_path):
    """``executor.map(report, items)`` for its effects: what its calls printed was
    written only as an iteration reached them, so never, or in the cell that
    iterated. It is now written as each job ends, in the cell that called map
    (not in the cell running then); an iteration later writes it no second time."""
    with kernel(tmp_path) as k:
        k.run_ok(
            "import glob, os, time\n"
            "from dispynb import Executor, LocalCluster\n"
            "local = LocalCluster(cpus=2)\n"
            "executor = Executor(nodes=local)\n"
            "def report(x, mark):\n"
            "    print('reported', x)\n"
            "    open(mark, 'w').close()\n"
            "    return x"
        )
        marks = [str(tmp_path / f"mark{i}") for i in range(3)]
        try:
            mapped = k.submit(f"them = executor.map(report, range(3), {marks!r})")
            printed = k.collect(mapped).stdout
            # The next cell runs as the jobs end: their output is not its own.
            waiting = k.submit(
                "deadline = time.monotonic() + 60\n"
                "while len(glob.glob('mark*')) < 3 and time.monotonic() < deadline:\n"
                "    time.sleep(0.05)"
            )
            streams = _streams_until(
                k,
                waiting,
                lambda p: (printed + p.get(mapped, "")).count("reported") == 3,
            )
            printed += streams.pop(mapped, "")
            lines = sorted(printed.splitlines())
            assert lines == ["reported 0", "reported 1", "reported 2"], printed
            assert not any("reported" in text for text in streams.values()), streams
            out = k.run_ok("list(them)")
            assert out.data[-1]["text/plain"] == "[0, 1, 2]"
            assert "reported" not in out.stdout, out.stdout  # not twice
            # Iterated in its own cell: written there, once, before its values.
            out = k.run_ok("list(executor.map(report, [7, 8], ['m7', 'm8']))")
            assert out.stdout == "reported 7\nreported 8\n", out.stdout
        finally:
            k.run_ok("executor.shutdown(); local.close()")


def test_a_submits_output_shows_in_the_cell_that_called_submit(tmp_path):
    """``future = executor.submit(report, 1)`` in one cell, its job ending as the
    next cell runs: what the call printed went to the cell that had made the
    executor (its I/O thread's); it now goes to the cell that called submit."""
    with kernel(tmp_path) as k:
        k.run_ok(
            "import os, time\n"
            "from dispynb import Executor, LocalCluster\n"
            "local = LocalCluster(cpus=1)\n"
            "executor = Executor(nodes=local)\n"
            "def report(x, gate):\n"
            "    deadline = time.monotonic() + 60\n"
            "    while not os.path.exists(gate) and time.monotonic() < deadline:\n"
            "        time.sleep(0.02)\n"
            "    print('reported', x)\n"
            "    return x"
        )
        gate = str(tmp_path / "gate")
        try:
            submitted = k.submit(f"future = executor.submit(report, 1, {gate!r})")
            printed = k.collect(submitted).stdout
            # The job ends while this cell runs: its output is not this cell's.
            waiting = k.submit(f"open({gate!r}, 'w').close()\nfuture.result(60)")
            streams = _streams_until(
                k, waiting, lambda p: "reported" in printed + p.get(submitted, "")
            )
            printed += streams.pop(submitted, "")
            assert printed == "reported 1\n", (printed, streams)
            assert not any("reported" in text for text in streams.values()), streams
        finally:
            k.run_ok("executor.shutdown(); local.close()")
