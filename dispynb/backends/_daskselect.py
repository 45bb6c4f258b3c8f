"""Which Dask workers a `JobCluster`'s ``nodes=`` selects (addresses, hosts or
worker names), and the host and port of a Dask worker's address."""

from __future__ import annotations

from typing import Any

from dispynb.errors import ConfigurationError, NotSupportedError
from dispynb.node import NodeAllocate


def _wanted_workers(nodes: Any) -> list[str] | None:
    """The workers ``JobCluster(nodes=...)`` names (None: every worker).

    A local cluster object (it brings its engine) or ``'*'`` means every worker;
    strings are worker addresses, ``host:port``, hosts or worker names; dispy's node
    objects count by their IP address.
    """
    if nodes is None or hasattr(nodes, "engine"):
        return None
    items = [nodes] if isinstance(nodes, str | NodeAllocate) else nodes
    try:
        wanted = [_worker_spec(item) for item in items]
    except (TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"nodes={nodes!r}: on the 'dask' engine give Dask worker addresses, "
            "hosts or worker names"
        ) from exc
    return None if not wanted or "*" in wanted else wanted


def _worker_spec(item: Any) -> str:
    """What one item of ``nodes=`` selects: an address, host or name.

    A `NodeAllocate` selects by host (and port, if given); its per-node ``cpus``,
    ``setup_args`` and ``depends`` have no meaning for Dask workers, so they are
    refused rather than ignored.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, NodeAllocate):
        extras = [
            name
            for name, value in (
                ("cpus", item.cpus),
                ("setup_args", item.setup_args),
                ("depends", item.depends),
            )
            if value
        ]
        if extras:
            raise NotSupportedError(
                f"nodes=: NodeAllocate({item.host!r}) with {', '.join(extras)}: "
                "per-node settings are not supported on the 'dask' engine (a Dask "
                "worker's threads are its CPUs; every worker gets the cluster's "
                "setup and depends): give nodes= the workers' addresses, hosts or "
                "names only, and JobCluster(setup=..., depends=...) for all of them"
            )
        host = item.host if item.port is None else f"{item.host}:{item.port}"
        return str(host)
    return str(getattr(item, "ip_addr", None) or item.host)


def _host_port(address: str) -> tuple[str, int]:
    """``('10.0.0.2', 40123)`` for ``'tcp://10.0.0.2:40123'``."""
    location = address.rsplit("://", 1)[-1]
    host, _, port = location.rpartition(":")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        return location, 0
