"""What the node engine (`dispynb.backends.nodes`) derives from a cluster's options,
from this process and from what each node says of itself.

Contents:

* `configured_port`, `result_cap`, `client_name`: settings of the driver that the
  options (or `dispynb.config`, or this process) give;
* `PYTHON`, `compiled_code`, `check_python`: code that travels compiled runs only on
  a node of this client's Python (major.minor);
* `avail_info`: a node's resource report, as dispy's `DispyNodeAvailInfo`.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from dispynb import config as dispy_config
from dispynb.defaults import NODE_PORT
from dispynb.errors import SetupError
from dispynb.netoptions import _check_port
from dispynb.node import DispyNodeAvailInfo
from dispynb.options import ClusterOptions
from dispynb.protocol import serialize
from dispynb.protocol.messages import Welcome

#: This client's Python version, major.minor: what compiled code needs.
PYTHON = "{}.{}".format(*sys.version_info[:2])


def configured_port() -> int:
    """The port of nodes named without one, from `dispynb.config`: a program that
    sets ``dispy.config.DispyPort = P`` has given ``dispy_port=P`` (dispy's keyword
    only sets it), which pairs with nodes started with ``-p P``; else ``NodePort``."""
    if dispy_config.DispyPort != NODE_PORT - 1:
        port = _check_port(dispy_config.DispyPort, "dispy.config.DispyPort")
    else:
        port = _check_port(dispy_config.NodePort, "dispy.config.NodePort")
    assert port is not None
    return port


def compiled_code(opts: ClusterOptions, names: dict[str, Any]) -> str:
    """What of a computation travels as compiled code (cloudpickle by value), as
    words for a message; "" if nothing does (a program, installed functions)."""
    named = [
        ("the computation", opts.computation),
        ("the setup function", opts.setup),
        ("the cleanup function", opts.cleanup),
        *((f"{name} (depends)", obj) for name, obj in names.items()),
    ]
    found = [
        f"{what} {getattr(obj, '__name__', '')}".rstrip()
        if what.startswith("the ")
        else what
        for what, obj in named
        if obj is not None
        and not isinstance(obj, (str, bool))
        and serialize.travels_by_value(obj)
    ]
    return ", ".join(found)


def check_python(welcome: Welcome, peer_ip: str, compiled: str) -> None:
    """Refuse a node whose Python (major.minor) is not this client's when
    ``compiled`` names code that travels compiled: other versions cannot run it
    (dispy sent source text, which they could)."""
    if not compiled or not welcome.python:
        return
    theirs = ".".join(welcome.python.split(".")[:2])
    ours = PYTHON
    if theirs == ours:
        return
    error = SetupError(
        f"node {welcome.name!r} ({peer_ip}) runs Python {welcome.python} and this "
        f"client Python {ours}: {compiled}, defined in this program, travels as "
        f"compiled code, which only Python {ours} runs (dispy sent source text). "
        f"Run the client and the nodes with the same Python version (start "
        f"dispynb-node with a Python {ours}, or run this program with Python {theirs})"
    )
    # What a notebook says in its own words (`dispynb.jupyter.probing`).
    error.python_mismatch = (welcome.name, peer_ip, welcome.python, ours)  # type: ignore[attr-defined]
    raise error


def avail_info(avail: list[float | None]) -> DispyNodeAvailInfo | None:
    """A node's report as dispy's `DispyNodeAvailInfo`; None (not reported, as
    dispy says of a node without psutil) unless all four figures are known, so
    that a program reading ``avail_info.cpu`` never gets anything but a number."""
    if len(avail) != 4:
        return None
    cpu, memory, disk, swap = avail
    if cpu is None or memory is None or disk is None or swap is None:
        return None
    return DispyNodeAvailInfo(cpu, int(memory), int(disk), swap)


def result_cap(opts: ClusterOptions) -> int:
    """Bytes a result may pickle to: ``max_result_size``, within ``max_message_size``
    less room for a message's header. The job's output is not counted: the node
    sends what does not fit in a message in chunks, as a large result's buffers
    (it knows the limit from `ComputationSetup.max_message_size`)."""
    limit = opts.max_message_size
    room = max(limit - (1 << 20), limit // 2)
    cap = opts.max_result_size
    return room if not isinstance(cap, int) else min(cap, room)


def client_name() -> str:
    """This client as a node logs it: its host and its program's name."""
    return f"{socket.gethostname()}:{sys.argv[0].rsplit('/', 1)[-1] or 'python'}"


__all__ = [
    "PYTHON",
    "avail_info",
    "check_python",
    "client_name",
    "compiled_code",
    "configured_port",
    "result_cap",
]
