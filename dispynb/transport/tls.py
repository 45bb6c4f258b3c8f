"""TLS contexts for node servers and clients (TLS 1.2 or newer)."""

from __future__ import annotations

import os
import ssl
import stat
import weakref
from dataclasses import dataclass

from dispynb.errors import ConfigurationError, DispynbError, TransportError
from dispynb.secret import foreign_owner, has_access_acl

#: The certificate file of each client context that has one, for error messages
#: (an SSLContext does not say which certificate it holds).
_CLIENT_CERTS: weakref.WeakKeyDictionary[ssl.SSLContext, str] = (
    weakref.WeakKeyDictionary()
)

#: Alerts (as OpenSSL names them) a node sends when it refuses a client's
#: certificate, and those when the client gave none.
_REFUSED_CERT_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")
_MISSING_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE")


@dataclass(frozen=True)
class TlsOptions:
    """How a program that connects names its TLS settings, so that the fix its TLS
    errors suggest is one its user can give: a Python client's keywords
    (`CLIENT_TLS`), ``dispynb-scheduler``'s ``--node_*`` options towards its nodes,
    ``dispynb-node --check``'s own options."""

    cafile: str = "cafile="
    certfile: str = "certfile="
    keyfile: str = "keyfile="
    #: Whom the fix is for, before an option (``give the client cafile=``); empty
    #: for a program's own command-line options.
    who: str = "the client "
    #: How to connect to a ``dispynb-scheduler`` that uses TLS, if not with
    #: ``cafile`` (its ``--check`` turns TLS on with the scheduler's own option).
    scheduler_fix: str = ""

    def turn_on(self, role: str) -> str:
        """How to connect to a ``role`` (node) that uses TLS."""
        return (
            f"give {self.who}{self.cafile} (the CA that signed the {role}'s "
            f"certificate), and {self.certfile} and {self.keyfile} if the {role} "
            "checks clients' certificates (--cafile)"
        )

    def turn_on_scheduler(self) -> str:
        """How to connect to a ``dispynb-scheduler`` that uses TLS."""
        return self.scheduler_fix or (
            f"give {self.who}{self.cafile} (the CA that signed the scheduler's "
            "certificate)"
        )

    def turn_off(self) -> str:
        """How to connect to a server that does not use TLS."""
        names = [name for name in (self.cafile, self.certfile, self.keyfile) if name]
        listed = ", ".join(names[:-1]) + " and " if len(names) > 1 else ""
        return f"connect without {listed}{names[-1]}"

    def client_certificate(self) -> str:
        """Which options give this client a certificate."""
        return f"{self.who}{self.certfile} and {self.keyfile}"


#: A Python client's (`JobCluster`'s keyword arguments).
CLIENT_TLS = TlsOptions()


def _check_file(path: str, what: str, guard: str = "") -> None:
    """Refuse a missing file; with ``guard``, one another user could use against us:
    "key" (a private key: others may not read or write it), "trust" (a cafile,
    which says whom to trust: others may not write it); either of another user's
    (but root's), whatever its mode."""
    if not os.path.isfile(path):
        raise ConfigurationError(f"{what} {path!r} does not exist or is not a file")
    if not guard or os.name != "posix":
        return
    # O_PATH: a file this user may not read is left to its loader to report.
    fd = os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        # A group's read (ssl-cert's) is deliberate; an access ACL's users are not
        # that group (the group bits are then their mask).
        acl = bool(info.st_mode & 0o060) and has_access_acl(fd)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(info.st_mode)
    if guard == "key" and info.st_mode & 0o006:
        raise ConfigurationError(
            f"{what} {path!r} holds a private key other users may read or write "
            f"(mode {mode:04o}): run chmod o-rwx {path}"
        )
    if guard == "key" and acl:
        raise ConfigurationError(
            f"{what} {path!r} holds a private key the users its ACL names may read "
            f"(mode {mode:04o} and an access ACL): run setfacl -b {path} (a group "
            "that is to read it, such as ssl-cert, can own it: chgrp)"
        )
    if guard == "trust" and info.st_mode & 0o022:
        raise ConfigurationError(
            f"{what} {path!r} says whose certificates are trusted, and other users "
            f"may write it (mode {stat.S_IMODE(info.st_mode):04o}): run chmod go-w "
            f"{path}"
        )
    foreign = foreign_owner(info)
    if foreign:
        raise ConfigurationError(
            f"{what} {path!r} belongs to {foreign}, not to this user or root: its "
            "owner could change it; give a file of your own"
        )


def _key_guard(certfile: str, keyfile: str | None) -> str:
    """`_check_file`'s guard for ``certfile``: "key" if it holds the private key
    (no ``keyfile`` given, and a key in it), else none."""
    if keyfile:
        return ""
    try:
        with open(certfile, "rb") as handle:
            return "key" if b"PRIVATE KEY" in handle.read(1 << 20) else ""
    except OSError:
        return ""  # `_check_file` says what is wrong with it


