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
not counted.
"""

from __future__ import annotations

import os
from typing import Any

import psutil

__all__ = ["MIB", "process_memory", "proportional_size", "snapshot"]

MIB = 1024 * 1024


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
    for index, word in enumerate(cmdline[1:4], start=1):
        if word == "-m" and index + 1 < len(cmdline):
            words.append(f"-m {cmdline[index + 1]}")
            break
        if word.endswith(".py"):
            words.append(os.path.basename(word))
            break
    return " ".join(words)[:60]


def proportional_size(pid: int) -> tuple[int, int]:
    """``(PSS, USS)`` of one process in bytes (zeros if it is gone). PSS: its private
    pages, plus each page it shares divided by the number of processes mapping it;
    USS: its private pages alone.

    Unlike RSS, the PSS of a node server and of workers forked from one parent adds
    up to the memory they really take together (``/proc/<pid>/smaps_rollup``).
    """
    try:
        info = psutil.Process(pid).memory_full_info()
        return int(info.pss), int(info.uss)
    except (psutil.Error, OSError, AttributeError):  # gone, or no PSS (not Linux)
        return 0, 0


def snapshot(root: int | None = None, pss: bool = False) -> dict[str, Any]:
    """Memory of process ``root`` (default: this one) and of all its descendants.

    Returns
    -------
    dict
        ``client``: ``{"rss", "hwm"}`` of ``root``; ``nodes``: one entry per live
        descendant with ``pid``, ``label``, ``rss``, ``hwm`` (and ``pss``, ``uss``
        with ``pss=True``); ``nodes_rss``, ``nodes_hwm`` (and ``nodes_pss``,
        ``nodes_uss``): their sums (bytes).
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
            entry["pss"], entry["uss"] = proportional_size(child.pid)
        nodes.append(entry)
    return {
        "client": process_memory(pid),
        "nodes": nodes,
        "nodes_rss": sum(n["rss"] for n in nodes),
        "nodes_hwm": sum(n["hwm"] for n in nodes),
        **(
            {
                "nodes_pss": sum(n["pss"] for n in nodes),
                "nodes_uss": sum(n["uss"] for n in nodes),
            }
            if pss
            else {}
        ),
    }
