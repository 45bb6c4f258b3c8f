"""The documentation site as a user reads it: built with warnings as errors (the
notebooks executed), opened in Chromium, searched, and every link inside it followed.

The site is built once per session (``site`` fixture, see conftest.py).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest

from tests.browser import chromium_page, requires_chromium
from tests.docs.conftest import Site

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    requires_chromium,
    pytest.mark.timeout(600),
]


def _collect_requests(page: object, site: Site, outside: list[str]) -> None:
    def on_request(request: object) -> None:
        url = request.url  # type: ignore[attr-defined]
        if not url.startswith(site.url) and not url.startswith(("data:", "about:")):
            outside.append(url)

    page.on("request", on_request)  # type: ignore[attr-defined]


def test_pages_open_offline_with_real_outputs(site: Site) -> None:
    """The front page, a tutorial, the API, the CLI and the migration guide open
    with their content, and nothing is loaded from outside the site (no CDN)."""
    outside: list[str] = []
    errors: list[str] = []
    with chromium_page() as page:
        _collect_requests(page, site, outside)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(site.url + "index.html")
        assert "dispynb" in page.title()
        nav = page.locator(".sidebar-tree a")
        assert nav.count() >= 15, "the navigation lists the site's pages"

        page.get_by_role("link", name="Tutorials").first.click()
        page.locator(".toctree-wrapper a").first.click()
        page.wait_for_load_state()
        assert "/notebooks/" in page.url
        # Executed during the build: code cells have their outputs.
        assert page.locator(".cell_output").count() >= 3

        page.goto(site.url + "notebooks/02-magics.html")
        outputs = page.locator(".cell_output").all_inner_texts()
        assert any("done" in text for text in outputs), "the %%dispy progress shows"

        page.goto(site.url + "reference/api.html")
        for name in ("dispynb.JobCluster", "dispynb.DispyJob", "dispynb.recover_jobs"):
            assert page.locator(f"[id='{name}']").count() == 1, name

        page.goto(site.url + "reference/cli.html")
        assert page.locator("[id='cmdoption-dispynb-node-cpus']").count() == 1

        page.goto(site.url + "reference/migration.html")
        assert page.locator("table.dispy-migration").count() >= 10
        assert page.locator(".dispynb-unsupported").count() > 0
        assert page.locator(".dispynb-same").count() > 0
    assert not errors, f"JavaScript errors: {errors}"
    assert not outside, f"requests outside the site: {outside}"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("JobCluster", "reference/api.html"),
        ("orphan-timeout", "reference/cli.html"),
        ("zombie_interval", "reference/migration.html"),
    ],
)
def test_search_finds_pages(site: Site, query: str, expected: str) -> None:
    """Typing in the sidebar's search box lists the page that documents it."""
    with chromium_page() as page:
        page.goto(site.url + "getting-started.html")
        box = page.locator("input.sidebar-search").first
        box.fill(query)
        box.press("Enter")
        page.wait_for_url(re.compile(r"search\.html\?q="))
        results = page.locator("#search-results ul.search li a")
        results.first.wait_for()
        hrefs = [href or "" for href in results.evaluate_all("l => l.map(a => a.href)")]
        assert any(expected in href for href in hrefs), (query, hrefs)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "a" and values.get("name"):
            self.ids.add(str(values["name"]))
        for attr in ("href", "src"):
            if values.get(attr) and tag in ("a", "img", "link", "script", "iframe"):
                self.links.append(str(values[attr]))


def test_no_broken_link_inside_the_site(site: Site) -> None:
    """Every page reached from the front page in Chromium, and every link, image,
    style sheet and script they use, is there; so is every #anchor. No page loads
    anything from outside the site."""
    pages: dict[str, _Links] = {}
    broken: list[str] = []
    outside: list[str] = []
    start = site.url + "index.html"
    queue = [start]
    with chromium_page() as page:
        _collect_requests(page, site, outside)
        while queue:
            url = queue.pop()
            if url in pages:
                continue
            response = page.goto(url)
            if response is None or not response.ok:
                continue  # reported below, with the page that links to it
            parsed = _Links()
            parsed.feed(page.content())
            pages[url] = parsed
            for link in parsed.links:
                target, _ = urldefrag(urljoin(url, link))
                if not target.startswith(site.url):
                    continue  # outside the site: not followed (offline)
                if target.endswith(".html") and target not in pages:
                    queue.append(target)
    for url, parsed in pages.items():
        for link in parsed.links:
            absolute = urljoin(url, link)
            if not absolute.startswith(site.url):
                continue
            target, fragment = urldefrag(absolute)
            path = site.path / unquote(urlparse(target).path.lstrip("/"))
            if path.is_dir():
                path = path / "index.html"
            if not path.is_file():
                broken.append(f"{url} -> {link} (no such file)")
            elif fragment and target.endswith(".html"):
                ids = pages[target].ids if target in pages else _ids_of(path)
                if unquote(fragment) not in ids:
                    broken.append(f"{url} -> {link} (no such anchor)")
    assert len(pages) >= 20, f"only {len(pages)} pages reachable from the front page"
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert not outside, f"requests outside the site: {sorted(set(outside))}"


def _ids_of(path: Path) -> set[str]:
    parsed = _Links()
    parsed.feed(path.read_text(encoding="utf-8"))
    return parsed.ids


def test_the_build_prints_no_warning(site: Site) -> None:
    """``./dev docs`` printed, once per notebook, ipykernel's warning that its
    kernel ran over TCP without encryption (nbclient's default transport), and
    nbclient's INFO record 'Executing notebook with kernel' (a theme dependency
    set the root logger to INFO). The notebooks' kernels now run on Unix sockets,
    the root logger is at WARNING: the build prints no warning (its own warnings
    are errors: -W) and no library's log record."""
    logged = [
        line
        for line in site.output.splitlines()
        if "WARNING" in line or " INFO " in line
    ]
    assert not logged, "\n".join(logged)
    assert "notebooks/07-first-notebook" in site.output  # the notebooks ran