def _holds(path: str) -> tuple[bool, bool]:
    """Whether the PEM file ``path`` holds a certificate, and a private key."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 20)
    except OSError:
        return False, False
    return b"BEGIN CERTIFICATE" in text, b"PRIVATE KEY" in text


def _load_identity(
    context: ssl.SSLContext,
    certfile: str,
    keyfile: str | None,
    keyfile_option: str = "keyfile=",
) -> None:
    """Load the certificate (and key) this side shows into ``context``, once
    `_check_file` found the files safe to use; errors name ``keyfile_option``, the
    program's name for the key's file."""
    _check_file(certfile, "certfile", _key_guard(certfile, keyfile))
    if keyfile:
        _check_file(keyfile, "keyfile", "key")
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        if not keyfile and _holds(certfile) == (True, False):  # "[SSL] PEM lib"
            raise ConfigurationError(
                f"certfile {certfile!r} holds no private key: give the file of its "
                f"key with {keyfile_option}"
            ) from exc
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigurationError(
                f"keyfile {keyfile!r} is not the key of the certificate {certfile!r}: "
                f"give with {keyfile_option} the key made with that certificate"
            ) from exc
        raise ConfigurationError(
            f"cannot load certificate {certfile!r} / key {keyfile!r}: {exc}: the "
            "certfile must hold the certificate in PEM ('-----BEGIN CERTIFICATE"
            "-----'), the keyfile its private key"
        ) from exc


def _default_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    """Python's default context for ``purpose``, TLS 1.2 or newer, checking the
    peer's certificate as every Python from 3.11 does.

    Python 3.13 added ``VERIFY_X509_STRICT`` to the default flags: it refuses a CA
    certificate without a key usage extension, which ``openssl req -x509`` does not
    write (the lab CA of docs/howto/secure-nodes.md), so a client upgraded to 3.13
    failed with "CA cert does not include key usage extension" against nodes its
    3.11 verified. The CA is the lab's own, given as ``cafile``: the chain, the
    names and the dates are still checked.
    """
    context = ssl.create_default_context(purpose)
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(
    certfile: str,
    keyfile: str | None = None,
    cafile: str | None = None,
    keyfile_option: str = "--keyfile",
) -> ssl.SSLContext:
    """Context for a node; client certificates are checked when ``cafile`` is given.
    A certfile without its key says to give ``keyfile_option``."""
    context = _default_context(ssl.Purpose.CLIENT_AUTH)
    _load_identity(context, certfile, keyfile, keyfile_option)
    if cafile:
        _check_file(cafile, "cafile", "trust")
        context.load_verify_locations(cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    certfile: str | None = None,
    keyfile: str | None = None,
    cafile: str | None = None,
    keyfile_option: str = "keyfile=",
) -> ssl.SSLContext:
    """Context for a client; the node certificate is verified when ``cafile`` is given.

    Without ``cafile`` the traffic is still encrypted and the shared-secret handshake
    still authenticates both sides; ``cafile`` adds protection of confidentiality
    against an active man in the middle. A certfile without its key says to give
    ``keyfile_option`` (a program's option; a Python client's keyword by default).
    """
    context = _default_context(ssl.Purpose.SERVER_AUTH)
    if cafile:
        _check_file(cafile, "cafile", "trust")
        context.load_verify_locations(cafile)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certfile:
        _load_identity(context, certfile, keyfile, keyfile_option)
        _CLIENT_CERTS[context] = certfile
    return context


def handshake_refusal(
    peer: str,
    context: ssl.SSLContext,
    exc: DispynbError,
    options: TlsOptions = CLIENT_TLS,
) -> TransportError:
    """What a client tells its user when a TLS node hangs up before the dispynb
    handshake is done, as a node refusing the client's certificate does.

    With TLS 1.3 the client's handshake completes before the node has checked the
    client's certificate, so the refusal arrives at the first read: as an alert
    naming the reason, or (a dispynb node) as a bare close or reset.
    """
    certfile = _CLIENT_CERTS.get(context)
    text = str(exc)
    if certfile:
        fix = (
            f"the node's --cafile must hold the CA that signed the client's "
            f"certificate {certfile!r}"
        )
        known = any(alert in text for alert in _REFUSED_CERT_ALERTS)
        reason = "it does not trust" if known else "it may not trust"
        reason += f" this client's certificate: {fix}"
    else:
        fix = (
            f"give {options.client_certificate()}, a certificate signed by a CA "
            "in the node's --cafile"
        )
        known = any(alert in text for alert in _MISSING_CERT_ALERTS)
        reason = "it requires" if known else "it may require"
        reason += f" a client certificate: {fix}"
    if not known:
        reason += " (the node's log says why)"
    return TransportError(
        f"node {peer} closed the TLS connection during the handshake: {reason} [{text}]"
    )
