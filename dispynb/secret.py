"""Finding the shared secret (argument, file or environment) without ever revealing it.

The secret authenticates clients and nodes to each other (HMAC-SHA256), so its
value never appears in a message, a log record or a ``repr``; :func:`fingerprint`
gives a short, stable name for it instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import secrets
import shlex
import stat
import string
import sys
from collections import Counter
from collections.abc import Mapping

from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV
from dispynb.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Entropy a secret needs (by `estimate_bits`) on a node reachable from the network.
MIN_SECRET_BITS = 128

#: Character classes and how many characters each has, for `estimate_bits`.
_CLASSES: list[tuple[frozenset[int], int]] = [
    (frozenset(string.ascii_lowercase.encode()), 26),
    (frozenset(string.ascii_uppercase.encode()), 26),
    (frozenset(string.digits.encode()), 10),
    (frozenset((string.punctuation + " ").encode()), 33),
]
_OTHER_BYTES = 256 - 95  # control characters and non-ASCII bytes


def resolve_secret(
    secret: str | bytes | None,
    secret_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
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
    env:
        Where to read the two variables (default: ``os.environ``).

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
    if env is None:
        env = os.environ
    env_secret = env.get(SECRET_ENV)
    if env_secret is not None:
        if not env_secret:
            raise ConfigurationError(
                f"the environment variable {SECRET_ENV} is set but empty: "
                "set it to the shared secret, or unset it"
            )
        logger.debug("Using the secret from %s", SECRET_ENV)
        return env_secret.encode()
    env_file = env.get(SECRET_FILE_ENV)
    if env_file:
        return read_secret_file(env_file)
    return None


def withdraw_secret_env() -> dict[str, str]:
    """Take ``DISPYNB_SECRET`` out of this process's environment; return it as an
    ``env`` for `resolve_secret` (empty if it was not set).

    For a node, whose processes run jobs: they inherit its environment, so a job
    printing its environment (or a shared scheduler's user, who is not to know the
    node secret) would find the secret there, and in ``/proc/PID/environ`` of the
    node, which shows the environment the process started with: the value is
    overwritten there with zero bytes too (`forget_secret_env`). Call it before the
    node starts anything, and after it forked what must not hold the secret (the
    returned copy is in this process's memory).
    """
    value = os.environ.get(SECRET_ENV)
    if value is None:
        return {}
    forget_secret_env()
    return {SECRET_ENV: value}


def forget_secret_env() -> None:
    """Take ``DISPYNB_SECRET`` out of this process leaving no copy in its memory:
    its value is overwritten with zero bytes in the C environment and in the bytes
    object ``os.environ`` holds (never decoded here), then the variable is unset.

    For a process forked from a node before it withdrew its secret (the zygote,
    which forks the processes that run jobs: they would find it in their memory).
    """
    raw = getattr(os.environ, "_data", {}).get(os.fsencode(SECRET_ENV))
    _zero_c_environ_value(SECRET_ENV)
    if isinstance(raw, bytes):
        _zero_bytes(raw)
    with contextlib.suppress(KeyError):
        del os.environ[SECRET_ENV]  # unsetenv: gone for the processes started now


def _zero_c_environ_value(name: str) -> None:
    """Overwrite the value of ``name`` in the C environment with zero bytes, where
    it lies (for a variable the process started with: the block that
    ``/proc/PID/environ`` reads). Best effort: nothing on a system without libc."""
    try:
        libc = ctypes.CDLL(None)
        getenv = libc.getenv
    except (OSError, AttributeError):
        return
    getenv.restype = ctypes.c_void_p
    getenv.argtypes = [ctypes.c_char_p]
    where = getenv(os.fsencode(name))
    if where:
        ctypes.memset(where, 0, len(ctypes.string_at(where)))


def _zero_bytes(raw: bytes) -> None:
    """Overwrite a bytes object's content with zero bytes, in place, as it is about
    to be dropped (CPython's layout: the bytes follow a fixed header). Not a bytes
    object of one byte or none: CPython shares those."""
    if len(raw) > 1 and sys.implementation.name == "cpython":
        ctypes.memset(id(raw) + bytes.__basicsize__ - 1, 0, len(raw))


#: How a shared scheduler's user credential starts: ``dispynb-user:NAME:TOKEN``
#: (``dispynb-scheduler user add NAME`` writes one).
CREDENTIAL_PREFIX = b"dispynb-user:"


def is_credential(secret: bytes | None) -> bool:
    """Whether ``secret`` is a shared scheduler's user credential: the cluster's
    only "node" is then that scheduler, and messages name it so."""
    return secret is not None and secret.startswith(CREDENTIAL_PREFIX)


def split_credential(secret: bytes | None) -> tuple[str, bytes | None]:
    """``(user, key)`` of a scheduler credential; ``("", secret)`` for any other.

    A client that connects with a credential names the user in its hello and
    proves the user's token, which is what `dispynb-scheduler` checks.
    """
    if secret is None or not secret.startswith(CREDENTIAL_PREFIX):
        return "", secret
    user, sep, token = secret[len(CREDENTIAL_PREFIX) :].partition(b":")
    if not sep or not user or not token:
        raise ConfigurationError(
            "malformed scheduler credential: expected dispynb-user:NAME:TOKEN, as "
            "written by 'dispynb-scheduler user add NAME'"
        )
    return user.decode("utf-8", "replace"), token


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
            info = os.fstat(fd)
            mode = info.st_mode
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
            foreign = foreign_owner(info)
            if foreign:
                raise ConfigurationError(
                    f"secret file {path!r} belongs to {foreign}, not to this user "
                    "or root: its owner knows the secret and can change it; give a "
                    f"file of your own (chown it, or write a new one)"
                )
            data = _read_all(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ConfigurationError(
            f"secret file {path!r} does not exist: fix the path, or make a new "
            f"secret there with: dispynb secret {shlex.quote(path)} (256 random "
            "bits, mode 600; the nodes and their clients need the same one)"
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


def foreign_owner(info: os.stat_result) -> str:
    """The user owning a file of secrets (``info``: its stat) if that is neither the
    reading user nor root, by name where known; "" if the file may be trusted.

    Mode 600 keeps other users from reading a file, not its owner: a root process
    given a file another user made (in ``/tmp``, or left in their home) would use the
    secret that user chose, and run their code as root.
    """
    if os.name != "posix" or info.st_uid in (0, os.geteuid()):
        return ""
    try:
        import pwd

        return f"user {pwd.getpwuid(info.st_uid).pw_name!r} (uid {info.st_uid})"
    except (ImportError, KeyError):
        return f"uid {info.st_uid}"


def has_access_acl(fd: int) -> bool:
    """Whether the file of ``fd`` (``O_PATH`` or open) has a POSIX access ACL
    beyond its mode (only such ones are stored): its mode's group bits are then the
    mask of what the users and groups it names may do."""
    proc = f"/proc/self/fd/{fd}"
    target: int | str = proc if os.path.exists(proc) else fd
    try:
        os.getxattr(target, "system.posix_acl_access")
    except (OSError, AttributeError):  # none (ENODATA), or no xattrs here
        return False
    return True


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
    """Return a new random secret (256 bits, URL-safe text).

    It never begins with ``-``: dispy's node command line takes it as ``-s SECRET``,
    where a value beginning with ``-`` reads as an option (1 draw in 64 would).
    """
    while (secret := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return secret


def estimate_bits(secret: bytes) -> float:
    """A generous upper bound of the entropy of ``secret``, in bits.

    Nobody can measure how a secret was chosen; this bounds what it could hold. It is
    the smaller of two figures:

    - character classes x length: ``log2`` of the alphabet its classes span
      (lowercase 26, uppercase 26, digits 10, punctuation and space 33, other bytes
      161) for each character, except 1 bit for a character that repeats the one
      before or steps from it by one (``aa``, ``ab``, ``98``), or starts four
      characters seen earlier in the secret (``passpass``);
    - its own character distribution: length x the Shannon entropy of the frequencies
      of its characters, which catches a small alphabet used over and over.

    A secret from `random_secret` (43 URL-safe characters, 256 random bits) scores
    about 210; a dictionary word, a common password or any secret shorter than 20
    characters scores under 128. A long passphrase of words can score more than it
    holds: prefer a generated secret.
    """
    if not secret:
        return 0.0
    pool = sum(size for chars, size in _CLASSES if chars.intersection(secret))
    if any(byte < 32 or byte > 126 for byte in secret):
        pool += _OTHER_BYTES
    per_char = math.log2(pool) if pool > 1 else 0.0
    by_classes = 0.0
    seen: set[bytes] = set()
    for i, byte in enumerate(secret):
        step = byte - secret[i - 1] if i else None
        gram = secret[i : i + 4]
        repeats = step in (0, 1, -1) or (len(gram) == 4 and gram in seen)
        by_classes += 1.0 if repeats else per_char
        if i >= 3:
            seen.add(secret[i - 3 : i + 1])
    length = len(secret)
    # log2(length / count), not -log2(count / length): one character repeated scores
    # 0 bits, not -0 (which a refusal printed as "about -0 bits")
    by_distribution = sum(
        count * math.log2(length / count) for count in Counter(secret).values()
    )
    return min(by_classes, by_distribution)


def check_strength(secret: bytes, where: str) -> None:
    """Raise `ConfigurationError` if ``secret`` scores under `MIN_SECRET_BITS`.

    ``where`` says why strength matters, e.g. "for a node listening on 0.0.0.0".
    """
    bits = estimate_bits(secret)
    if bits >= MIN_SECRET_BITS:
        return
    raise ConfigurationError(
        f"the secret is too weak {where}: it holds at most about {bits:.0f} bits, "
        f"{MIN_SECRET_BITS} are needed so that nobody can guess it. Make a strong one "
        "with `dispynb secret FILE` (256 random bits, mode 600) and give the same "
        "file to nodes (--secret-file) and clients (secret_file= or "
        "DISPYNB_SECRET_FILE)"
    )


def write_new_secret(path: str | os.PathLike[str]) -> str:
    """Write a new `random_secret` to ``path`` (created with mode 600); return it.

    Raises
    ------
    ConfigurationError
        If ``path`` exists (it is never overwritten) or cannot be created.
    """
    path = os.path.expanduser(os.fspath(path))
    secret = random_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigurationError(
            f"{path!r} already exists: not overwriting it (remove it first, or use it "
            "with --secret-file)"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path!r}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    return secret


#: Options whose value is a secret, on the command lines of dispynb's programs.
SECRET_OPTIONS = ("-s", "--secret")

#: Secrets this process holds that what it forks is to forget (`forget_noted_secrets`).
_noted: list[str] = []


def note_secret(value: str) -> None:
    """Note ``value``, a secret this process has in its memory, for
    `forget_noted_secrets` in a process it forks (a node's zygote)."""
    if value and value not in _noted:
        _noted.append(value)


def hide_secret_argv(options: tuple[str, ...] = SECRET_OPTIONS) -> bool:
    """Mask the value of a secret option given on this program's command line
    (``--secret VALUE``, ``--secret=VALUE``, ``-sVALUE``) with ``*``, in place: in
    the block ``/proc/PID/cmdline`` reads (``ps``, for every user of the machine,
    and the jobs of a node, whose processes it forks inherit it) and in
    ``sys.argv`` and ``sys.orig_argv``. Call it once the options are parsed (the
    parsed value is another reference, kept), before anything is forked.

    The value is seen in the process list from the program's start until then (a
    fraction of a second): a secret file or ``DISPYNB_SECRET`` is never seen.
    Returns whether a value was masked. Best effort: nothing where ``/proc`` or
    libc is missing."""
    program = len(sys.argv) - 1  # its own arguments: the last ones of cmdline
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            cmdline = handle.read()
        with open("/proc/self/stat", "rb") as handle:
            arg_start = int(handle.read().rsplit(b")", 1)[1].split()[45])
    except (OSError, ValueError, IndexError):
        return False
    words = cmdline.split(b"\0")[:-1]
    spans = _secret_spans(words[len(words) - program :] if program > 0 else [], options)
    if not spans or not arg_start:
        return False
    own_words = words[len(words) - program :]
    for i, start, length in spans:
        note_secret(os.fsdecode(own_words[i][start : start + length]))
    first = sum(len(word) + 1 for word in words[: len(words) - program])
    offsets = [first]
    for word in words[len(words) - program :]:
        offsets.append(offsets[-1] + len(word) + 1)
    if ctypes.string_at(arg_start, len(cmdline)) != cmdline:
        return False  # not where /proc says (moved by setproctitle?): left
    for index, start, length in spans:
        ctypes.memset(arg_start + offsets[index] + start, ord("*"), length)
    for name in ("argv", "orig_argv"):
        values = getattr(sys, name, None)
        if isinstance(values, list):
            tail = len(values) - program
            for index, start, _length in spans:
                if 0 <= tail + index < len(values):
                    word = values[tail + index]
                    values[tail + index] = word[:start] + "*" * (len(word) - start)
    return True


def forget_noted_secrets() -> int:
    """Overwrite every copy of the secrets noted (`note_secret`; those
    `hide_secret_argv` masked) in this process's memory
    (`dispynb.memscrub.scrub_memory`); return how many.

    For a process forked from a node after it parsed ``--secret VALUE`` or a
    ``--config`` file holding it (the zygote): the processes it forks run jobs,
    which read their own memory, and found there the parsed value, the strings
    the parser made and dropped, the file's text and the interpreter's
    wide-character copy of its arguments."""
    from dispynb.memscrub import scrub_memory

    count = 0
    while _noted:
        count += scrub_memory(_noted.pop())
    return count


def _secret_spans(
    words: list[bytes], options: tuple[str, ...]
) -> list[tuple[int, int, int]]:
    """``(word, offset, length)`` of each secret value in a program's arguments."""
    names = [option.encode() for option in options]
    spans = []
    index = 0
    while index < len(words):
        word = words[index]
        if word == b"--":
            break  # what follows is not options
        if word in names and index + 1 < len(words):
            spans.append((index + 1, 0, len(words[index + 1])))
            index += 2
            continue
        for name in names:
            if name.startswith(b"--") and word.startswith(name + b"="):
                spans.append((index, len(name) + 1, len(word) - len(name) - 1))
            elif not name.startswith(b"--") and word.startswith(name) and word != name:
                spans.append((index, len(name), len(word) - len(name)))
        index += 1
    return spans
