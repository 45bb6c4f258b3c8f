"""A TLS private key another user may read through its POSIX access ACL
(``setfacl -m u:nobody:r``): its mode shows only the ACL's mask as group bits
(0640, as a key an ssl-cert group reads), and the key was accepted; whoever reads
it can pass for the node."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.errors import ConfigurationError
from dispynb.transport.tls import client_context, server_context
from tests.hostile.tools import give_by_acl
from tests.transport.certs import make_cert

NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory in /tmp that nobody reaches (pytest's are root's, 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="dispynb-key-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.mark.attack(
    id="tls-key-acl",
    title="A node's or client's TLS private key is mode 0600 plus an access ACL "
    "letting user nobody read it (the mode shows 0640)",
    goal="refused, naming the ACL and setfacl -b; a key its own group reads "
    "(ssl-cert, 0640 without ACL) still accepted (was: accepted, nobody read it)",
)
def test_a_private_key_an_acl_lets_others_read_is_refused(open_dir: Path, measure):
    certfile, keyfile = make_cert(open_dir, "node")
    os.chmod(keyfile, 0o600)
    give_by_acl(Path(keyfile), NOBODY, 4)
    mode = os.stat(keyfile).st_mode & 0o777
    read = ""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        read = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "head", "-c", "27", keyfile],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
    for make in (lambda: server_context(certfile, keyfile),
                 lambda: client_context(certfile, keyfile)):  # fmt: skip
        with pytest.raises(ConfigurationError, match="ACL") as refused:
            make()
        assert "setfacl -b" in str(refused.value)
    said = str(refused.value).replace(keyfile, "<key>")
    measure(f"mode {mode:04o}; nobody read {read!r}; refused: {said}")
    os.removexattr(keyfile, "system.posix_acl_access")
    os.chmod(keyfile, 0o640)  # a group's (ssl-cert) may read it: deliberate
    server_context(certfile, keyfile)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_a_key_its_user_cannot_read_is_a_configuration_error(open_dir: Path):
    """The ACL check looks at a key it may not read (O_PATH): the loader says what
    is wrong, as a ConfigurationError (was, with the check: a bare
    PermissionError)."""
    certfile, keyfile = make_cert(open_dir, "node")
    os.chown(certfile, NOBODY, -1)
    os.chown(keyfile, NOBODY, -1)
    os.chmod(keyfile, 0o000)  # its owner, nobody, cannot read it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                server_context(certfile, keyfile)
                said = "accepted"
            except Exception as exc:
                said = f"{type(exc).__name__}: {exc}"
            os.write(write, said.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    assert said.startswith("ConfigurationError: cannot load certificate"), said
