"""``dispynb-scheduler --httpd``: the operator's web monitor of the scheduler.

It is dispynb's web monitor machinery (`dispynb.httpd`): the same endpoint rules
(loopback by default, HTTPS or an explicit opt-in for any other address), the same
`Guard` (Host and Origin checks, token, CSRF on every POST), the same handlers'
base and the same style sheet; only its page and routes are the scheduler's. It runs
on the scheduler's own event loop and reads its state there (no locks needed).

===================================  ===========================================
``GET  /``                           the page (``?token=`` once: sets its cookie)
``GET  /api/scheduler``              `snapshot`: nodes, users, computations, jobs
``POST /api/users/<name>/revoke``    revoke a user (as ``user revoke NAME``): its
                                     sessions end, its computations close
===================================  ===========================================
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.web

from dispynb.errors import ConfigurationError
from dispynb.httpd.assets import AssetHandler, load_assets
from dispynb.httpd.connections import MonitorHTTPServer
from dispynb.httpd.endpoint import Endpoint, open_endpoint
from dispynb.httpd.security import (
    CSRF_HEADER,
    NotFoundHandler,
    SecureHandler,
    check_token,
    new_token,
)
from dispynb.httpd.server import (
    BODY_TIMEOUT,
    MAX_BODY_BYTES,
    log_refusals_left,
    log_request,
)
from dispynb.secret import read_secret_file
from dispynb.transport.addressing import format_address
from schedserver.users import NAME_PATTERN

if TYPE_CHECKING:
    from schedserver.computation import SharedComputation
    from schedserver.server import SchedulerServer

logger = logging.getLogger(__name__)

#: The scheduler's own page files (the style sheet and icon are dispynb's).
PAGE_DIR = Path(__file__).resolve().parent / "assets"

#: Jobs listed per computation at most (all are counted).
MAX_JOBS = 200


def snapshot(server: SchedulerServer, max_jobs: int = MAX_JOBS) -> dict[str, Any]:
    """The scheduler now, as JSON-ready data for its operator."""
    config = server.config
    total = server.total_cpus()
    known = server.users.names()
    comps = [_computation(comp, max_jobs) for comp in server.computations]
    names = sorted(known | {c.user for c in server.computations})
    users = []
    for name in names:
        mine = [c for c in comps if c["user"] == name]
        running = server.fair.in_flight(name)
        users.append(
            {
                "name": name,
                "revoked": name not in known,
                "sessions": sorted(
                    str(s.conn.peer) for s in server.sessions if s.user == name
                ),
                "computations": len(mine),
                "queued": sum(c["queued"] for c in mine),
                "running": running,
                "done": sum(c["done"] for c in mine),
                "cpu_share": running / total if total else 0.0,
                "max_cpus": config.max_cpus,
                "max_queued": config.max_queued,
                # --exclusive_users: its exclusive=True holds (else runs shared)
                "exclusive": not server.fair.exclusive_refusal(name),
            }
        )
    return {
        "name": config.name,
        "now": time.time(),
        "cpus": total,
        "nodes": [
            {
                "id": node.name,
                "name": node.hostname,
                "host": node.host,
                "port": node.port,
                "cpus": node.cpus,
                "alive": node.alive,
                "down": "" if node.alive else node.down,
                "jobs": node.in_flight,
                "avail": list(node.avail),
            }
            for node in server.nodes
        ],
        "users": users,
        "computations": comps,
    }


def _computation(comp: SharedComputation, max_jobs: int) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = [
        {
            "key": job.key,
            "state": "running" if job.started else "sent",
            "node": job.node,
        }
        for job in list(comp.running.values())[:max_jobs]
    ]
    for job in list(comp.queue)[: max(0, max_jobs - len(jobs))]:
        jobs.append({"key": job.key, "state": "queued", "node": ""})
    return {
        "user": comp.user,
        "name": comp.setup.name,
        "id": comp.comp_id,
        "client": "connected" if comp.session is not None else "away",
        # granted; declined: its client asked, its user is not --exclusive_users
        "exclusive": comp.account.exclusive,
        "exclusive_declined": comp.exclusive_declined,
        "closing": comp.closing,
        "queued": len(comp.queue),
        "running": len(comp.running),
        "done": int(sum(done[0] for done in comp.node_done.values())),
        "nodes": sorted(comp.account.nodes),
        # Its client's use of the nodes (set_node_cpus, deallocate_node: 0, its
        # NodeAllocate's cpus): its jobs at once per node at most (a node closed
        # for it, below, takes none).
        "limits": {
            node: cpus
            for node, cpus in sorted(comp.account.limits.items())
            if node not in comp.nodes_closed
        },
        # Nodes it is closed on: by its client's close_node (until allocate_node),
        # declined by its NodeAllocate (asked again when they come back), and those
        # whose NodeAllocate answer it waits for (none of its jobs go there yet).
        "nodes_closed": sorted(comp.nodes_closed - comp.nodes_declined),
        "nodes_declined": sorted(comp.nodes_declined),
        "nodes_undecided": sorted(comp.awaiting_client),
        "jobs": jobs,
    }


class _Handler(SecureHandler):
    CSRF_ROUTE = "/api/scheduler"

    def initialize(self, server: SchedulerServer) -> None:
        """Take the scheduler (given in the route table)."""
        self.server = server


class SnapshotHandler(_Handler):
    """``GET /api/scheduler``."""

    def get(self) -> None:
        """The snapshot, with the CSRF token for the page's actions."""
        self.set_header(CSRF_HEADER, self.guard.csrf_token)
        self.write_json(snapshot(self.server))


