"""A real SLURM cluster on namespace hosts: Debian's munged, slurmctld and slurmd.

`slurm_cluster` writes a ``slurm.conf`` and a fresh munge key in a directory of its
own, then starts (in the foreground, as children of the test, never through systemd):

- ``munged`` (its socket in that directory; munge talks over a Unix socket only),
- ``slurmctld`` on the controller host (the client's host: a "login node"),
- one ``slurmd`` per node host, each in its own UTS namespace whose host name is its
  SLURM ``NodeName`` (``n1``, ``n2``...), listening on that host's address.

Every daemon runs inside a namespace host, so nothing listens in the machine's own
network namespace; ``sbatch``, ``squeue``, ``scancel`` find the cluster through
``SLURM_CONF`` (`SlurmSetup.env`). Jobs run as root (the test's user), with
``proctrack/linuxproc`` and ``task/none``: no cgroup set-up is needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.multihost.netns import Host, Network

MUNGED = shutil.which("munged") or "/usr/sbin/munged"
SLURMCTLD = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd") or "/usr/sbin/slurmd"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"

#: Seconds the daemons get to start, and the nodes to become idle.
START_WAIT = 60.0
#: CPUs and memory (MB) each slurmd declares (``SlurmdParameters=config_overrides``:
#: the declared values are used whatever the machine has).
NODE_CPUS = 2
NODE_MEMORY = 1000
#: Seconds between SLURM's SIGTERM and SIGKILL at walltime or scancel (default 30).
KILL_WAIT = 5


def unavailable_reason() -> str | None:
    """Why a real SLURM cannot run here, or None."""
    missing = [p for p in (MUNGED, SLURMCTLD, SLURMD) if not Path(p).exists()]
    if missing or shutil.which("sbatch") is None:
        return (
            "SLURM tests need Debian's slurmctld, slurmd, slurm-client and munge "
            "(./dev test installs them)"
        )
    return None


@dataclass
class SlurmSetup:
    """A running SLURM cluster: its directory, configuration and daemons."""

    directory: Path
    config: Path
    #: SLURM ``NodeName`` of each node host, in order.
    node_names: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What SLURM's commands need in their environment."""
        return {"SLURM_CONF": str(self.config)}

    def log(self, daemon: str) -> str:
        """The log of ``daemon`` (``'slurmctld'``, ``'slurmd-n1'``, ``'munged'``)."""
        path = self.directory / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """Every daemon's log, for a failure message."""
        return "\n".join(
            f"--- {name} ---\n{self.log(name)[-3000:]}" for name in self.procs
        )


def _config(
    directory: Path, controller: Host, node_hosts: Sequence[Host], names: list[str]
) -> str:
    nodes = "".join(
        f"NodeName={name} NodeAddr={host.ip} NodeHostname={name} "
        f"CPUs={NODE_CPUS} RealMemory={NODE_MEMORY} State=UNKNOWN\n"
        for name, host in zip(names, node_hosts, strict=True)
    )
    return (
        "ClusterName=dispynbtest\n"
        f"SlurmctldHost=ctl({controller.ip})\n"
        "SlurmUser=root\n"
        "SlurmdUser=root\n"
        "SlurmctldPort=6817\n"
        "SlurmdPort=6818\n"
        "AuthType=auth/munge\n"
        "CredType=cred/munge\n"
        f"AuthInfo=socket={directory}/munge/munge.sock\n"
        f"StateSaveLocation={directory}/ctld\n"
        f"SlurmdSpoolDir={directory}/spool/%n\n"
        f"SlurmctldPidFile={directory}/slurmctld.pid\n"
        f"SlurmdPidFile={directory}/slurmd-%n.pid\n"
        "ProctrackType=proctrack/linuxproc\n"
        "TaskPlugin=task/none\n"
        "JobAcctGatherType=jobacct_gather/none\n"
        "AccountingStorageType=accounting_storage/none\n"
        "JobCompType=jobcomp/none\n"
        "SchedulerType=sched/backfill\n"
        "SelectType=select/cons_tres\n"
        "SelectTypeParameters=CR_CPU_Memory\n"
        "SlurmdParameters=config_overrides\n"
        "ReturnToService=2\n"
        "MpiDefault=none\n"
        "MailProg=/bin/true\n"
        f"KillWait={KILL_WAIT}\n"
        "InactiveLimit=0\n"
        "MinJobAge=600\n"
        "SlurmctldTimeout=30\n"
        "SlurmdTimeout=60\n"
        "SlurmctldDebug=info\n"
        "SlurmdDebug=info\n"
        f"{nodes}"
        f"PartitionName=debug Nodes={','.join(names)} Default=YES "
        "MaxTime=INFINITE State=UP\n"
    )


