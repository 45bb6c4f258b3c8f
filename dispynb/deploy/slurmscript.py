"""The batch script of a `dispynb.deploy.slurm.SlurmNodes` node: its ``#SBATCH``
directives, checked (`sbatch_directives`), and the script that starts the node
server (`batch_script`). The script holds no secret: it comes in the job's
environment (`SECRET_VARIABLE`) and goes to the node's standard input, or the node
reads a ``secret_file`` (see `dispynb.deploy.slurm`).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

from dispynb.deploy.base import NODE_MODULE
from dispynb.errors import ConfigurationError

#: The environment variable that carries the secret to the batch script.
SECRET_VARIABLE = "DISPYNB_LAUNCH_SECRET"

_SIZE = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)
_TIME = re.compile(r"[0-9]+(?:-[0-9]+)?(?::[0-9]+){0,2}|INFINITE|UNLIMITED")
_WORD = re.compile(r"[^\s'\"\\;&|<>`$]+")


def sbatch_directives(
    cpus: int | None,
    memory: str | int | None,
    walltime: str | int | None,
    partition: str | None,
    account: str | None,
    log_directory: str | None,
    extra: Sequence[str],
) -> list[str]:
    """The ``sbatch`` options of a node's batch job, one per ``#SBATCH`` line,
    checked: a value that is not what SLURM takes is a `ConfigurationError`."""
    out = ["--nodes=1", "--ntasks=1"]
    if cpus is not None:
        out.append(f"--cpus-per-task={int(cpus)}")
    if memory is not None:
        text = f"{memory}" if isinstance(memory, str) else f"{int(memory)}M"
        if not _SIZE.fullmatch(text):
            raise ConfigurationError(
                f"memory={memory!r}: give SLURM's --mem size, e.g. '4G' or '500M'"
            )
        out.append(f"--mem={text}")
    if walltime is not None:
        text = str(walltime)
        if not _TIME.fullmatch(text):
            raise ConfigurationError(
                f"walltime={walltime!r}: give SLURM's --time, e.g. '30' "
                "(minutes), '1:30:00' or '2-0' (days-hours)"
            )
        out.append(f"--time={text}")
    for option, value in (("partition", partition), ("account", account)):
        if value is not None:
            if not _WORD.fullmatch(value):
                raise ConfigurationError(f"{option}={value!r} is not a SLURM name")
            out.append(f"--{option}={value}")
    if log_directory is not None:
        path = os.path.abspath(os.path.expanduser(log_directory))
        if any(c in path for c in "\n\r\0"):
            raise ConfigurationError(f"log_directory={log_directory!r}")
        out.append(f"--output={path}/dispynb-node-%j.out")
    for directive in extra:
        text = directive.removeprefix("#SBATCH").strip()
        if not text.startswith("-") or any(c in text for c in "\n\r\0"):
            raise ConfigurationError(
                f"not an sbatch option for an #SBATCH line: {directive!r} "
                "(give one option per item, such as '--qos=short')"
            )
        out.append(text)
    return out


def batch_script(
    name: str,
    register_to: str,
    *,
    python: str,
    directives: Sequence[str],
    cpus: int | None,
    exit_without_client: float | None,
    secret_file: str | None,
    node_args: Sequence[str],
) -> str:
    """The batch script of a node named ``name`` that registers with
    ``register_to`` (it holds no secret)."""
    shown_cpus = (
        str(cpus)
        if cpus is not None
        else '"${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-0}}"'
    )
    argv = [
        python, *NODE_MODULE,
        "--register", register_to, "--name", name,
        "--port", "0", "--no-discovery",
    ]  # fmt: skip
    if exit_without_client is not None:
        argv += ["--exit-without-client", f"{exit_without_client:g}"]
    secret = ["--secret-file", secret_file] if secret_file else []
    command = f"{shlex.join([*argv, *secret])} --cpus {shown_cpus}"
    if node_args:
        command += " " + shlex.join(node_args)
    lines = ["#!/bin/sh", f"#SBATCH --job-name={name}"]
    lines += [f"#SBATCH {directive}" for directive in directives]
    lines.append("unset DISPYNB_SECRET DISPYNB_SECRET_FILE")
    if secret_file:
        lines += [f"unset {SECRET_VARIABLE}", f"exec {command}"]
    else:
        lines += [
            "# The secret: from the job's environment to the node's standard",
            "# input (printf is built in: no command line shows it), and out of",
            "# the node's environment.",
            f"printf '%s\\n' \"${SECRET_VARIABLE}\" | {{",
            f"    unset {SECRET_VARIABLE}",
            f"    exec {command} --secret-stdin",
            "}",
        ]
    return "\n".join(lines) + "\n"
