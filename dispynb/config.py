"""dispy's module-level settings (``dispy.config``), for programs that read or set them.

dispy keeps its ports and timeouts as globals of ``dispy.config``: programs print them,
or raise ``MsgTimeout`` for slow links (``dispy.MsgTimeout = 60``, which sets this
module's, or ``dispy.config.MsgTimeout = 60``). dispynb keeps the names; what each
one means here:

DispyPort
    dispy's base port; a dispynb node listens on ``DispyPort + 1`` = `NodePort` by
    default (9711: a dispy node on the same machine keeps its 9701). A program that
    sets it has given ``dispy_port=`` (dispy's keyword did nothing else): nodes named
    without a port are on it, as nodes started with ``dispynb-node -p DispyPort``.
NodePort
    TCP port of node servers when a node spec names none (and `DispyPort` is not
    set).
ClientPort
    dispy clients listened on it for results; dispynb clients open no port (nodes
    answer over the client's own connection). Kept for programs that print it.
SharedSchedulerPort
    TCP port of the shared scheduler, ``dispynb-scheduler`` (9712), where
    `SharedJobCluster` connects when ``scheduler_host`` names no port.
HTTPServerPort
    Default port of the web monitor, `dispynb.httpd.DispyHTTPServer`.
IPv4MulticastGroup, IPv6MulticastGroup
    Discovery groups (``ipv4_udp_multicast=True``; IPv6 node patterns). dispynb uses
    dispy's IPv6 group id with link-local scope.
MsgTimeout
    Seconds for one network operation, read each time a client connects to a node:
    the TCP connect may take ``MsgTimeout`` s and the authentication handshake half
    of it (10 and 5 s by default).
MaxFileSize
    dispy's client-side file size limit (0: none). dispynb nodes enforce their own
    limit (``dispynb-node --max_file_size``), and jobs' files are bounded by the
    message size limit.
Java
    The Java interpreter dispy ran ``.java`` programs with (unused: dispynb runs
    program computations as executables or Python scripts).
"""

from __future__ import annotations

from dispynb.defaults import IPV4_MULTICAST_GROUP, NODE_PORT

DispyPort: int = NODE_PORT - 1
NodePort: int = NODE_PORT
ClientPort: int = DispyPort
SharedSchedulerPort: int = DispyPort + 2
HTTPServerPort: int = 8181
IPv4MulticastGroup: str = IPV4_MULTICAST_GROUP
IPv6MulticastGroup: str = "ff02::b409:3171:9705:5134:6159"
MsgTimeout: float = 10
MaxFileSize: int = 0
Java: str = "/usr/bin/java"

#: `MsgTimeout`'s default: connect and handshake timeouts scale with MsgTimeout / this.
DEFAULT_MSG_TIMEOUT = 10.0
