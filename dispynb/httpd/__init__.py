"""dispy's web monitor, made safe: a live page of a cluster's nodes and jobs.

`DispyHTTPServer` serves the page and its JSON API on 127.0.0.1 by default; every
request needs the access token in `DispyHTTPServer.url`.

Modules
-------
server
    `DispyHTTPServer`: the thread, the event loop and the routes.
security
    Token, Host/Origin and CSRF checks, security headers, JSON refusals.
api
    The JSON API handlers.
feed
    Long-poll wake-ups from `ClusterMonitor.wait_change`.
assets
    The page's files (``assets/``), served from memory by exact name.
"""

from __future__ import annotations

from dispynb.httpd.server import DispyHTTPServer

__all__ = ["DispyHTTPServer"]