def _wait_for(predicate: object, what: str, setup: SlurmSetup) -> None:
    deadline = time.monotonic() + START_WAIT
    while not predicate():  # type: ignore[operator]
        for name, proc in setup.procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                    f"{setup.logs()}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {START_WAIT} s\n{setup.logs()}")
        time.sleep(0.1)


def slurm_command(
    net: Network, host: Host, setup: SlurmSetup, *argv: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a SLURM command (``sinfo``...) on ``host``, as a user would there."""
    return subprocess.run(
        host.command(argv),
        env={**os.environ, **setup.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def slurm_cluster(
    net: Network, controller: Host, node_hosts: Sequence[Host]
) -> Iterator[SlurmSetup]:
    """munged, slurmctld on ``controller``, slurmd on each of ``node_hosts``; all
    stopped (and their directory removed) afterwards."""
    # munged insists that its socket's directories be reachable by everybody, so
    # this directory is not under pytest's 0700 tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="dispynb-slurm-"))
    directory.chmod(0o755)
    names = [f"n{host.index}" for host in node_hosts]
    config = directory / "slurm.conf"
    setup = SlurmSetup(directory, config, names)
    try:
        (directory / "munge").mkdir(mode=0o755)
        (directory / "ctld").mkdir(mode=0o700)
        for name in names:
            (directory / "spool" / name).mkdir(parents=True, mode=0o755)
        key = directory / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        config.write_text(_config(directory, controller, node_hosts, names))
        _start(net, controller, node_hosts, setup)
        yield setup
    finally:
        _stop(setup)
        shutil.rmtree(directory, ignore_errors=True)


def _start(
    net: Network, controller: Host, node_hosts: Sequence[Host], setup: SlurmSetup
) -> None:
    d = setup.directory
    socket = d / "munge" / "munge.sock"
    setup.procs["munged"] = _popen(
        net,
        controller,
        setup,
        "munged",
        [
            MUNGED, "--foreground", f"--socket={socket}", f"--key-file={d}/munge.key",
            f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed",
            "--num-threads=4",
        ],
    )  # fmt: skip
    _wait_for(socket.exists, "munged's socket", setup)
    setup.procs["slurmctld"] = _popen(
        net,
        controller,
        setup,
        "slurmctld",
        [SLURMCTLD, "-D", "-i", "-f", str(setup.config)],
        hostname="ctl",
    )
    for name, host in zip(setup.node_names, node_hosts, strict=True):
        setup.procs[f"slurmd-{name}"] = _popen(
            net,
            host,
            setup,
            f"slurmd-{name}",
            [SLURMD, "-D", "-f", str(setup.config)],
            hostname=name,
        )

    def idle() -> bool:
        out = slurm_command(
            net, controller, setup, "sinfo", "--noheader", "-N", "-o", "%N %t"
        ).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(name) == "idle" for name in setup.node_names)

    _wait_for(idle, "every slurmd idle in sinfo", setup)


def _popen(
    net: Network,
    host: Host,
    setup: SlurmSetup,
    name: str,
    argv: Sequence[str],
    hostname: str | None = None,
) -> subprocess.Popen[bytes]:
    if hostname is not None:  # a host name of its own, as on a machine of its own
        argv = [
            UNSHARE,
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            hostname,
            *argv,
        ]
    # nsenter --net, not `ip netns exec`: that one mounts a sysfs of its own, without
    # the cgroup file systems slurmd's cgroup plugin insists on finding.
    argv = [NSENTER, f"--net=/run/netns/{host.netns}", "--", *argv]
    with (setup.directory / f"{name}.log").open("wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **setup.env},
            start_new_session=True,
        )


def _stop(setup: SlurmSetup) -> None:
    """SIGTERM the daemons (slurmd first: it ends its jobs' steps), then SIGKILL."""
    order = sorted(setup.procs, key=lambda n: (n == "munged", n == "slurmctld"))
    for name in order:
        proc = setup.procs[name]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
