"""Launchers: node servers started where people's machines are (SSH, SLURM).

Every launcher fulfils `NodeLauncher` (`dispynb.deploy.base`): it starts nodes that
register with this process (``dispynb-node --register``) and is given to a cluster as
``JobCluster(compute, nodes=launcher)``; its `NodeLauncher.scale` and
`NodeLauncher.adapt` set the number of nodes, or let it follow the jobs
(`dispynb.deploy.adaptive`).
"""

from dispynb.deploy.adaptive import Adaptive, ScaleEvent
from dispynb.deploy.base import LaunchError, NodeLauncher
from dispynb.deploy.registry import RegisteredNode, Registrar
from dispynb.deploy.slurm import SlurmNodes
from dispynb.deploy.ssh import SSHNodes

__all__ = [
    "Adaptive",
    "LaunchError",
    "NodeLauncher",
    "RegisteredNode",
    "Registrar",
    "SSHNodes",
    "ScaleEvent",
    "SlurmNodes",
]
