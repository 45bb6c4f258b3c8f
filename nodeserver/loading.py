"""Loading a computation in its process (`nodeserver.compute`): receive `Load`,
enter the computation's directory, unpickle its bundle, give its functions dispy's
names and run its ``setup``. Any failure is a `LoadFailure`, which the process sends
to the node server as `LoadFailed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import traceback
from collections.abc import Callable
from typing import Any

from dispynb.jobenv import implicit_modules, inject_names, node_logger, setup_failure
from dispynb.protocol import serialize
from dispynb.protocol.records import ComputationBundle
from nodeserver.channel import MessageSocket
from nodeserver.containment import move_to_cgroup
from nodeserver.ipc import Load
from nodeserver.jobapi import (
    CONTEXT,
    dispy_provisional_result,
    dispy_send_file,
    dispynode_shutdown,
)
from nodeserver.program import ProgramRunner, install_program

# The computation process's logger (run as a module, its __name__ is "__main__").
logger = logging.getLogger("nodeserver.compute")


class LoadFailure(Exception):
    """Loading or setting up the computation failed (sent as `LoadFailed`)."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.traceback = traceback


def receive_load(control: MessageSocket) -> tuple[Load, list[memoryview]]:
    """Receive `Load`, the node's first message (and its only one until `Loaded`).

    Raises `LoadFailure` (to be sent as `LoadFailed`), or `ConnectionClosedError`.
    """
    message, buffers = control.recv()
    if not isinstance(message, Load):
        raise LoadFailure(f"expected a 'load' message first, got {message.op!r}")
    if message.workers < 1:
        raise LoadFailure(
            f"a computation needs at least 1 worker, not {message.workers}"
        )
    return message, buffers


def load_computation(
    message: Load, buffers: list[memoryview]
) -> tuple[Load, ComputationBundle]:
    """Enter the job directory, unpickle the bundle and run setup; return the
    `Load` (as it stands after setup) and the bundle, checked.

    Raises `LoadFailure` (to be sent as `LoadFailed`).
    """
    try:
        os.chdir(message.job_path)
    except OSError as exc:
        raise LoadFailure(f"cannot enter the computation directory: {exc}") from exc
    try:
        bundle: ComputationBundle = serialize.loads(buffers)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise LoadFailure(
            f"cannot load computation {message.name!r} on the node: "
            f"{type(cause).__name__}: {cause} (is a module it needs missing on the "
            "node? install it there, or send it with depends)",
            # The error without the frames of the unpickler (dispynb's, cloudpickle's).
            "".join(traceback.format_exception_only(cause)),
        ) from exc
    del buffers
    CONTEXT.job_path, CONTEXT.max_file_size = message.job_path, message.max_file_size
    CONTEXT.max_output, CONTEXT.max_result = message.max_output, message.max_result
    CONTEXT.node_result_room = message.node_result_room
    CONTEXT.node_max_message = message.node_max_message
    program = bundle.get("program")
    if program is not None:
        try:
            path = install_program(program["name"], program["data"], message.job_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoadFailure(f"cannot install the program: {exc}") from exc
        bundle["func"] = ProgramRunner(path, dispy_names(message, modules=False))
    _check_bundle(bundle)
    functions = [bundle["func"], bundle.get("setup"), bundle.get("cleanup")]
    # depends' functions and classes, by name; then dispy's names (never the user's).
    inject_names(functions, dict(bundle.get("names") or {}))
    CONTEXT.names = dispy_names(message)
    inject_names(functions, CONTEXT.names)
    setup = bundle.get("setup")
    if setup is not None:
        if message.first_cgroup is not None and message.pids_root:
            # What setup starts must not end up under the first worker's limit: the
            # workers join cgroups of their own instead.
            leave_cgroup(message.first_cgroup, message.pids_root, remove=True)
            message = dataclasses.replace(message, first_cgroup=None)
        run_setup(setup, tuple(bundle.get("setup_args") or ()))
    return message, bundle


def leave_cgroup(path: str, home: str, *, remove: bool) -> bool:
    """Move this process from cgroup ``path`` back to ``home`` (its node server's);
    ``remove``: then remove ``path``. False (logged) if the move failed."""
    try:
        move_to_cgroup(home, os.getpid())
    except OSError as exc:
        logger.warning("cannot leave cgroup %s: %s", path, exc)
        return False
    if remove:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    return True


def _check_bundle(bundle: Any) -> None:
    if not isinstance(bundle, dict) or not callable(bundle.get("func")):
        raise LoadFailure("the computation bundle has no callable 'func'")
    setup = bundle.get("setup")
    if setup is not None and not callable(setup):
        raise LoadFailure(f"setup must be callable, not {type(setup).__name__}")
    if not isinstance(bundle.get("setup_args") or (), tuple | list):
        raise LoadFailure("setup_args must be a tuple")


def dispy_names(load: Load, modules: bool = True) -> dict[str, Any]:
    """The names dispy computations expect in their globals (``modules``: and the
    standard modules dispy exposed)."""
    names: dict[str, Any] = {
        "dispy_node_name": load.node_name,
        "dispy_node_ip_addr": load.node_address,
        "dispy_job_path": load.job_path,
        "dispy_provisional_result": dispy_provisional_result,
        "dispy_send_file": dispy_send_file,
        "dispynode_logger": node_logger(load.node_debug),
        "dispynode_shutdown": dispynode_shutdown,
    }
    if modules:
        names.update(implicit_modules())
    return names


#: Characters of a setup's exception said in its error's one line (its traceback has
#: more, up to ``max_output``).
_SAID = 1000


def run_setup(setup: Callable[..., Any], setup_args: tuple[Any, ...]) -> None:
    """Call setup; raise `LoadFailure` unless it returns None, 0, 1 or 2."""
    try:
        result = setup(*setup_args)
    except BaseException as exc:  # user code: any exit of setup is a failed setup
        # From setup's own frame on: the person's code, not this function.
        frames = exc.__traceback__.tb_next if exc.__traceback__ else None
        shown = traceback.format_exception(type(exc), exc, frames)
        said = str(exc)
        if len(said) > _SAID:  # the error's one line (logged, shown); all of it below
            said = f"{said[:_SAID]}... ({len(said) - _SAID} more characters)"
        raise LoadFailure(
            f"setup raised {type(exc).__name__}: {said}",
            CONTEXT.bounded("".join(shown)),
        ) from exc
    failure = setup_failure(result)
    if failure is not None:
        raise LoadFailure(failure)
