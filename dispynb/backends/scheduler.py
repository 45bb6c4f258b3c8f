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
from dispynb.secret import split_credential


class SchedulerEngine(NodeEngine):
    """The nodes of a ``dispynb-scheduler`` at ``address`` (``host[:port]``).

    The cluster's ``nodes`` must name the scheduler (`SharedJobCluster` does).
    """

    name = "scheduler"
    features: frozenset[str] = base.ALL_FEATURES

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
        backend = NodesBackend(events, config)
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
