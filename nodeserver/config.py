"""`NodeConfig`: the node server's settings, validated."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tempfile

from dispynb.defaults import (
    DISCOVERY_PORT,
    HANDSHAKE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    NODE_PORT,
    PRE_AUTH_MAX_FRAME,
)
from dispynb.errors import ConfigurationError
from dispynb.secret import check_strength
from dispynb.transport.addressing import is_loopback
from nodeserver.service import ServiceWindow

#: Default ``--max-file-size``: large data files pass, a disk-filling one does not.
DEFAULT_MAX_FILE_SIZE = 512 << 20

#: Default ``--transfer-quota``: bytes of files one computation may hold on a node.
DEFAULT_TRANSFER_QUOTA = 4 << 30

#: Default ``--file-cache-size``: bytes of files no client uses any more that the node
#: keeps, so that a computation set up again need not send its files again.
DEFAULT_FILE_CACHE_SIZE = 1 << 30


@dataclasses.dataclass(kw_only=True)
class NodeConfig:
    """Everything a node server needs to run; `validate` explains what is wrong."""

    host: str = "127.0.0.1"
    port: int = NODE_PORT
    cpus: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    name: str = dataclasses.field(default_factory=socket.gethostname)
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    dest_path: str = dataclasses.field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), "dispynb")
    )
    clean: bool = False
    #: Largest file a client may send (0: no limit); a file travels in one message.
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    #: Bytes of files one client connection (one cluster's computation) may have on
    #: the node at once: every file received, less those its client released once
    #: the jobs that needed them ended (0: no limit).
    transfer_quota: int = DEFAULT_TRANSFER_QUOTA
    #: Bytes of files that no client uses any more kept for reuse (idle longest
    #: removed first; 0: none kept).
    file_cache_size: int = DEFAULT_FILE_CACHE_SIZE
    max_message_size: int = MAX_MESSAGE_SIZE
    port_file: str | None = None
    #: Also listen on this Unix socket, in a private directory (a `LocalCluster`'s:
    #: its client connects there instead of over loopback TCP).
    unix_socket: str | None = None
    #: More addresses to listen on (dispynode's repeated ``-i``), same port.
    more_hosts: list[str] = dataclasses.field(default_factory=list)
    #: Answer UDP discovery pings and announce the node (off: clients must name it).
    #: None (default): on, as dispynode, unless the node listens only on loopback
    #: (nobody else could connect; set by `validate`).
    discovery: bool | None = None
    discovery_port: int = DISCOVERY_PORT
    #: Also hear pings on the IPv4 multicast group (implies ``discovery``).
    ipv4_multicast: bool = False
    #: Seconds a client may stay silent (no pulse) before its computations are
    #: freed and their jobs killed; 0 never frees them.
    orphan_timeout: float = 300.0
    #: Seconds running jobs may go on after SIGTERM before they are terminated
    #: (0: at once). Unstarted jobs go back to their clients either way.
    drain_timeout: float = 30.0
    #: Address announced for clients to connect to instead of the one discovery
    #: datagrams come from (NAT, multi-homed hosts); a host name is resolved once,
    #: at start. Clients follow it only if it fits a node spec of theirs.
    ext_host: str | None = None
    #: Largest total size (bytes) of results kept on disk for clients that may have
    #: crashed (``recover_file``); results over it are not kept, with a warning.
    kept_results_size: int = 1 << 30
    #: Client connections to serve before exiting (dispynode's ``--serve``); -1: no
    #: limit, 0: exit at once.
    serve: int = -1
    #: Daily service window (dispynode's ``--service_start/stop/end``), or None.
    service_window: ServiceWindow | None = None
    #: Computations' cleanup may stop the node (dispynode's ``--client_shutdown``).
    client_shutdown: bool = False
    #: Seconds a connecting client gets to authenticate (dispynode's ``--msg_timeout``).
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: Seconds between announcements while running (dispynode's ``--ping_interval``);
    #: 0: only at start and stop.
    announce_interval: float = 0.0
    #: Remove every computation's files when it ends, even if the client asked to
    #: keep them (``cleanup=False``): dispynode's ``--force_cleanup``.
    force_cleanup: bool = False
    #: Seconds without any authenticated client session after which the node exits
    #: (drains as on SIGTERM), counted from start (from registration with
    #: ``--register``) or from the last session's end; with ``--register`` only if
    #: the client it registered with is gone too. 0: never. Launched nodes use it
    #: to end when their client is gone (``--exit-without-client``).
    exit_without_client: float = 0.0

    @property
    def hosts(self) -> list[str]:
        """Every address the node listens on."""
        return [self.host, *self.more_hosts]

    def validate(self) -> None:
        """Raise `ConfigurationError` with a fix for every unsafe or invalid setting."""
        available = os.cpu_count() or 1
        if self.cpus <= 0:
            self.cpus = max(available + self.cpus, 1)
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port {self.port} is not in 0..65535")
        if not 0 <= self.discovery_port <= 65534:
            raise ConfigurationError(
                f"discovery port {self.discovery_port} is not in 0..65534 (clients "
                "hear announcements on the next port)"
            )
        if self.ipv4_multicast and self.discovery is None:
            self.discovery = True
        discovery_asked = self.discovery is not None  # (for --ext-host's error)
        if self.discovery is None:
            self.discovery = not all(is_loopback(host) for host in self.hosts)
        if self.ipv4_multicast and not self.discovery:
            raise ConfigurationError(
                "--ipv4-multicast is a discovery option: leave out --no-discovery"
            )
        if self.ipv4_multicast and ":" in self.host:
            raise ConfigurationError(
                f"--ipv4-multicast needs an IPv4 host, not {self.host!r}: IPv6 "
                "discovery (with an IPv6 host) always uses multicast"
            )
        if self.ext_host is not None:
            self.ext_host = _resolve_ext_host(
                self.ext_host, self.discovery, discovery_asked
            )
        if self.max_message_size < PRE_AUTH_MAX_FRAME:
            raise ConfigurationError(
                f"max message size must be at least {PRE_AUTH_MAX_FRAME} bytes"
            )
        if self.orphan_timeout < 0:
            raise ConfigurationError("orphan timeout must be 0 (never) or positive")
        if not self.drain_timeout >= 0:  # also refuses NaN
            raise ConfigurationError(
                f"drain timeout must be 0 (terminate jobs at once) or positive, not "
                f"{self.drain_timeout}"
            )
        if self.kept_results_size < 0:
            raise ConfigurationError("kept results size must be 0 (none) or positive")
        if self.max_file_size < 0:
            raise ConfigurationError("max file size must be 0 (no limit) or positive")
        if self.transfer_quota < 0:
            raise ConfigurationError("transfer quota must be 0 (no limit) or positive")
        if self.file_cache_size < 0:
            raise ConfigurationError("file cache size must be 0 (none) or positive")
        if self.keyfile and not self.certfile:
            raise ConfigurationError("a keyfile needs its certfile (--certfile)")
        if not self.handshake_timeout > 0:
            raise ConfigurationError(
                f"message timeout must be a positive number of seconds, not "
                f"{self.handshake_timeout}"
            )
        if not self.exit_without_client >= 0:  # also refuses NaN
            raise ConfigurationError(
                f"--exit-without-client must be 0 (never) or a positive number of "
                f"seconds, not {self.exit_without_client}"
            )
        if self.announce_interval < 0:
            raise ConfigurationError("ping interval must be 0 (off) or positive")
        public = [host for host in self.hosts if not is_loopback(host)]
        if not self.secret and not self.cafile and public:
            raise ConfigurationError(
                f"refusing to listen on {public[0]!r} without a secret or client "
                "certificates: anyone who can reach the port could run code as this "
                "user (--certfile alone proves the node to its clients, not them to "
                "it). Give a secret (--secret-file FILE, made with 'dispynb secret "
                "FILE' and given to the clients too; or DISPYNB_SECRET), or "
                "--cafile with the CA of the clients' certificates, or listen on "
                "127.0.0.1"
            )
        if self.secret and public:
            check_strength(self.secret, f"for a node listening on {public[0]!r}")


def _resolve_ext_host(ext_host: str, discovery: bool | None, asked: bool) -> str:
    """``--ext-host`` as an IP address (a name is looked up now, once)."""
    if not discovery and not asked:  # dispynode's -i 127.0.0.1 --ext_ip_addr X
        raise ConfigurationError(
            f"--ext-host {ext_host} is announced by discovery, which a node "
            "listening only on loopback does not answer unless --discovery is "
            "given: give --discovery (or leave --ext-host out)"
        )
    if not discovery:
        raise ConfigurationError(
            f"--ext-host {ext_host} is announced by discovery: leave out "
            "--no-discovery (or leave --ext-host out; clients that name this node "
            "connect to the name)"
        )
    text = ext_host.strip().strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        try:
            infos = socket.getaddrinfo(text, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise ConfigurationError(
                f"--ext-host {ext_host!r} is neither an IP address nor a name that "
                f"resolves ({exc}): give the address clients should connect to"
            ) from None
        address = ipaddress.ip_address(str(infos[0][4][0]).split("%")[0])
    if address.is_unspecified or address.is_multicast:
        raise ConfigurationError(
            f"--ext-host {ext_host!r} must be one unicast address that clients can "
            "reach, not a wildcard or multicast address"
        )
    return str(address)
