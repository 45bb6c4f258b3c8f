"""dispynb: distributed and parallel computing for Python scripts and Jupyter notebooks.

The public API is dispy's (``import dispynb as dispy`` runs dispy programs). Names are
imported lazily (PEP 562), so ``import dispynb.protocol`` on a node loads nothing else.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from dispynb import (
    _check_python,  # noqa: F401  # first: it stops Python < 3.11
    _joblibhook,
)
from dispynb._version import __version__

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster
    from dispynb.executor import Executor
    from dispynb.job import DispyJob
    from dispynb.jupyter.run import Run
    from dispynb.local import LocalCluster
    from dispynb.log import logger
    from dispynb.node import DispyNode, DispyNodeAvailInfo, NodeAllocate
    from dispynb.objects import ObjectRef
    from dispynb.recovery import recover_jobs
    from dispynb.shared import SharedJobCluster
    from dispynb.status import ClusterStatus

_LAZY: dict[str, str] = {
    "ClusterStatus": "dispynb.status",
    "DispyJob": "dispynb.job",
    "DispyNode": "dispynb.node",
    "DispyNodeAvailInfo": "dispynb.node",
    "Executor": "dispynb.executor",
    "JobCluster": "dispynb.cluster",
    "LocalCluster": "dispynb.local",
    "NodeAllocate": "dispynb.node",
    "ObjectRef": "dispynb.objects",
    "SharedJobCluster": "dispynb.shared",
    "Run": "dispynb.jupyter.run",
    "logger": "dispynb.log",
    "recover_jobs": "dispynb.recovery",
}

__all__ = [
    "ClusterStatus",
    "DispyJob",
    "DispyNode",
    "DispyNodeAvailInfo",
    "Executor",
    "JobCluster",
    "LocalCluster",
    "MsgTimeout",
    "NodeAllocate",
    "ObjectRef",
    "Run",
    "SharedJobCluster",
    "__version__",
    "load_ipython_extension",
    "logger",
    "recover_jobs",
    "unload_ipython_extension",
]


# joblib's backend="dispynb" without importing joblib (nor dispynb.joblib_backend).
_joblibhook.install()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dispynb``: the ``%dispy`` and ``%%dispy`` magics (loaded lazily)."""
    from dispynb.jupyter import load_ipython_extension

    load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext dispynb``: close the magics' runs and local nodes."""
    from dispynb.jupyter import unload_ipython_extension

    unload_ipython_extension(ipython)


#: Submodules reachable as attributes, as dispy's ``dispy.httpd`` and ``dispy.config``.
_SUBPACKAGES = frozenset({"httpd", "config"})


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"dispynb.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispynb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBPACKAGES | {"MsgTimeout"})


class _Module(types.ModuleType):
    """This module, taking ``dispy.MsgTimeout = 60`` as dispy does: dispy's
    functions read their module's own ``MsgTimeout``, so that is the setting dispy
    programs change; here it is `dispynb.config`'s, which the connections read
    (set on this module, it hid that one and changed nothing)."""

    @property
    def MsgTimeout(self) -> float:  # dispy's name
        config: Any = importlib.import_module("dispynb.config")
        return config.MsgTimeout  # type: ignore[no-any-return]

    @MsgTimeout.setter
    def MsgTimeout(self, value: float) -> None:
        config: Any = importlib.import_module("dispynb.config")
        config.MsgTimeout = value


sys.modules[__name__].__class__ = _Module
