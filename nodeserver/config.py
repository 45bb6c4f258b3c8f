"""`NodeConfig`: the node server's settings, validated."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile

from dispynb.defaults import (
    DISCOVERY_PORT,
    MAX_MESSAGE_SIZE,
    NODE_PORT,
    PRE_AUTH_MAX_FRAME,
)
from dispynb.errors import ConfigurationError
from dispynb.transport.addressing import is_loopback


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
    max_file_size: int = 0
    max_message_size: int = MAX_MESSAGE_SIZE
    port_file: str | None = None
    #: Answer UDP discovery pings and announce the node (off: clients must name it).
    discovery: bool = False
    discovery_port: int = DISCOVERY_PORT
    #: Also hear pings on the IPv4 multicast group (implies ``discovery``).
    ipv4_multicast: bool = False
    #: Seconds a client may stay silent (no pulse) before its computations are
    #: freed and their jobs killed; 0 never frees them.
    orphan_timeout: float = 300.0

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
        if self.ipv4_multicast:
            self.discovery = True
        if self.discovery and ":" in self.host:
            raise ConfigurationError(
                f"discovery is IPv4 only: listen on an IPv4 address, not "
                f"{self.host!r}, or leave --discovery off and name this node in "
                "clients' nodes="
            )
        if self.max_message_size < PRE_AUTH_MAX_FRAME:
            raise ConfigurationError(
                f"max message size must be at least {PRE_AUTH_MAX_FRAME} bytes"
            )
        if self.orphan_timeout < 0:
            raise ConfigurationError("orphan timeout must be 0 (never) or positive")
        if self.max_file_size < 0:
            raise ConfigurationError("max file size must be 0 (no limit) or positive")
        if self.keyfile and not self.certfile:
            raise ConfigurationError("a keyfile needs its certfile (--certfile)")
        if not self.secret and not self.certfile and not is_loopback(self.host):
            raise ConfigurationError(
                f"refusing to listen on {self.host!r} without a secret or TLS: anyone "
                "who can reach the port could run code as this user. Give a secret "
                "(--secret-file FILE with mode 600, or DISPYNB_SECRET) and/or TLS "
                "(--certfile/--keyfile), or listen on 127.0.0.1"
            )
