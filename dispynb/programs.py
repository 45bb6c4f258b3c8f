"""Program computations: a job runs an executable (or a .py file) with its arguments.

dispy's contract: the job's arguments become command-line arguments, the result is
the exit code, ``stdout``/``stderr`` are the program's output as bytes, and the node's
values reach the program as environment variables (``dispy_node_name``, ...), with the
computation's directory first on ``PATH``.

Used where jobs run: by dispynb's node servers (``nodeserver.program``) and by the
Dask engine's job runners (`dispynb.backends._daskhost`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dispynb.errors import ConfigurationError
from dispynb.jobenv import OUTPUT_OPTION
from dispynb.protocol.records import ProgramFile


@dataclass(slots=True)
class ProgramOutput:
    """What one run of a program produced; the job runner unpacks it."""

    returncode: int
    stdout: bytes
    stderr: bytes


class ProgramRunner:
    """Callable computation that runs ``path`` once per job.

    Parameters
    ----------
    path:
        The program, in the computation's directory.
    names:
        Values given to the program as environment variables.
    max_output:
        Bytes of each stream a job keeps (None: all), asked at each job.
    own_session:
        Start the program in a session of its own (killed as a whole when the job
        is cancelled); False: in the caller's process group, which the caller kills.
    """

    def __init__(
        self,
        path: str,
        names: dict[str, Any],
        max_output: Callable[[], int | None] = lambda: None,
        *,
        own_session: bool = True,
    ) -> None:
        self.path = path
        self._max_output = max_output
        self._own_session = own_session
        self.__name__ = os.path.basename(path)
        self._prefix = [sys.executable, path] if path.endswith(".py") else [path]
        env = dict(os.environ)
        env.update({k: str(v) for k, v in names.items() if isinstance(v, str | int)})
        env["PATH"] = os.pathsep.join(
            p for p in (os.path.dirname(path), env.get("PATH", "")) if p
        )
        self._env = env

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramOutput:
        """Run the program with ``args`` as its arguments (keywords are ignored)."""
        process = subprocess.Popen(
            [*self._prefix, *(str(arg) for arg in args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self._env,
            start_new_session=self._own_session,  # killed as a whole
        )
        try:
            stdout, stderr = read_bounded(process, self._max_output())
            process.wait()
        except BaseException:
            # Cancelled (KeyboardInterrupt): stop the program and all it started.
            with contextlib.suppress(ProcessLookupError):
                if self._own_session:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            process.wait()
            raise
        return ProgramOutput(process.returncode, stdout, stderr)


def read_bounded(
    process: subprocess.Popen[bytes], limit: int | None
) -> tuple[bytes, bytes]:
    """Read the program's stdout and stderr to their end, keeping ``limit`` bytes of
    each (None: all); a last line says how much of a stream was dropped."""
    assert process.stdout is not None and process.stderr is not None
    streams = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr"}
    kept: dict[str, bytearray] = {name: bytearray() for name in streams.values()}
    dropped = dict.fromkeys(streams.values(), 0)
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    continue
                name = streams[key.fd]
                buffer = kept[name]
                room = len(data) if limit is None else max(limit - len(buffer), 0)
                buffer += data[:room]
                dropped[name] += len(data) - min(room, len(data))
    process.stdout.close()
    process.stderr.close()
    for name, count in dropped.items():
        if count:
            if kept[name] and not kept[name].endswith(b"\n"):
                kept[name] += b"\n"
            kept[name] += (
                f"[dispynb: {count} more bytes of {name} dropped: a job keeps "
                f"{limit} ({OUTPUT_OPTION})]\n"
            ).encode()
    return bytes(kept["stdout"]), bytes(kept["stderr"])


def read_program(path: str) -> ProgramFile:
    """The program file a client ships, for a program computation."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read program {path!r}: {exc}") from exc
    return {"name": os.path.basename(path), "data": data}


def install_program(name: str, data: bytes, directory: str) -> str:
    """Write the program into ``directory`` (executable); return its path."""
    base = os.path.basename(name)
    if not base or base in (".", "..") or "\0" in base:
        raise ValueError(f"bad program name {name!r}")
    path = os.path.join(directory, base)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o755)
    return path
