"""Real-browser tests: Debian's /usr/bin/chromium driven by Playwright's sync API.

Never runs ``playwright install``: the system Chromium is used as is. The flags keep
Chromium from making connections of its own (updates, sync, QUIC, field trials), so
a test only talks to the 127.0.0.1 server it points the page at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"

#: Flags for a headless Chromium without sandbox (root in a container), off the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication",
    "--metrics-recording-only",
    "--no-pings",
    "--password-store=basic",
    "--use-mock-keychain",
    # Even with the flags above, Chromium 156 (Debian) still looks up
    # clients2.google.com and update.googleapis.com (seen in a DNS log in a
    # namespace). No name but localhost resolves, and anything not on loopback
    # goes to a closed local port instead of the network.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
]

DEFAULT_TIMEOUT_MS = 30_000


def _have_chromium() -> bool:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


#: Marks browser tests: skipped, with the reason, without Chromium or Playwright.
requires_chromium = pytest.mark.skipif(
    not _have_chromium(),
    reason=f"needs {CHROMIUM} (apt-get install chromium) and python's playwright",
)


@contextmanager
def chromium_page(
    viewport: dict[str, int] | None = None,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    **context_args: Any,
) -> Iterator[Page]:
    """Yield a page of a fresh headless Chromium (its own temporary profile).

    ``viewport`` defaults to 1280x800; ``context_args`` go unchanged to Playwright's
    ``launch_persistent_context``. ``timeout_ms`` is the page's default timeout and
    that of ``expect`` assertions. The profile is removed afterwards.
    """
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=timeout_ms)  # expect() waits as long as the page does

    user_data_dir = tempfile.mkdtemp(prefix="dispynb-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                user_data_dir,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport=viewport or {"width": 1280, "height": 800},
                **context_args,
            )
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.set_default_timeout(timeout_ms)
                yield page
            finally:
                ctx.close()
    finally:
        shutil.rmtree(user_data_dir, ignore_errors=True)
