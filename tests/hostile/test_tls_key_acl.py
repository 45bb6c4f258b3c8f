"""A TLS private key another user may read through its POSIX access ACL
(``setfacl -m u:nobody:r``): its mode shows only the ACL's mask as group bits
(0640, as a key an ssl-cert group reads), and the key was accepted; whoever reads
it can pass for the node."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dispynb.errors import ConfigurationError
from dispynb.transport.tls import client_context, server_context
from tests.hostile.tools import give_by_acl
from tests.transport.certs import make_cert

NOBODY = 65534


@pytest.mark.attack(
    id="tls-key-acl",
    title="A node's or client's TLS private key is mode 0600 plus an access ACL "
    "letting user nobody read it (the mode shows 0640)",
    goal="refused, naming the ACL and setfacl -b; a key its own group reads "
    "(ssl-cert, 0640 without ACL) still accepted (was: accepted, nobody read it)",
)
def test_a_private_key_an_acl_lets_others_read_is_refused(measure):
    # In /tmp (pytest's directories are root's, 0700): nobody reaches the key.
    directory = Path(tempfile.mkdtemp(prefix="dispynb-key-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        _check_key_with_acl(directory, measure)
    finally:
        shutil.rmtree(directory)


def _check_key_with_acl(directory: Path, measure) -> None:
    certfile, keyfile = make_cert(directory, "node")
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
