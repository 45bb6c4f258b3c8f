"""TLS contexts for node servers and clients (TLS 1.2 or newer)."""

from __future__ import annotations

import os
import ssl

from dispynb.errors import ConfigurationError


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise ConfigurationError(f"{what} {path!r} does not exist or is not a file")


def server_context(
    certfile: str, keyfile: str | None = None, cafile: str | None = None
) -> ssl.SSLContext:
    """Context for a node; client certificates are checked when ``cafile`` is given."""
    _check_file(certfile, "certfile")
    if keyfile:
        _check_file(keyfile, "keyfile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"cannot load certificate {certfile!r} / key {keyfile!r}: {exc}"
        ) from exc
    if cafile:
        _check_file(cafile, "cafile")
        context.load_verify_locations(cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    certfile: str | None = None, keyfile: str | None = None, cafile: str | None = None
) -> ssl.SSLContext:
    """Context for a client; the node certificate is verified when ``cafile`` is given.

    Without ``cafile`` the traffic is still encrypted and the shared-secret handshake
    still authenticates both sides; ``cafile`` adds protection of confidentiality
    against an active man in the middle.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        _check_file(cafile, "cafile")
        context.load_verify_locations(cafile)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certfile:
        _check_file(certfile, "certfile")
        if keyfile:
            _check_file(keyfile, "keyfile")
        try:
            context.load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"cannot load certificate {certfile!r} / key {keyfile!r}: {exc}"
            ) from exc
    return context
