"""A shared scheduler (``dispynb-scheduler``) as the engine under `SharedJobCluster`.

The scheduler speaks the node protocol to its clients, so this engine is dispynb's
node engine (`NodesBackend`) pointed at one "node", the scheduler, whose CPUs are
those of the nodes it shares out. It proves the user's credential
(``dispynb-user:NAME:TOKEN``, see `dispynb.secret.split_credential`) instead of the
node secret, and tells the scheduler whether the computation wants the nodes to
itself (``exclusive``).
"""

from __future__ import annotations

from dispynb.backends import base
from dispynb.backends.base import ClusterConfig, JobEvents
from dispynb.backends.nodes import NodeEngine, NodesBackend
from dispynb.errors import ConfigurationError
from dispynb.node import parse_node_specs
from dispynb.secret import split_credential
from dispynb.transport.addressing import format_address


class SchedulerEngine(NodeEngine):
    """The nodes of a ``dispynb-scheduler`` at ``address`` (``host:port``).

    A `NodeAllocate` for the scheduler's address among the cluster's ``nodes`` gives
    its ``setup_args`` and ``depends``; other ``nodes`` are not used.
    """

    name = "scheduler"
    #: The scheduler chooses the nodes: ``nodes=`` (``%%dispy --on``) selects none.
    features: frozenset[str] = base.ALL_FEATURES - {base.SELECT_NODES}

    def __init__(self, address: str, exclusive: bool = False) -> None:
        self.address = address
        self.exclusive = exclusive

    def open(self, events: JobEvents, config: ClusterConfig) -> NodesBackend:
        """Connect to the scheduler as a user and set the computation up there."""
        user, _key = split_credential(config.options.secret)
        if not user:
            raise ConfigurationError(
                "a SharedJobCluster proves its user's credential to the scheduler: "
                "give secret_file= the file 'dispynb-scheduler user add NAME' wrote "
                "(or secret='dispynb-user:NAME:TOKEN', or DISPYNB_SECRET_FILE)"
            )
        # The scheduler is the one "node"; a NodeAllocate naming it keeps its
        # setup_args and depends (`SharedJobCluster` makes one).
        specs = [
            spec
            for spec in parse_node_specs(config.options.nodes)
            if format_address(spec.host, spec.port or 0) == self.address
        ]
        backend = NodesBackend(
            events, config, specs=specs or parse_node_specs(self.address)
        )
        backend.driver.config.exclusive = self.exclusive
        try:
            backend.start()
        except BaseException:
            backend.close(terminate=True)
            raise
        return backend

    def __repr__(self) -> str:
        return f"SchedulerEngine({self.address!r}, exclusive={self.exclusive})"


__all__ = ["SchedulerEngine"]
