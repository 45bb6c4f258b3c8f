"""`SchedulerConfig`: what ``dispynb-scheduler`` was told (validated once)."""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass, field

from dispynb.defaults import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_MESSAGE_SIZE
from dispynb.errors import ConfigurationError
from dispynb.httpd.security import is_loopback
from dispynb.transport.tls import TlsOptions
from schedserver.users import NAME_PATTERN

#: How the scheduler is given TLS towards its nodes: the fix a node's TLS error
#: names (not a Python client's ``cafile=``).
NODE_TLS_OPTIONS = TlsOptions("--node_cafile", "--node_certfile", "--node_keyfile", "")


@dataclass(kw_only=True)
class SchedulerConfig:
    """The scheduler's settings; see ``dispynb-scheduler --help``."""

    #: Interfaces clients connect to, and the port (0: a free one).
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    port: int = 0
    #: The nodes it owns, as ``(host, port)``.
    nodes: list[tuple[str, int]] = field(default_factory=list)
    #: Wildcard node specs (``'*'``, ``'10.0.0.*'``): nodes found by discovery (UDP
    #: broadcast, or multicast), as dispyscheduler's ``-n`` patterns.
    discover: list[str] = field(default_factory=list)
    multicast: bool = False
    #: Port of the registration listener for nodes that register themselves
    #: (``--register_port``; on the clients' interfaces ``hosts``); None: off.
    register_port: int | None = None
    #: Seconds between discovery pings (None: at start only; nodes announce
    #: themselves when they start).
    ping_interval: float | None = None
    #: The node secret (the scheduler's alone; clients never see it).
    node_secret: bytes | None = field(default=None, repr=False)
    node_ssl: ssl.SSLContext | None = field(default=None, repr=False)
    #: TLS towards clients (``--cluster_certfile``); None: plain TCP.
    client_ssl: ssl.SSLContext | None = field(default=None, repr=False)
    #: Path of the users file (``NAME TOKEN`` lines, mode 0600).
    users_file: str = ""
    #: CPUs used per node at most (None: all the node offers).
    cpus: int | None = None
    #: Jobs in flight per CPU of a node at most while one user has jobs (as many as
    #: the jobs' mean duration calls for hide the round trips); 1 while several
    #: users have jobs (fair share).
    jobs_per_cpu: int = 32
    #: Per user: jobs in flight (CPUs) and jobs queued at most (None: no limit).
    max_cpus: int | None = None
    max_queued: int | None = None
    #: Users whose ``exclusive=True`` holds (``--exclusive_users``): None, every
    #: user (dispy's meaning); empty (the default), none. Another user's exclusive
    #: computation runs shared, its client told why and whom to ask.
    exclusive_users: frozenset[str] | None = frozenset()
    #: Seconds between pings to nodes and status reports to clients.
    pulse_interval: float = 1.0
    #: Seconds without a word from a client (it pings every pulse) before its
    #: computations are closed and its session ended; also the longest a client that
    #: went away has to come back for its results.
    zombie_interval: float = 3600.0
    #: Seconds a node that registered itself may stay unreachable before it is
    #: forgotten (it registers again when it is back; named nodes are kept).
    forget_registered: float = 60.0
    #: Seconds the results of a computation whose client went away are kept.
    keep_results: float = 3600.0
    #: Where results kept for clients that went away spill to disk (a private
    #: directory is made in it), what they may take in memory in all, what one
    #: computation may keep at most, and one user in all (bytes; 0: no limit).
    dest_path_prefix: str = field(
        default_factory=lambda: os.path.join(
            tempfile.gettempdir(), "dispynb", "scheduler"
        )
    )
    kept_memory: int = 32 * 1024 * 1024
    max_kept: int = 1024 * 1024 * 1024
    max_user_kept: int = 4 * 1024 * 1024 * 1024
    #: Bytes of jobs' arguments one user may have at the scheduler at once (queued,
    #: or sent to a node and not ended: held in its memory); 0: no limit.
    max_user_args: int = 1024 * 1024 * 1024
    #: Bytes a file clients upload (``depends``, ``send_file``) may have at most (0:
    #: no limit); the scheduler keeps them on disk while a computation needs them.
    max_file_size: int = 512 * 1024 * 1024
    #: Files one user may have kept at once (each holds a descriptor); 0: an
    #: eighth of the scheduler's descriptor limit (``RLIMIT_NOFILE``).
    max_files: int = 0
    #: Computations one user may have at once (each holds a connection and worker
    #: processes on every node); 0: no limit.
    max_computations: int = 16
    #: Sessions (client connections) one user may have at once (each holds one of
    #: the scheduler's descriptors); 0: no limit.
    max_sessions: int = 32
    #: Remove the spill directories killed schedulers left in ``dest_path_prefix``.
    clean: bool = False
    max_message_size: int = MAX_MESSAGE_SIZE
    #: dispyscheduler's ``--msg_timeout`` (dispy's MsgTimeout, 10 s): it scales the
    #: connect and handshake timeouts towards the nodes and of the clients.
    msg_timeout: float = 10.0
    port_file: str = ""
    name: str = "dispynb-scheduler"
    #: The operator's web monitor (``--httpd``): where, and its HTTPS files.
    httpd: bool = False
    httpd_host: str = "127.0.0.1"
    httpd_port: int = 8181  # dispy's HTTPServerPort
    httpd_certfile: str | None = None
    httpd_keyfile: str | None = None
    #: Where its access token is kept (read, or written if missing); None: a new
    #: one, printed on a terminal only (never logged).
    httpd_token_file: str | None = None

    @property
    def connect_timeout(self) -> float:
        """Seconds a connection to a node may take to open (`msg_timeout`)."""
        return CONNECT_TIMEOUT * self.msg_timeout / 10.0

    @property
    def handshake_timeout(self) -> float:
        """Seconds a handshake (a node's or a client's) may take (`msg_timeout`)."""
        return HANDSHAKE_TIMEOUT * self.msg_timeout / 10.0

    def validate(self) -> None:
        """Raise `ConfigurationError` for settings that cannot work."""
        if not self.nodes and not self.discover and self.register_port is None:
            raise ConfigurationError(
                "no nodes: name the scheduler's nodes with -n HOST[:PORT] (repeat "
                "it), give -n '*' to discover them, or --register_port to let them "
                "register"
            )
        if self.register_port is not None and not self.node_secret:
            raise ConfigurationError(
                "--register_port needs the node secret (--node_secret_file or "
                "DISPYNB_SECRET): registering nodes prove they know it"
            )
        if not self.users_file:
            raise ConfigurationError(
                "no users file: give --users PATH (add users with "
                "'dispynb-scheduler user add NAME --users PATH')"
            )
        if self.cpus is not None and self.cpus < 1:
            raise ConfigurationError(f"--cpus must be at least 1, not {self.cpus}")
        if self.jobs_per_cpu < 1:
            raise ConfigurationError("--jobs_per_cpu must be at least 1")
        if not 0.1 <= self.msg_timeout <= 3600:
            raise ConfigurationError("--msg_timeout must be within 0.1-3600 s")
        if not 0.1 <= self.pulse_interval <= 1000:
            raise ConfigurationError("--pulse_interval must be within 0.1-1000 s")
        if not self.zombie_interval > 0:
            raise ConfigurationError(
                "--zombie_interval must be more than 0 minutes (fractions are taken: "
                "0.5 is 30 s), or 0: never"
            )
        if not 1 <= self.forget_registered <= 86400:
            raise ConfigurationError("--forget_registered must be within 1-86400 s")
        if (
            self.kept_memory < 0
            or self.max_kept < 0
            or self.max_user_kept < 0
            or self.max_user_args < 0
            or self.max_file_size < 0
            or self.max_files < 0
            or self.max_computations < 0
            or self.max_sessions < 0
        ):
            raise ConfigurationError(
                "--kept_memory, --max_kept, --max_user_kept, --max_user_args, "
                "--max_file_size, --max_files, --max_computations and "
                "--max_sessions cannot be negative"
            )
        if (
            self.httpd
            and not is_loopback(self.httpd_host)
            and self.httpd_certfile is None
        ):
            raise ConfigurationError(
                f"--httpd_host {self.httpd_host} makes the web monitor reachable from "
                "other machines, its token in clear text: give --httpd_certfile "
                "(HTTPS), or leave it on 127.0.0.1 and use an SSH tunnel"
            )
        for name in ("max_cpus", "max_queued"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"--{name} must be at least 1, not {value}")


def parse_exclusive_users(text: str) -> frozenset[str] | None:
    """``--exclusive_users``: ``all`` (None), ``none`` (empty), or user names
    separated by commas or spaces. Raises `ConfigurationError` for a bad name."""
    words = text.replace(",", " ").split()
    if [w.lower() for w in words] == ["all"]:
        return None
    if [w.lower() for w in words] == ["none"]:
        return frozenset()
    bad = [w for w in words if not NAME_PATTERN.fullmatch(w)]
    if bad or not words or {"all", "none"} & {w.lower() for w in words}:
        raise ConfigurationError(
            f"--exclusive_users {text[:200]!r}: give all, none, or user names "
            "separated by commas (alice,bob), as 'dispynb-scheduler user add' "
            "named them"
        )
    return frozenset(words)


__all__ = ["SchedulerConfig", "parse_exclusive_users"]
