"""`DispyHTTPServer`: dispy's web monitor, on its own thread and event loop.

The server gets its own thread so that browsers never slow down the cluster's I/O
thread; it reads the cluster through a `ClusterMonitor` (thread-safe snapshots).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import tornado.web

from dispynb._interruptible import start_thread
from dispynb.errors import ConfigurationError
from dispynb.httpd.api import (
    ApiContext,
    CancelAllHandler,
    CancelJobHandler,
    ClusterHandler,
    ClusterView,
    NodeCpusHandler,
)
from dispynb.httpd.assets import AssetHandler, load_assets
from dispynb.httpd.connections import MonitorHTTPServer
from dispynb.httpd.endpoint import open_endpoint
from dispynb.httpd.feed import ChangeFeed
from dispynb.httpd.security import NotFoundHandler
from dispynb.protocol.handshake import peer_text
from dispynb.transport.admission import Tally

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster

logger = logging.getLogger("dispynb.httpd")

#: Request bodies are tiny JSON objects.
MAX_BODY_BYTES = 64 * 1024
#: Seconds a request's body may take to arrive (tornado's default: forever).
BODY_TIMEOUT = 10.0

_START_TIMEOUT = 30.0

_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9._~-]+")


def _cluster_of(shown: Any) -> Any:
    """The cluster to show for ``shown``: itself (or None), or the cluster of a
    notebook's run (`dispynb.Run`: what ``%%dispy --into NAME`` leaves in NAME,
    the object a notebook holds); anything else is refused, saying so."""
    from dispynb.cluster import JobCluster

    if shown is None or isinstance(shown, JobCluster):
        return shown
    inner = getattr(shown, "cluster", None)
    if isinstance(inner, JobCluster):
        return inner
    raise ConfigurationError(
        f"the web monitor shows a JobCluster (or a %%dispy run's), not "
        f"{type(shown).__name__}: give it the cluster whose jobs to show"
    )


def _ended_of(shown: Any) -> list[tuple[Any, str | None]]:
    """The jobs of a notebook's run that ended, with their nodes: shown after
    the run, the monitor lists them (its cluster no longer holds them)."""
    ended = getattr(shown, "ended_jobs", None)
    return list(ended()) if callable(ended) else []


class DispyHTTPServer:
    """A web page that shows a cluster's nodes and jobs live and lets you manage them.

    Open :attr:`url` (it carries the access token, logged once at INFO, or printed
    on stderr if no log handler shows INFO) in a browser.

    Parameters
    ----------
    cluster:
        The `JobCluster` (or `SharedJobCluster`) to show, or a notebook's `Run`
        (``%%dispy --into NAME``: NAME) for its cluster; None (as dispy allows)
        shows none until `add_cluster`.
    host:
        Address to bind; default 127.0.0.1 (this machine only). Any other address
        (``'0.0.0.0'``: all interfaces) needs ``certfile`` or
        ``allow_plain_http=True``. ``''`` (dispy's default, all interfaces) binds
        127.0.0.1 without them, with a warning saying so.
    port:
        TCP port; 0 picks a free one (see :attr:`port`).
    poll_sec:
        Longest time a browser's long-poll waits for a change before it asks again.
        0 or less is taken as 1 with a warning, as dispy does (which also raises
        values under 1 to 1; dispynb takes fractions of a second).
    DocumentRoot:
        Not supported: the monitor serves only its built-in page. Must be None.
    keyfile, certfile:
        PEM files to serve HTTPS (no ``keyfile`` if ``certfile`` holds the key).
    show_job_args:
        Show a short view of each job's arguments (off by default: may be private).
    token:
        Access token (16+ URL-safe characters); default: a new random one.
    allow_plain_http:
        Allow a non-loopback ``host`` without TLS (the token then crosses the network
        in clear text).
    allowed_hosts:
        More host names under which browsers reach the server (checked in ``Host``).

    Examples
    --------
    >>> monitor = DispyHTTPServer(cluster)  # doctest: +SKIP
    >>> print(monitor.url)  # doctest: +SKIP
    http://127.0.0.1:8181/?token=...
    >>> monitor.add_cluster(other_cluster)  # doctest: +SKIP
    >>> monitor.shutdown()  # doctest: +SKIP
    """

    def __init__(
        self,
        cluster: JobCluster | None,
        host: str = "127.0.0.1",
        port: int = 8181,
        poll_sec: float = 10,
        DocumentRoot: str | None = None,
        keyfile: str | None = None,
        certfile: str | None = None,
        show_job_args: bool = False,
        token: str | None = None,
        *,
        allow_plain_http: bool = False,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self._ended = _ended_of(cluster)
        cluster = _cluster_of(cluster)
        poll_sec = _check_options(poll_sec, DocumentRoot)
        self._endpoint = endpoint = open_endpoint(
            host,
            port,
            keyfile=keyfile,
            certfile=certfile,
            token=token,
            allow_plain_http=allow_plain_http,
            allowed_hosts=allowed_hosts,
        )
        self._token = endpoint.token
        self.poll_sec = float(poll_sec)
        self.show_job_args = bool(show_job_args)
        self._host = endpoint.host
        self._sockets = endpoint.sockets
        self.port: int = endpoint.port
        self._guard = endpoint.guard
        self._ssl_context = endpoint.ssl_context
        self._cluster = cluster
        self._views: dict[str, ClusterView] = {}
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            2, "dispynb-httpd-action"
        )
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="dispynb-httpd", daemon=True
        )
        self._start()
        message = f"{self._title()} at {self.url}"
        logger.info("%s", message)
        # dispy's monitor needed no token, so dispy programs set up no logging to
        # learn its address: without a handler for INFO nobody would see the token,
        # so say it: a link in a notebook, else on stderr, as Jupyter's server does.
        #: The notebook cell (its prompt number) that shows the link already.
        self._shown_in: int | None = None
        if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
            return
        self._shown_in = _display_in_notebook(self._link_bundle())
        if self._shown_in is None:
            print(f"dispynb {message}", file=sys.stderr, flush=True)

    def _link_bundle(self) -> dict[str, str]:
        return {
            "text/html": self._repr_html_(),
            "text/plain": f"dispynb {self._title()} at {self.url}",
        }

    def _ipython_display_(self) -> None:
        """Show the link, unless the cell that made the monitor shows it and this
        is that cell (``monitor = DispyHTTPServer(run)`` then ``monitor`` on its
        last line showed the same link twice)."""
        from IPython.display import display

        if self._shown_in is None or self._shown_in != _cell_number():
            display(self._link_bundle(), raw=True)

    def _title(self) -> str:
        """What the monitor shows: ``web monitor of 'NAME'``."""
        if self._cluster is None:
            return "web monitor (no cluster yet: add_cluster shows one)"
        return f"web monitor of {getattr(self._cluster, 'name', self._cluster)!r}"

    def _repr_html_(self) -> str:
        """A link to the page for a notebook (its URL carries the access token)."""
        url = html.escape(self.url)
        return (
            f"dispynb {html.escape(self._title())} at "
            f'<a href="{url}" target="_blank">{url}</a>'
        )

    def _start(self) -> None:
        start_thread(self._thread)
        try:
            self._started.result(timeout=_START_TIMEOUT)
        except BaseException:
            self.shutdown(wait=False)
            raise

    @property
    def url(self) -> str:
        """The page's full URL, token included: open it in a browser."""
        return self._endpoint.url

    @property
    def token(self) -> str:
        """The access token (for ``Authorization: Token <token>`` in scripts)."""
        return self._token

    def add_cluster(self, cluster: JobCluster) -> None:
        """Show ``cluster`` too (dispy's ``add_cluster``); the page offers a choice.

        A cluster already shown is left as it is.
        """
        if cluster is None:
            raise ConfigurationError("add_cluster needs the cluster to show")
        self._call_on_loop(self._add_view, _cluster_of(cluster), _ended_of(cluster))

    def del_cluster(self, cluster: JobCluster) -> None:
        """Stop showing ``cluster`` (dispy's ``del_cluster``); unknown ones are ignored.

        The cluster itself is left alone.
        """
        view = self._call_on_loop(self._remove_view, cluster)
        if view is not None:
            view.monitor.close()
            view.feed.join()

    @property
    def clusters(self) -> list[JobCluster]:
        """The clusters shown, in the order they were added."""
        return [view.monitor.cluster for view in list(self._views.values())]

    def _call_on_loop(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise ConfigurationError("the web monitor was shut down")

        async def call() -> Any:
            return fn(*args)

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        return future.result(timeout=_START_TIMEOUT)

    def _add_view(
        self, cluster: JobCluster, ended: list[tuple[Any, str | None]] | None = None
    ) -> None:
        from dispynb.monitoring import ClusterMonitor

        if any(view.monitor.cluster is cluster for view in self._views.values()):
            return
        key = cluster_key(str(getattr(cluster, "name", "cluster")))
        base, number = key, 1
        while key in self._views:
            number += 1
            key = f"{base}-{number}"
        monitor = ClusterMonitor(cluster, ended=ended or ())
        feed = ChangeFeed(monitor, self._loop)
        self._views[key] = ClusterView(key, monitor, feed)
        feed.start()

    def _remove_view(self, cluster: JobCluster) -> ClusterView | None:
        for key, view in list(self._views.items()):
            if view.monitor.cluster is cluster:
                del self._views[key]
                view.feed.stop()
                return view
        return None

    def shutdown(self, wait: bool = True) -> None:
        """Stop the server (idempotent).

        With ``wait`` (dispy's default), browsers waiting on a long-poll first get
        the final state: they are woken and given up to ``poll_sec`` to get their
        answer. The cluster itself is left alone.
        """
        if self._closed:
            return
        self._closed = True
        if self._started.done() and self._started.exception() is None:
            try:
                future = asyncio.run_coroutine_threadsafe(self._stop(wait), self._loop)
                future.result(timeout=self.poll_sec + _START_TIMEOUT)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                for view in self._views.values():
                    view.monitor.close()  # also wakes the watcher out of wait_change
                    view.feed.join()
        self._thread.join(timeout=_START_TIMEOUT)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._endpoint.close()
        logger.debug("web monitor on port %d stopped", self.port)

    def __enter__(self) -> DispyHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (
            f"<DispyHTTPServer {self._guard.scheme}://{self._host or '*'}:{self.port}>"
        )

    # -- on the server's thread --------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._setup()
        except BaseException as exc:
            for view in self._views.values():
                view.feed.stop()
                view.monitor.close()
            self._started.set_exception(exc)
        else:
            self._started.set_result(None)
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _setup(self) -> None:
        if self._cluster is not None:
            self._add_view(self._cluster, self._ended)
        self._context = context = ApiContext(
            self._views, self._executor, self.show_job_args, self.poll_sec
        )
        self._app = self._application(context)
        self._http = MonitorHTTPServer(
            self._app,
            ssl_options=self._ssl_context,
            max_body_size=MAX_BODY_BYTES,
            idle_connection_timeout=self.poll_sec + 30,
            body_timeout=BODY_TIMEOUT,
        )
        self._http.add_sockets(self._sockets)

    def _application(self, context: ApiContext) -> tornado.web.Application:
        guard = self._guard
        page = {"assets": load_assets()}
        api = {"context": context}
        return tornado.web.Application(
            [
                (r"/", AssetHandler, page),
                (r"/static/([^/]+)", AssetHandler, page),
                (r"/api/cluster", ClusterHandler, api),
                (r"/api/jobs/([^/]+)/cancel", CancelJobHandler, api),
                (r"/api/cancel-all", CancelAllHandler, api),
                (r"/api/nodes/([^/]+)/cpus", NodeCpusHandler, api),
            ],
            default_handler_class=NotFoundHandler,
            guard=guard,
            log_function=log_request,
            compress_response=False,
        )

    async def _stop(self, wait: bool) -> None:
        self._http.stop()  # no new connections
        for view in self._views.values():
            view.feed.stop()  # wakes the long-polls: they answer with the final state
        if wait:
            deadline = time.monotonic() + self.poll_sec
            while self._context.active and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await self._http.close_all_connections()
        log_refusals_left(self._app)


def _display_in_notebook(bundle: dict[str, str]) -> int | None:
    """Show ``bundle`` in the cell's output if this process is a notebook's kernel
    (not a terminal's IPython: it shows no HTML); the cell's prompt number if it
    did, else None."""
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython and get_ipython()
    if getattr(shell, "kernel", None) is None:
        return None
    from IPython.display import display

    display(bundle, raw=True)
    return _cell_number()


def _cell_number() -> int | None:
    """The prompt number of the cell running now (None outside IPython)."""
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython and get_ipython()
    count = getattr(shell, "execution_count", None)
    return count if isinstance(count, int) else None


def cluster_key(name: str) -> str:
    """A cluster's key in ``?cluster=``: its name in URL-safe characters. tornado
    strips a query argument's spaces and control characters, so a name with them
    was never found again (the page then polled without end)."""
    return _UNSAFE_IN_KEY.sub("_", name).strip("_")[:64] or "cluster"


def _check_options(poll_sec: Any, document_root: object) -> float:
    """Refuse what cannot be served; return the ``poll_sec`` to use."""
    if document_root is not None:
        raise ConfigurationError(
            "DocumentRoot is not supported: dispynb's monitor serves only its own "
            "built-in page (serving a folder would expose its files); remove it"
        )
    if isinstance(poll_sec, bool) or not isinstance(poll_sec, int | float):
        raise ConfigurationError(
            f"poll_sec must be a number of seconds, not {poll_sec!r}"
        )
    if not poll_sec > 0:  # dispy's: it says so and polls every second
        logger.warning(
            "invalid poll_sec value %r; it must be more than 0: 1 s is used",
            poll_sec,
        )
        return 1.0
    return float(poll_sec)


def log_refusals_left(app: tornado.web.Application) -> None:
    """A monitor stops: log the count of refused requests not logged yet (`Tally`
    logs it once a minute; the rest of the last minute was lost)."""
    refusals = app.settings.pop("refusal_tally", None)
    if refusals is not None:
        refusals.close()


def log_request(handler: tornado.web.RequestHandler) -> None:
    """tornado's request log, without the query string (it may hold the token).

    Refused requests (4xx) are counted per client address (`Tally`: 3 lines at
    once, then one a minute), as the node's refused connections are: anyone on the
    machine may send them, and a line each let them grow the log at will.
    """
    status = handler.get_status()
    request = handler.request
    log = logging.getLogger("dispynb.httpd.access")
    if 400 <= status < 500:
        settings = handler.application.settings
        refusals = settings.get("refusal_tally")
        if refusals is None:
            refusals = settings["refusal_tally"] = Tally(log, level=logging.INFO)
        what = f"{status} {request.method} {peer_text(request.path)}"
        refusals.event("refused web requests", str(request.remote_ip), what)
        return
    log.log(
        logging.DEBUG if status < 400 else logging.INFO,
        "%d %s %s (%.1f ms)",
        status,
        request.method,
        request.path,
        1000 * request.request_time(),
    )
