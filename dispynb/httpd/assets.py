"""The monitor's page: a fixed set of files from this package's ``assets`` folder.

The files are read into memory once, when the server starts, and served by exact
name: no path from a request ever reaches the file system, so ``..``, encoded
separators and symlinks cannot lead anywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dispynb.httpd.security import SecureHandler

#: The folder holding index.html, app.js and style.css.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    """One file of the page, in memory."""

    body: bytes
    content_type: str


def load_assets(folder: Path = ASSETS_DIR) -> dict[str, Asset]:
    """Read the regular files (not symlinks) of known types directly in ``folder``."""
    assets: dict[str, Asset] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            content_type = _TYPES.get(os.path.splitext(entry.name)[1])
            if content_type and entry.is_file(follow_symlinks=False):
                assets[entry.name] = Asset(Path(entry.path).read_bytes(), content_type)
    return assets


class AssetHandler(SecureHandler):
    """GET ``/`` (index.html) and ``/static/<name>``, names `load_assets` found."""

    PAGE_FILES = True

    def initialize(self, assets: dict[str, Asset]) -> None:
        """Take the in-memory files (given in the route table)."""
        self.assets = assets

    def get(self, name: str = "index.html") -> None:
        """Serve one asset; a ``?token=`` visit is redirected to ``#token=``."""
        token = self.get_query_argument("token", None)
        if token is not None:
            # prepare() checked it and set the page cookie. The fragment reaches the
            # page's script (token.js: into sessionStorage, then off the address
            # bar) and is never sent to a server, nor in a Referer.
            self.redirect(f"{self.request.path}#token={token}")
            return
        asset = self.assets.get(name)
        if asset is None:
            self.refuse(404, f"no file {name!r} in the monitor's page")
            return
        self.set_header("Content-Type", asset.content_type)
        self.finish(asset.body)
