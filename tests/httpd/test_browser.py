"""The monitor page in a real Chromium: live updates, cancel, CPUs, no script injection.

Set ``DISPYNB_SCREENSHOTS=1`` to refresh ``docs/monitor.png`` (CI leaves it alone).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from dispynb.httpd import DispyHTTPServer
from tests import jobs
from tests.browser import chromium_page, requires_chromium
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.nodeproc import running_node

pytestmark = [pytest.mark.browser, pytest.mark.slow, requires_chromium]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "monitor.png"
XSS_ID = '<img id="xss" src="/x" onerror="document.title=\'pwned\'">'


@pytest.fixture
def monitored() -> Iterator[tuple[JobCluster, DispyHTTPServer]]:
    """A cluster of its own (cancelling replaces workers) and its monitor."""
    with (
        LocalCluster(cpus=2) as local,
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
    ):
        server = DispyHTTPServer(cluster, port=0, poll_sec=5, show_job_args=True)
        try:
            yield cluster, server
        finally:
            server.shutdown(wait=False)


def count(page, name: str) -> int:
    return int(page.locator(f'[data-count="{name}"] b').inner_text())


def job_row(page, job: DispyJob):
    return page.locator(f'#jobs tbody tr[data-key="{job._key}"]')


def test_monitor_page_live_cancel_and_cpus(monitored, tmp_path):
    from playwright.sync_api import expect

    cluster, server = monitored
    origin = f"http://127.0.0.1:{server.port}"
    with chromium_page(viewport={"width": 1400, "height": 900}) as page:
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"),
        )
        page.on(
            "request",
            lambda req: req.url.startswith(origin) or problems.append(req.url),
        )

        page.goto(server.url)
        # ?token= went to the tab's sessionStorage and off the address bar.
        assert page.url == f"{origin}/"
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#cluster-name")).to_have_text("mark_and_sleep")
        node = cluster.status().nodes[0]
        node_row = page.locator(f'#nodes tbody tr[data-key="127.0.0.1:{node.port}"]')
        expect(node_row.locator(".c-name")).to_have_text(node.name)
        expect(node_row.locator(".c-cpus")).to_have_text("2")

        # The job table and the counts move as jobs finish.
        quick = [cluster.submit(None, 0.05) for _ in range(8)]
        quick.append(cluster.submit_job_id(XSS_ID, None, 0))
        assert cluster.wait(timeout=WAIT)
        expect(page.locator('[data-count="finished"] b')).to_have_text("9")
        expect(page.locator("#jobs tbody tr")).to_have_count(9)
        expect(job_row(page, quick[0]).locator(".status")).to_have_text("Finished")
        expect(job_row(page, quick[0]).locator(".c-args")).to_have_text("None, 0.05")
        # A job id full of HTML is shown as text, never run.
        expect(job_row(page, quick[-1]).locator(".c-id")).to_have_text(repr(XSS_ID))
        assert page.locator("#xss").count() == 0
        assert page.title() != "pwned"

        # Cancel a running job from the page.
        markers = [str(tmp_path / name) for name in ("a", "b")]
        first, second = (cluster.submit(marker, 30) for marker in markers)
        waiting = [cluster.submit(None, 30) for _ in range(2)]
        for marker in markers:
            wait_for_path(marker)
        expect(job_row(page, first).locator(".status")).to_have_text("Running")
        expect(page.locator('[data-count="running"] b')).not_to_have_text("0")
        job_row(page, first).locator("button.cancel").click()
        expect(page.locator("#message")).to_have_text(f"job {first._key} cancelled")
        assert first.wait(WAIT)
        assert first.status == DispyJob.Terminated
        expect(job_row(page, first).locator(".status")).to_have_text("Terminated")
        expect(job_row(page, first).locator("button.cancel")).to_be_hidden()

        # Change the node's CPUs from the page.
        node_row.locator("input").fill("1")
        node_row.locator("button", has_text="Set").click()
        expect(page.locator("#message")).to_have_text(re.compile("now uses 1 CPU"))
        expect(node_row.locator(".c-cpus")).to_have_text("1")
        wait_until(lambda: cluster.status().nodes[0].cpus == 1)

        # Cancel all: two clicks (the first one only arms the button).
        button = page.locator("#cancel-all")
        button.click()
        expect(button).to_have_text("Click again to cancel all")
        button.click()
        expect(page.locator("#message")).to_have_text(
            re.compile(r"\d+ job\(s\) cancelled")
        )
        assert cluster.wait(timeout=WAIT)
        for job in [second, *waiting]:
            assert job.status in (DispyJob.Cancelled, DispyJob.Terminated)
        expect(page.locator('[data-count="running"] b')).to_have_text("0")
        expect(page.locator('[data-count="pending"] b')).to_have_text("0")
        assert count(page, "total") == 13
        assert problems == []


def simulate(samples: int, seconds: float) -> float:
    """A job for the screenshot: pretend to work, return a number."""
    import time

    time.sleep(seconds)
    return samples / 1e6


@pytest.mark.skipif(
    os.environ.get("DISPYNB_SCREENSHOTS") != "1",
    reason="set DISPYNB_SCREENSHOTS=1 to refresh docs/monitor.png",
)
def test_screenshot_for_the_readme():
    """docs/monitor.png: two nodes, jobs finished, running, pending and cancelled."""
    from playwright.sync_api import expect

    with (
        LocalCluster(nodes=2, cpus=1) as local,
        JobCluster(simulate, nodes=local) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        server = DispyHTTPServer(cluster, port=0, show_job_args=True)
        try:
            batch = [
                cluster.submit_job_id(f"batch-{i:02d}", 250_000 * (i + 1), 0.4)
                for i in range(24)
            ]
            cluster.cancel(batch[-1])
            with chromium_page(viewport={"width": 1400, "height": 860}) as page:
                page.goto(server.url)
                expect(page.locator("#nodes tbody tr")).to_have_count(2)
                wait_until(
                    lambda: sum(job.status == DispyJob.Finished for job in batch) >= 9
                )
                expect(page.locator('[data-count="finished"] b')).not_to_have_text("0")
                page.screenshot(path=str(SCREENSHOT))
            for job in batch:
                cluster.cancel(job)
            assert cluster.wait(timeout=WAIT)
        finally:
            server.shutdown(wait=False)
    assert SCREENSHOT.stat().st_size > 10_000


def test_monitor_page_switches_between_added_clusters():
    """dispy's ``add_cluster``: a choice of cluster appears; the page follows it, and
    ``del_cluster`` of the one shown falls back to the first."""
    from playwright.sync_api import expect

    with (
        LocalCluster(cpus=2) as local,
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
        JobCluster(jobs.square, nodes=local) as other,
        chromium_page() as page,
    ):
        server = DispyHTTPServer(cluster, port=0, poll_sec=5)
        try:
            page.goto(server.url)
            select = page.locator("#cluster-select")
            expect(page.locator("#cluster-name")).to_have_text("mark_and_sleep")
            expect(select).to_be_hidden()  # one cluster: no choice to make

            server.add_cluster(other)
            for n in range(3):
                other.submit(n)
            assert other.wait(timeout=WAIT)
            cluster.submit(None, 0)  # a change wakes the page's long-poll
            expect(select).to_be_visible()
            select.select_option("square")
            expect(page.locator("#cluster-name")).to_have_text("square")
            expect(page.locator('[data-count="finished"] b')).to_have_text("3")
            expect(page.locator("#jobs tbody tr")).to_have_count(3)

            server.del_cluster(other)
            expect(page.locator("#cluster-name")).to_have_text("mark_and_sleep")
            expect(select).to_be_hidden()
        finally:
            server.shutdown(wait=False)


XSS = (
    '"><img id="xss" src="/x" onerror="window.pwned=1"><script>window.pwned=2</script>'
)


def shown_as_text(x: int) -> int:
    return x


shown_as_text.__name__ = "run" + XSS + "\x1b[31m"


def test_names_from_the_cluster_and_its_nodes_are_text(tmp_path):
    """A computation, a node, a job id and arguments named with markup, a
    script and a terminal escape: shown as text in the title, the header, the
    cluster choice and the tables; nothing runs."""
    from playwright.sync_api import expect

    secret = "s" * 40
    with (
        running_node(tmp_path / "node", name="node" + XSS, secret=secret) as node,
        JobCluster(shown_as_text, nodes=[node.spec], secret=secret) as cluster,
        JobCluster(jobs.square, nodes=[node.spec], secret=secret) as other,
        chromium_page() as page,
    ):
        server = DispyHTTPServer(cluster, port=0, poll_sec=5, show_job_args=True)
        server.add_cluster(other)
        try:
            job = cluster.submit_job_id("id" + XSS, 7)
            assert job() == 7
            page.goto(server.url)
            expect(page.locator("#cluster-name")).to_have_text(cluster.name)
            expect(page.locator("#nodes .c-name")).to_have_text("node" + XSS)
            row = job_row(page, job)
            expect(row.locator(".c-id")).to_contain_text(repr("id" + XSS)[:60])
            expect(row.locator(".c-args")).to_have_text("7")
            expect(page.locator("#cluster-select option").first).to_contain_text(XSS)
            assert page.title().startswith("run" + XSS)  # the escape: a space
            assert page.locator("#xss").count() == 0
            assert page.evaluate("window.pwned") is None
        finally:
            server.shutdown(wait=False)


def test_node_figures_sit_under_headers_that_say_what_they_are(monitored):
    """The node reports the swap it has available (dispy's ``avail_info.swap``: 100
    on a machine without swap); the page showed it as "Swap used" (100 % used on a
    node without any swap)."""
    from playwright.sync_api import expect

    cluster, server = monitored
    node = cluster.status().nodes[0]
    with chromium_page() as page:
        page.goto(server.url)
        row = page.locator(f'#nodes tbody tr[data-key="127.0.0.1:{node.port}"]')
        expect(row.locator(".c-swap")).not_to_have_text("")
        headers = page.locator("#nodes thead th").all_inner_texts()
        cells = row.locator("td").evaluate_all("tds => tds.map(td => td.className)")
        shown = dict(zip(cells, headers, strict=False))
        assert shown["num c-swap"] == "Swap avail", shown
        assert shown["num c-cpu"] == "CPU avail", shown
        swap = cluster.status().nodes[0].avail_info.swap
        assert row.locator(".c-swap").inner_text() == f"{swap:.0f} %"


def test_a_finished_runs_page_lists_its_jobs_and_says_the_cluster_closed():
    """A notebook's finished run, given to the monitor (web-monitor.md): the page
    said "No node has joined yet." and "No job submitted yet." under "Jobs (3)"."""
    from playwright.sync_api import expect

    from dispynb.jupyter.run import Run

    with LocalCluster(cpus=1) as local:
        run = Run.map(jobs.echo, [1, 2, 3], nodes=local, progress="none")
    server = DispyHTTPServer(run, port=0)
    try:
        with chromium_page() as page:
            page.goto(server.url)
            expect(page.locator("#connection")).to_have_text("cluster closed")
            expect(page.locator("#jobs tbody tr")).to_have_count(3)
            expect(page.locator("#no-jobs")).to_be_hidden()
            expect(page.locator("#no-nodes")).to_have_text(
                "The cluster is closed: it uses no node now."
            )
    finally:
        server.shutdown(wait=False)
