"""Finding the shared secret (argument, file or environment) without ever revealing it.

The secret authenticates clients and nodes to each other (HMAC-SHA256), so its
value never appears in a message, a log record or a ``repr``; :func:`fingerprint`
gives a short, stable name for it instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat

from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV
from dispynb.errors import ConfigurationError

logger = logging.getLogger(__name__)


def resolve_secret(
    secret: str | bytes | None,
    secret_file: str | os.PathLike[str] | None = None,
) -> bytes | None:
    """Return the shared secret from the first source that gives one.

    The sources, in order: ``secret``; the file ``secret_file``; the environment
    variable ``DISPYNB_SECRET``; the file named by ``DISPYNB_SECRET_FILE``.

    Parameters
    ----------
    secret:
        The secret itself; a str is encoded as UTF-8. An empty value counts as
        not given (dispy's default ``secret=''`` means no secret).
    secret_file:
        Path of a file holding the secret. It must not be readable or writable
        by group or others; one trailing newline is ignored.

    Returns
    -------
    The secret as bytes, or None when no source gives one.

    Raises
    ------
    ConfigurationError
        If a secret file is missing, unreadable, empty or has loose permissions,
        or if ``DISPYNB_SECRET`` is set but empty.
    """
    if secret:
        return secret.encode() if isinstance(secret, str) else bytes(secret)
    if secret_file is not None:
        return read_secret_file(secret_file)
    env_secret = os.environ.get(SECRET_ENV)
    if env_secret is not None:
        if not env_secret:
            raise ConfigurationError(
                f"the environment variable {SECRET_ENV} is set but empty: "
                "set it to the shared secret, or unset it"
            )
        logger.debug("Using the secret from %s", SECRET_ENV)
        return env_secret.encode()
    env_file = os.environ.get(SECRET_FILE_ENV)
    if env_file:
        return read_secret_file(env_file)
    return None


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """Read a secret from a file that only its owner may read or write.

    One trailing newline (``\\n`` or ``\\r\\n``) is removed, so files written by
    ``echo`` work.

    Raises
    ------
    ConfigurationError
        If the file is missing or unreadable, is accessible by group or others
        (the message says to ``chmod 600`` it), or holds an empty secret.
    """
    path = os.path.expanduser(os.fspath(path))
    try:
        # O_NONBLOCK: opening a FIFO must not hang (it is refused just below).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            # Check the file we opened, not the path: it cannot be swapped between.
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigurationError(
                    f"secret file {path!r} is not a regular file: "
                    "give the path of a file that holds the secret"
                )
            if os.name == "posix" and mode & 0o077:
                raise ConfigurationError(
                    f"secret file {path!r} is accessible by other users "
                    f"(mode {stat.S_IMODE(mode):04o}); "
                    f"restrict it with: chmod 600 {path}"
                )
            data = _read_all(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ConfigurationError(
            f"secret file {path!r} does not exist: create it (mode 600) or fix the path"
        ) from None
    except OSError as exc:
        # exc names only the path and the OS reason, never the contents.
        raise ConfigurationError(
            f"cannot read secret file {path!r}: {exc.strerror}"
        ) from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ConfigurationError(
            f"secret file {path!r} is empty: write the shared secret into it"
        )
    logger.debug("Using the secret from file %s", path)
    return data


def _read_all(fd: int) -> bytes:
    """Read an open file to its end."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def fingerprint(secret: bytes) -> str:
    """Return a short name for ``secret`` to show in logs: 8 hex digits of its SHA-256.

    Equal fingerprints on client and node tell that they share the secret,
    without revealing it.
    """
    return hashlib.sha256(secret).hexdigest()[:8]


def random_secret() -> str:
    """Return a new random secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)
