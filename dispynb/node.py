"""User-facing descriptions of nodes: what the client knows of a node, and which nodes
a cluster may use (dispy's `NodeAllocate` and the ``nodes=`` specs); no I/O.

The one exception to "no I/O" is the lazy name lookup of `NodeAllocate.resolve`, done
only for a spec naming a host (never for a wildcard or an IP address) and only when the
address is needed; the cluster calls it off its I/O loop.

Contents
--------
NodeStatus
    dispy's node status numbers for ``cluster_status`` callbacks.
DispyNode
    The client-side view of one node.
DispyNodeAvailInfo
    Resources available on a node.
NodeAllocate
    Which nodes a cluster may use, and how many of their CPUs; subclass to customize.
parse_node_specs
    Turn anything accepted by ``nodes=`` into a list of `NodeAllocate`.
is_wildcard
    Whether a spec matches nodes by pattern (found by discovery) rather than by host.
"""

from __future__ import annotations

import enum
import ipaddress
import operator
import re
import socket
import time
from typing import Any, ClassVar

from dispynb.defaults import NODE_PORT
from dispynb.errors import ConfigurationError

__all__ = [
    "DispyNode",
    "DispyNodeAvailInfo",
    "NodeAllocate",
    "NodeStatus",
    "is_wildcard",
    "parse_node_specs",
]

_SPEC_FORMS = (
    "a host string ('192.168.1.5', 'node1:9711', '[::1]:9711' or a wildcard such as "
    "'192.168.1.*'), a NodeAllocate, a (host, port, cpus, depends, setup_args) tuple "
    "or list (trailing items optional), a dict with those keys, a DispyNode, or an "
    "object with a node_specs() method such as a LocalCluster"
)
_DICT_KEYS = frozenset({"host", "port", "cpus", "depends", "setup_args"})


class NodeStatus(enum.IntEnum):
    """Node events passed to ``cluster_status`` callbacks; the numbers are dispy's."""

    Initialized = 4
    Closed = 16
    AvailInfo = 17

    __repr__ = int.__repr__  # plain ints, as in dispy


class DispyNodeAvailInfo:
    """Resources available on a node, as reported with its pulses.

    Parameters
    ----------
    cpu:
        Percentage of CPU available.
    memory:
        Bytes of memory available.
    disk:
        Bytes free on the disk holding the node's working directory.
    swap:
        Percentage of swap available (100 on a node without swap, as in dispy).
    """

    def __init__(self, cpu: float, memory: int, disk: int, swap: float) -> None:
        self.cpu = cpu
        self.memory = memory
        self.disk = disk
        self.swap = swap

    def __repr__(self) -> str:
        return (
            f"<DispyNodeAvailInfo cpu={self.cpu:.1f}% memory={self.memory} "
            f"disk={self.disk} swap={self.swap:.1f}%>"
        )


class DispyNode:
    """The client-side view of a node, passed to ``cluster_status`` callbacks.

    Parameters
    ----------
    ip_addr:
        The node's IP address.
    name:
        The node's host name.
    cpus:
        CPUs the cluster uses on this node.
    port:
        The node server's TCP port (dispynb's default port if not given).
    platform:
        ``platform.platform()`` of the node.

    Attributes
    ----------
    avail_cpus:
        CPUs the node offers.
    busy:
        Jobs currently running on the node for this cluster.
    jobs_done:
        Jobs this node completed for this cluster.
    cpu_time:
        Seconds of job run time on this node.
    tx, rx:
        Bytes sent to and received from the node.
    update_time:
        Epoch seconds of the last news from the node.
    avail_info:
        A `DispyNodeAvailInfo`, or ``None`` until the node reports one, and while
        it cannot read one of its figures (a node out of file descriptors cannot
        read ``/proc``): unknown, as dispy says of a node without psutil, never
        zeros a scheduler would take for a full node. When set, its four figures
        are numbers.
    """

    Initialized: ClassVar[NodeStatus] = NodeStatus.Initialized
    Closed: ClassVar[NodeStatus] = NodeStatus.Closed
    AvailInfo: ClassVar[NodeStatus] = NodeStatus.AvailInfo

    def __init__(
        self,
        ip_addr: str,
        name: str = "",
        cpus: int = 0,
        port: int = NODE_PORT,
        platform: str = "",
    ) -> None:
        # dispy's argument order is (ip_addr, name, cpus); the port is dispynb's.
        self.ip_addr = ip_addr
        self.port = port
        self.name = name
        self.cpus = cpus
        self.avail_cpus = cpus
        self.busy = 0
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.tx = 0
        self.rx = 0
        self.update_time = time.time()
        self.avail_info: DispyNodeAvailInfo | None = None
        self.platform = platform

    def __repr__(self) -> str:
        return (
            f"<DispyNode {self.ip_addr}:{self.port} name={self.name!r} "
            f"cpus={self.cpus} busy={self.busy}>"
        )