class RevokeHandler(_Handler):
    """``POST /api/users/<name>/revoke``."""

    def post(self, name: str) -> None:
        """Revoke user ``name`` now; 404 for a user not in the users file."""
        if not NAME_PATTERN.fullmatch(name):
            self.refuse(400, f"{name[:80]!r} is not a user name")
            return
        try:
            self.server.revoke_user(name)
        except ConfigurationError as exc:
            self.refuse(404, str(exc))
            return
        logger.warning("user %r revoked from the web monitor", name)
        self.write_json({"revoked": name})


class SchedulerMonitor:
    """The web monitor of a running `SchedulerServer` (on its event loop)."""

    def __init__(self, server: SchedulerServer, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        assets = {**load_assets(), **load_assets(PAGE_DIR)}
        page = {"assets": assets}
        routes = {"server": server}
        self._app = app = tornado.web.Application(
            [
                (r"/", AssetHandler, page),
                (r"/static/([^/]+)", AssetHandler, page),
                (r"/api/scheduler", SnapshotHandler, routes),
                (r"/api/users/([^/]+)/revoke", RevokeHandler, routes),
            ],
            default_handler_class=NotFoundHandler,
            guard=endpoint.guard,
            log_function=log_request,
            compress_response=False,
        )
        self._http = MonitorHTTPServer(
            app,
            ssl_options=endpoint.ssl_context,
            max_body_size=MAX_BODY_BYTES,
            idle_connection_timeout=60,
            body_timeout=BODY_TIMEOUT,
        )

    @classmethod
    def start(
        cls,
        server: SchedulerServer,
        host: str,
        port: int,
        *,
        keyfile: str | None = None,
        certfile: str | None = None,
        token_file: str | None = None,
    ) -> SchedulerMonitor:
        """Listen on ``host``:``port`` (on the running loop), the access token read
        from ``token_file`` (or written there: `file_token`) if given; raises
        `ConfigurationError` as `open_endpoint` does, but OSError for a port in use
        (which may pass: the daemon exits 1, not 2)."""
        token = file_token(token_file) if token_file else None
        try:
            endpoint = open_endpoint(
                host, port, keyfile=keyfile, certfile=certfile, token=token
            )
        except ConfigurationError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError):
                raise
            # open_endpoint's advice is the Python API's (port=0): name the options.
            fix = "give another --httpd_port (0 picks a free one; its URL is logged)"
            if cause.errno == errno.EADDRINUSE:  # may pass (exit 1): a port held
                where = format_address(host, port)
                raise OSError(
                    cause.errno,
                    f"web monitor: {where} is already in use (by a node or scheduler "
                    f"already running, or another program): stop it, or {fix}",
                ) from cause
            raise ConfigurationError(
                f"web monitor: cannot listen on {host} port {port} ({cause.strerror}): "
                f"check --httpd_host, or {fix}"
            ) from cause
        monitor = cls(server, endpoint)
        monitor._http.add_sockets(endpoint.sockets)
        announce(endpoint, token_file)
        return monitor

    @property
    def url(self) -> str:
        """The page's URL, with its token."""
        return self.endpoint.url

    async def stop(self) -> None:
        """Stop serving and close every connection."""
        self._http.stop()
        await self._http.close_all_connections()
        log_refusals_left(self._app)


def file_token(path: str) -> str:
    """The access token in ``path`` (a file only its owner may read, as a secret
    file), or a new one written there (mode 600) if it does not exist: the same URL
    across restarts, read by whoever may read the file."""
    path = os.path.expanduser(path)
    token = new_token()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        try:
            token = read_secret_file(path).decode(errors="replace").strip()
        except ConfigurationError as exc:  # its words are a secret's: name the option
            if str(exc).endswith("is empty: write the shared secret into it"):
                raise ConfigurationError(
                    f"--httpd_token_file {path}: the file is empty: remove it to "
                    "have a new token written"
                ) from None
            raise ConfigurationError(f"--httpd_token_file: {exc}") from None
        try:
            return check_token(token)
        except ConfigurationError:
            raise ConfigurationError(
                f"--httpd_token_file {path}: not a token (16 to 256 characters from "
                "A-Z a-z 0-9 . _ ~ -): remove the file to have a new one written"
            ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"--httpd_token_file: cannot create {path!r}: {exc.strerror}"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    return token


def announce(endpoint: Endpoint, token_file: str | None) -> None:
    """Say where the monitor is. Its token never goes to the log (a service's log
    is read by others: the journal, a shared log file): the URL with the token is
    printed once on a terminal, as Jupyter does, or is in ``token_file``."""
    where = endpoint.url.partition("?")[0]
    if token_file:
        logger.info("web monitor at %s (its token is in %s)", where, token_file)
    elif sys.stderr.isatty():
        print(f"web monitor: open {endpoint.url}", file=sys.stderr, flush=True)
        logger.info("web monitor at %s (the URL with its token: above)", where)
    else:
        logger.warning(
            "web monitor at %s: its access token is not logged; give "
            "--httpd_token_file FILE to have it written there (mode 600), or start "
            "the scheduler on a terminal, which gets the URL with the token",
            where,
        )


__all__ = ["SchedulerMonitor", "announce", "file_token", "snapshot"]
