"""Resident memory of a benchmark process and of everything it started.

The driver process is the client; every process descending from it (node servers,
schedulers, workers, raylets ...) counts as a node or worker. Memory is read from
``/proc/<pid>/status``: ``VmRSS`` (resident now) and ``VmHWM`` (the peak resident size
of the process so far), so no sampling thread competes with the client for the CPU.
After W1 the nodes' PSS and USS are read too (`proportional_size`): workers forked
from one parent share most of their pages, which RSS counts once per process. The
PSS of a group of processes adds up to the memory they take together; the USS of
one process is what ending it would free.
A process that has already exited (a dispy job's forked process, a replaced worker) is
not counted. A PSS that may not be read is `PSS_UNAVAILABLE`, never 0:
``smaps_rollup`` of a process that is not dumpable (dispynb's node server and zygote
turn dumping off, ``PR_SET_DUMPABLE`` 0) opens only with ``CAP_SYS_PTRACE`` (root).
"""

from __future__ import annotations

import os
from typing import Any

import psutil

__all__ = ["MIB", "PSS_UNAVAILABLE", "process_memory", "proportional_size", "snapshot"]

MIB = 1024 * 1024

#: What a snapshot says of a PSS it may not read (``pss_unavailable``).
PSS_UNAVAILABLE = "unavailable (needs root)"


def process_memory(pid: int) -> dict[str, int]:
    """``{"rss": bytes, "hwm": bytes}`` of one process (zeros if it is gone)."""
    values = {"rss": 0, "hwm": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss" if line.startswith("VmRSS") else "hwm"
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values


def _label(proc: psutil.Process) -> str:
    """A short, recognisable name: the program or the ``-m`` module."""
    try:
        cmdline = proc.cmdline()
    except (psutil.Error, OSError):
        return "?"
    if not cmdline:
        return proc.name() if proc.is_running() else "?"
    name = proc.name()
    if name.startswith("dispynb-"):  # a forked process that named itself (zygote...)
        return name
    words = [os.path.basename(cmdline[0])]
    if cmdline[1:2] == ["-c"] and "nodeserver.cli" in cmdline[2]:
        # LocalCluster's node bootstrap (dispynb.local): labelled as before it.
        return f"{words[0]} -m nodeserver"
    for index, word in enumerate(cmdline[1:4], start=1):
        if word == "-m" and index + 1 < len(cmdline):
            words.append(f"-m {cmdline[index + 1]}")
            break
        if word.endswith(".py"):
            words.append(os.path.basename(word))
            break
    return " ".join(words)[:60]


def _rollup(pid: int) -> dict[str, int] | None:
    """The sizes of ``/proc/<pid>/smaps_rollup`` in bytes, from one read (empty if
    the process is gone, or on a system without it; None if this process may not
    read it: see `PSS_UNAVAILABLE`)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            lines = fh.read().splitlines()[1:]  # after the [rollup] line
    except PermissionError:
        return None
    except OSError:
        return {}
    sizes = {}
    for line in lines:
        name, _, rest = line.partition(":")
        words = rest.split()
        if len(words) == 2 and words[1] == "kB":
            sizes[name] = int(words[0]) * 1024
    return sizes


def proportional_size(pid: int) -> tuple[int, int]:
    """``(PSS, USS)`` of one process in bytes (zeros if it is gone). PSS: its private
    pages, plus each page it shares divided by the number of processes mapping it;
    USS: its private pages alone.

    Unlike RSS, the PSS of a node server and of workers forked from one parent adds
    up to the memory they really take together (``/proc/<pid>/smaps_rollup``).

    Raises
    ------
    PermissionError
        If this process may not read it (a process that is not dumpable, read
        without root).
    """
    sizes = _rollup(pid)
    if sizes is None:
        raise PermissionError(
            f"the PSS of process {pid} is {PSS_UNAVAILABLE}: it is not dumpable "
            f"(PR_SET_DUMPABLE 0), so /proc/{pid}/smaps_rollup opens only for root "
            "(CAP_SYS_PTRACE)"
        )
    return sizes.get("Pss", 0), _private(sizes)


def _private(sizes: dict[str, int]) -> int:
    return sum(
        sizes.get(k, 0) for k in ("Private_Clean", "Private_Dirty", "Private_Hugetlb")
    )


def snapshot(root: int | None = None, pss: bool = False) -> dict[str, Any]:
    """Memory of process ``root`` (default: this one) and of all its descendants.

    Returns
    -------
    dict
        ``client``: ``{"rss", "hwm"}`` of ``root``; ``nodes``: one entry per live
        descendant with ``pid``, ``label``, ``rss``, ``hwm`` (and ``pss``, ``uss``
        with ``pss=True``); ``nodes_rss``, ``nodes_hwm`` (and ``nodes_pss``,
        ``nodes_uss``): their sums (bytes). A PSS and USS this process may not read
        are None, and so are their sums, with ``pss_unavailable``:
        `PSS_UNAVAILABLE`.
    """
    pid = os.getpid() if root is None else root
    nodes = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        memory = process_memory(child.pid)
        if memory["rss"] == 0:  # gone, or a zombie
            continue
        entry: dict[str, Any] = {"pid": child.pid, "label": _label(child), **memory}
        if pss:
            # RSS, PSS and USS from one read: a process still growing (starting up)
            # would otherwise show a PSS read later above an RSS read earlier.
            sizes = _rollup(child.pid)
            if sizes is None:
                entry["pss"] = entry["uss"] = None
            else:
                if sizes:
                    entry["rss"] = sizes.get("Rss", 0)
                entry["pss"], entry["uss"] = sizes.get("Pss", 0), _private(sizes)
        nodes.append(entry)
    result: dict[str, Any] = {
        "client": process_memory(pid),
        "nodes": nodes,
        "nodes_rss": sum(n["rss"] for n in nodes),
        "nodes_hwm": sum(n["hwm"] for n in nodes),
    }
    if pss:
        result.update(_pss_sums(nodes))
    return result


def _pss_sums(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """``nodes_pss`` and ``nodes_uss``; None with ``pss_unavailable`` if a process's
    could not be read (a sum without it would pass for the whole)."""
    if any(n["pss"] is None for n in nodes):
        return {
            "nodes_pss": None,
            "nodes_uss": None,
            "pss_unavailable": PSS_UNAVAILABLE,
        }
    return {
        "nodes_pss": sum(n["pss"] for n in nodes),
        "nodes_uss": sum(n["uss"] for n in nodes),
    }