class NodeAllocate:
    """Which nodes a cluster may use, and how many of their CPUs.

    Subclass it and override `allocate` to choose nodes, and to set per-node
    ``self.depends`` and ``self.setup_args`` before returning.

    Parameters
    ----------
    host:
        A host name, an IP address or a pattern where ``*`` matches any run of
        characters (``'192.168.1.*'``, ``'*'``). May carry a port: ``'node1:9711'``,
        ``'[::1]:9711'``.
    port:
        The node server's port; ``None`` for the cluster's default.
    cpus:
        ``0`` uses every CPU of a node, ``n > 0`` at most ``n``, ``n < 0`` leaves
        ``-n`` CPUs unused.
    depends:
        Extra dependencies (files) sent to matching nodes. The list is copied.
    setup_args:
        Arguments for the computation's ``setup`` on matching nodes; a list is
        converted to a tuple.

    Attributes
    ----------
    host:
        The host as given, without port or brackets.
    ip_addr:
        The node's IP address: the wildcard as given, an IP address in canonical form,
        or the address a host name resolves to (looked up on first use).
    ip_rex:
        The regular expression nodes are matched with, e.g. ``'192\\.168\\.1\\..*'``.

    Raises
    ------
    ConfigurationError
        If an argument has the wrong type or value.
    """

    def __init__(
        self,
        host: str,
        port: int | str | None = None,
        cpus: int = 0,
        depends: list[Any] | tuple[Any, ...] | None = None,
        setup_args: tuple[Any, ...] | list[Any] = (),
    ) -> None:
        host, host_port = _split_host_port(host)
        if port is not None and host_port is not None and _port(port) != host_port:
            raise ConfigurationError(
                f"node {host!r} is given port {port!r} and port {host_port} in its "
                "host string; give the port once"
            )
        self.host: str = host
        self.port: int | None = host_port if port is None else _port(port)
        self.cpus: int = _cpus(cpus, host)
        self.depends = depends  # the setters validate and copy
        self.setup_args = setup_args
        canonical = _canonical_ip(host)
        self._is_name = canonical is None and "*" not in host
        self._ip_addr: str | None = None if self._is_name else (canonical or host)
        self.ip_rex: str = _host_rex(canonical or host)

    # -- validated attributes --------------------------------------------------------

    @property
    def depends(self) -> list[Any]:
        """Extra dependencies for matching nodes (always a list)."""
        return self._depends

    @depends.setter
    def depends(self, value: list[Any] | tuple[Any, ...] | None) -> None:
        if value is None:
            self._depends: list[Any] = []
        elif isinstance(value, list | tuple):
            self._depends = list(value)
        else:
            raise ConfigurationError(
                f"depends of node {self.host!r} must be a list, not "
                f"{type(value).__name__}; e.g. depends=['data.csv']"
            )

    @property
    def setup_args(self) -> tuple[Any, ...]:
        """Arguments for ``setup`` on matching nodes (always a tuple)."""
        return self._setup_args

    @setup_args.setter
    def setup_args(self, value: tuple[Any, ...] | list[Any]) -> None:
        if isinstance(value, tuple):
            self._setup_args: tuple[Any, ...] = value
        elif isinstance(value, list):
            self._setup_args = tuple(value)
        else:
            raise ConfigurationError(
                f"setup_args of node {self.host!r} must be a tuple, not "
                f"{type(value).__name__}; for one argument write setup_args=(value,)"
            )

    @property
    def ip_addr(self) -> str:
        """The node's IP address, or the wildcard; resolves a host name on first use."""
        if self._ip_addr is None:
            return self.resolve() or self.host
        return self._ip_addr

    @ip_addr.setter
    def ip_addr(self, value: str) -> None:
        self._ip_addr = value

    # -- matching --------------------------------------------------------------------

    def resolve(self) -> str | None:
        """Look up the host name (once) and return its address, IPv4 preferred.

        Returns ``None`` if the name does not resolve. Wildcards and IP addresses are
        returned without any lookup. Blocking: call it off the I/O loop.
        """
        if self._ip_addr is not None or not self._is_name:
            return self._ip_addr
        try:
            infos = socket.getaddrinfo(self.host, None, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return None
        if not infos:
            return None
        best = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
        self._ip_addr = _canonical_ip(str(best[4][0])) or str(best[4][0])
        return self._ip_addr

    def matches(self, ip_addr: str, name: str = "") -> bool:
        """Return whether the node at ``ip_addr`` named ``name`` fits this spec.

        ``ip_rex`` must match the whole address or the whole name (ignoring case);
        a spec naming a host also matches the address the name resolves to.
        """
        rex = self.ip_rex
        ip = _canonical_ip(ip_addr) or ip_addr
        if re.fullmatch(rex, ip, re.IGNORECASE):
            return True
        if name and re.fullmatch(rex, name, re.IGNORECASE):
            return True
        return self._is_name and self.resolve() == ip

    def allocate(
        self,
        cluster: Any,
        ip_addr: str,
        name: str,
        cpus: int,
        avail_info: DispyNodeAvailInfo | None = None,
        platform: str = "",
    ) -> int:
        """Return how many of a node's CPUs the cluster uses; 0 rejects the node.

        Called by the cluster for each node it finds, with ``avail_info`` and
        ``platform`` passed by keyword. Overrides may set ``self.depends`` and
        ``self.setup_args`` for this node before returning. As in dispy, a node
        one allocation declines is asked of the cluster's next that fits it (those
        naming a host before patterns, each in the order of ``nodes``).

        Parameters
        ----------
        cluster:
            The cluster the node is allocated for.
        ip_addr, name:
            The node's address and host name.
        cpus:
            CPUs the node offers.
        avail_info:
            The node's available resources, if known.
        platform:
            ``platform.platform()`` of the node.
        """
        if not self.matches(ip_addr, name):
            return 0
        if self.cpus > 0:
            return min(cpus, self.cpus)
        if self.cpus < 0:
            return max(cpus + self.cpus, 0)
        return cpus

    def __repr__(self) -> str:
        port = "" if self.port is None else f" port={self.port}"
        return f"<{type(self).__name__} {self.host!r}{port} cpus={self.cpus}>"


def is_wildcard(spec: NodeAllocate) -> bool:
    """Return whether ``spec`` matches nodes by pattern rather than naming one host.

    Wildcard specs are served by discovery; the others are contacted directly.
    """
    return "*" in spec.host


def parse_node_specs(nodes: Any) -> list[NodeAllocate]:
    """Turn the ``nodes=`` argument of a cluster into a list of `NodeAllocate`.

    Parameters
    ----------
    nodes:
        ``None`` (no specs: the caller picks its default), one host string, an
        object with a ``node_specs()`` method (e.g. ``nodes=LocalCluster(...)``: its
        specs are used), or a list or tuple whose items are each a host string
        (``'host'``, ``'host:port'``, ``'[::1]:port'``, wildcards such as
        ``'192.168.1.*'``), a `NodeAllocate`, a ``(host, port, cpus, depends,
        setup_args)`` tuple or list (trailing items optional), a dict with those
        keys (``host`` defaults to ``'*'``), a `DispyNode`, or an object with
        ``node_specs()``.

    Returns
    -------
    list of NodeAllocate
        Specific hosts first, then wildcards from the most to the least specific;
        otherwise in the order given.

    Raises
    ------
    ConfigurationError
        If an item has none of the accepted forms.
    """
    if nodes is None:
        return []
    specs = _flatten_specs(nodes, "nodes")
    return sorted(specs, key=_specificity)


def _flatten_specs(nodes: Any, where: str) -> list[NodeAllocate]:
    if isinstance(nodes, str | NodeAllocate | DispyNode | dict):
        nodes = [nodes]
    elif _has_node_specs(nodes):
        return _flatten_specs(nodes.node_specs(), f"{where}.node_specs()")
    elif not isinstance(nodes, list | tuple):
        raise ConfigurationError(
            f"{where} is {nodes!r} ({type(nodes).__name__}); give a list whose items "
            f"are each {_SPEC_FORMS}"
        )
    specs: list[NodeAllocate] = []
    for index, item in enumerate(nodes):
        if _has_node_specs(item):
            specs.extend(_flatten_specs(item.node_specs(), f"{where}[{index}]"))
        else:
            specs.append(_parse_item(item, f"{where}[{index}]"))
    return specs


def _has_node_specs(obj: Any) -> bool:
    return not isinstance(obj, type) and callable(getattr(obj, "node_specs", None))


def _parse_item(item: Any, where: str) -> NodeAllocate:
    try:
        return _convert_item(item, where)
    except ConfigurationError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigurationError(f"{where}: {exc}") from None


def _convert_item(item: Any, where: str) -> NodeAllocate:
    if isinstance(item, NodeAllocate):
        return item
    if isinstance(item, str):
        return NodeAllocate(item)
    if isinstance(item, DispyNode):
        return NodeAllocate(item.ip_addr, port=item.port)
    if isinstance(item, tuple | list) and 1 <= len(item) <= 5:
        return NodeAllocate(*item)
    if isinstance(item, dict):
        unknown = set(item) - _DICT_KEYS
        if unknown:
            raise ConfigurationError(
                f"{where} has unknown keys {sorted(unknown, key=str)}; "
                f"use only {sorted(_DICT_KEYS)}"
            )
        return NodeAllocate(
            item.get("host", "*"), **{k: v for k, v in item.items() if k != "host"}
        )
    raise ConfigurationError(
        f"{where} is {item!r} ({type(item).__name__}); each node must be {_SPEC_FORMS}"
    )


def _specificity(spec: NodeAllocate) -> tuple[int, int]:
    """Sort key: specific hosts first, then wildcards with more literal characters."""
    if not is_wildcard(spec):
        return (0, 0)
    return (1, -len(spec.host.replace("*", "")))


def split_address(text: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of ``'host:port'``, ``'[v6addr]:port'`` or a bare host (port
    None), or None if ``text`` is not such an address."""
    try:
        return _split_host_port(text)
    except ConfigurationError:
        return None


def _split_host_port(host: Any) -> tuple[str, int | None]:
    """Split ``'host:port'`` or ``'[v6addr]:port'``; a bare IPv6 address has no port."""
    if not isinstance(host, str) or not host.strip():
        raise ConfigurationError(
            f"node host must be a non-empty string such as '192.168.1.5', "
            f"'node1:9711' or '192.168.1.*', not {host!r}"
        )
    host = host.strip()
    if host.startswith("["):
        addr, bracket, rest = host[1:].partition("]")
        if not bracket or not addr or (rest and not rest.startswith(":")):
            raise ConfigurationError(
                f"node host {host!r} is malformed; write IPv6 addresses as "
                "'[::1]' or '[::1]:9711'"
            )
        return addr, _port(rest[1:]) if rest else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        if not name:
            raise ConfigurationError(f"node host {host!r} has no host before the port")
        return name, _port(port)
    return host, None


def _port(port: Any) -> int:
    try:
        if isinstance(port, bool):
            raise TypeError
        value = int(port) if isinstance(port, str) else operator.index(port)
    except (TypeError, ValueError):
        value = 0
    if not 0 < value < 65536:
        raise ConfigurationError(
            f"node port must be an integer from 1 to 65535, not {port!r}"
        )
    return value


def _cpus(cpus: Any, host: str) -> int:
    try:
        if isinstance(cpus, bool):
            raise TypeError
        return int(cpus) if isinstance(cpus, str) else operator.index(cpus)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"cpus of node {host!r} must be an integer (0 for all CPUs, n to use at "
            f"most n, -n to leave n unused), not {cpus!r}"
        ) from None


def _canonical_ip(addr: str) -> str | None:
    """Return ``addr`` in canonical form if it is an IP address (scope id dropped)."""
    try:
        return ipaddress.ip_address(addr.partition("%")[0]).compressed
    except ValueError:
        return None


def _host_rex(host: str) -> str:
    """Regex matching ``host``, where ``*`` matches any run of characters."""
    return ".*".join(re.escape(part) for part in host.split("*"))
