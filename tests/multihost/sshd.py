"""Real OpenSSH servers in namespace hosts, with throwaway keys (for SSH launchers).

Each `SSHServer` is Debian's ``sshd`` run in the foreground inside one namespace host,
listening only on that host's address, with a host key, an authorized user key and a
client configuration (``ssh -F``) made afresh in a temporary directory: nothing of the
machine's own SSH setup is read or changed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.multihost.netns import Host, Network

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def unavailable_reason() -> str | None:
    """Why real sshd servers cannot run here, or None."""
    if not Path(SSHD).exists() or shutil.which("ssh") is None:
        return "SSH tests need Debian's openssh-server and openssh-client (./dev test)"
    return None


def _keygen(path: Path) -> Path:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


@dataclass
class SSHSetup:
    """Keys and the client configuration (``ssh -F config``) for the servers."""

    directory: Path
    config: Path
    procs: list[subprocess.Popen[bytes]]


@contextmanager
def sshd_servers(
    net: Network, hosts: Sequence[Host], directory: Path
) -> Iterator[SSHSetup]:
    """Start sshd on ``hosts`` (port 22 of each host's address); stop them after."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    host_key = _keygen(directory / "host_key")
    user_key = _keygen(directory / "user_key")
    authorized = directory / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    authorized.chmod(0o600)
    host_pub = Path(f"{host_key}.pub").read_text().split()
    known = directory / "known_hosts"
    known.write_text("".join(f"{h.ip} {host_pub[0]} {host_pub[1]}\n" for h in hosts))
    config = directory / "ssh_config"
    config.write_text(
        "Host *\n"
        "  User root\n"
        f"  IdentityFile {user_key}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  ConnectTimeout 10\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for host in hosts:
            server_config = directory / f"sshd_config_{host.index}"
            server_config.write_text(
                f"ListenAddress {host.ip}\n"
                "Port 22\n"
                f"HostKey {host_key}\n"
                f"AuthorizedKeysFile {authorized}\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "PidFile none\n"
                "LogLevel VERBOSE\n"
            )
            log = directory / f"sshd_{host.index}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(
                    net.popen(
                        host,
                        [SSHD, "-D", "-e", "-f", str(server_config)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 20
        for proc, log in zip(procs, logs, strict=True):
            while b"Server listening" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sshd did not start:\n{log.read_text()}")
                time.sleep(0.05)
        yield SSHSetup(directory, config, procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
