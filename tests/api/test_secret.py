"""Tests of finding the shared secret, and of never revealing it."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import string

import pytest

from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV
from dispynb.errors import ConfigurationError
from dispynb.secret import (
    MIN_SECRET_BITS,
    check_strength,
    estimate_bits,
    fingerprint,
    random_secret,
    resolve_secret,
    write_new_secret,
)

SECRET = "correct horse battery staple"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog):
    """Whatever a test does, the secret must not reach a log record."""
    with caplog.at_level(logging.DEBUG, logger="dispynb"):
        yield
    for record in caplog.records:
        assert SECRET not in record.getMessage()


def write_secret(tmp_path, content: str | bytes, mode: int = 0o600) -> str:
    path = tmp_path / "secret"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return str(path)


def test_resolve_secret_nothing_given_returns_none():
    assert resolve_secret(None) is None


def test_resolve_secret_str_argument_returns_utf8_bytes():
    assert resolve_secret("sécret") == "sécret".encode()


def test_resolve_secret_bytes_argument_returned_unchanged():
    assert resolve_secret(b"\x00\xff") == b"\x00\xff"


def test_resolve_secret_empty_argument_falls_back_to_env(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert resolve_secret("") == SECRET.encode()


def test_resolve_secret_argument_wins_over_file_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "from env")
    path = write_secret(tmp_path, "from file")
    assert resolve_secret("from arg", path) == b"from arg"


def test_resolve_secret_env_variable_used(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert resolve_secret(None) == SECRET.encode()


def test_resolve_secret_env_variable_empty_raises_configuration_error(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "")
    with pytest.raises(ConfigurationError, match=SECRET_ENV):
        resolve_secret(None)


def test_resolve_secret_file_argument_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "from env")
    path = write_secret(tmp_path, SECRET + "\n")
    assert resolve_secret(None, path) == SECRET.encode()


def test_resolve_secret_env_file_used(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_FILE_ENV, write_secret(tmp_path, SECRET))
    assert resolve_secret(None) == SECRET.encode()


def test_resolve_secret_env_secret_wins_over_env_file(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_FILE_ENV, write_secret(tmp_path, "from file"))
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert resolve_secret(None) == SECRET.encode()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (SECRET, SECRET),
        (SECRET + "\n", SECRET),
        (SECRET + "\r\n", SECRET),
        (SECRET + "\n\n", SECRET + "\n"),
        (" " + SECRET + " ", " " + SECRET + " "),
    ],
)
def test_resolve_secret_file_trailing_newline_stripped_once(
    tmp_path, content, expected
):
    assert resolve_secret(None, write_secret(tmp_path, content)) == expected.encode()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660])
def test_resolve_secret_file_loose_permissions_refused_with_chmod_hint(tmp_path, mode):
    path = write_secret(tmp_path, SECRET, mode)
    with pytest.raises(ConfigurationError) as info:
        resolve_secret(None, path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert SECRET not in message


def test_resolve_secret_env_file_loose_permissions_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_FILE_ENV, write_secret(tmp_path, SECRET, 0o644))
    with pytest.raises(ConfigurationError, match="chmod 600"):
        resolve_secret(None)


def test_resolve_secret_file_owner_only_read_accepted(tmp_path):
    path = write_secret(tmp_path, SECRET, 0o400)
    assert resolve_secret(None, path) == SECRET.encode()


def test_resolve_secret_missing_file_error_names_path(tmp_path):
    path = str(tmp_path / "absent")
    with pytest.raises(ConfigurationError, match="does not exist") as info:
        resolve_secret(None, path)
    assert path in str(info.value)
    # how to make one: it said "create it (mode 600)", leaving the admin to guess
    # how many bytes of what
    assert f"make a new secret there with: dispynb secret {path} (256" in str(
        info.value
    )


@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_resolve_secret_empty_file_refused(tmp_path, content):
    with pytest.raises(ConfigurationError, match="empty"):
        resolve_secret(None, write_secret(tmp_path, content))


def test_resolve_secret_directory_refused(tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        resolve_secret(None, str(directory))


def test_resolve_secret_fifo_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        resolve_secret(None, str(fifo))


def test_resolve_secret_file_path_like_accepted(tmp_path):
    path = tmp_path / "secret"
    write_secret(tmp_path, SECRET)
    assert resolve_secret(None, path) == SECRET.encode()


def test_fingerprint_secret_gives_eight_hex_digits_of_sha256():
    value = fingerprint(SECRET.encode())
    assert value == hashlib.sha256(SECRET.encode()).hexdigest()[:8]
    assert len(value) == 8
    assert set(value) <= set(string.hexdigits.lower())


def test_fingerprint_different_secrets_differ():
    assert fingerprint(b"one") != fingerprint(b"two")


def test_random_secret_called_twice_gives_distinct_url_safe_text():
    first, second = random_secret(), random_secret()
    assert first != second
    assert len(first) >= 43  # 32 random bytes
    assert set(first) <= set(string.ascii_letters + string.digits + "-_")


def test_a_random_secret_never_begins_with_a_dash():
    # dispy's node takes it as `-s SECRET`: a leading '-' reads as an option there.
    # One draw in 64 began with '-': 3,000 draws all missing it is a 1e-20 chance.
    assert not [s for s in (random_secret() for _ in range(3000)) if s.startswith("-")]


# --- strength ---------------------------------------------------------------------

WEAK_SECRETS = [
    b"dragon",
    b"Tr0ub4dor&3",
    b"correct horse battery staple",
    b"a" * 100,
    b"abcdefghijklmnopqrstuvwxyz" * 4,
    b"0123456789" * 8,
]


@pytest.mark.parametrize("weak", WEAK_SECRETS)
def test_estimate_bits_of_weak_secrets_is_under_the_floor(weak):
    assert estimate_bits(weak) < MIN_SECRET_BITS


def test_estimate_bits_of_generated_secrets_is_over_the_floor():
    assert min(estimate_bits(random_secret().encode()) for _ in range(200)) > 160
    assert min(estimate_bits(os.urandom(48)) for _ in range(200)) > MIN_SECRET_BITS


def test_check_strength_names_the_fix_never_the_secret():
    with pytest.raises(ConfigurationError, match="dispynb secret") as info:
        check_strength(SECRET.encode(), "for a node listening on '0.0.0.0'")
    assert SECRET not in str(info.value)
    assert "0.0.0.0" in str(info.value)
    check_strength(random_secret().encode(), "anywhere")


@pytest.mark.parametrize("weak", [b"...", b"x", b"a" * 30])
def test_check_strength_of_one_repeated_character_says_0_bits(weak):
    """The migration guide's ``export DISPYNB_SECRET=...`` typed as printed: the node's
    refusal said the secret "holds at most about -0 bits"."""
    assert estimate_bits(weak) >= 0
    with pytest.raises(ConfigurationError) as info:
        check_strength(weak, "for a node listening on '0.0.0.0'")
    assert "about -" not in str(info.value)
    assert re.search(r"holds at most about \d+ bits", str(info.value))


def test_write_new_secret_creates_a_strong_0600_file_and_never_overwrites(tmp_path):
    path = tmp_path / "secret"
    secret = write_new_secret(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert resolve_secret(None, path) == secret.encode()
    assert estimate_bits(secret.encode()) >= MIN_SECRET_BITS
    with pytest.raises(ConfigurationError, match="already exists"):
        write_new_secret(path)
    assert resolve_secret(None, path) == secret.encode()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError):
        write_new_secret(link)
    assert not (tmp_path / "elsewhere").exists()


def test_dispynb_secret_command_prints_or_writes_a_secret(tmp_path, capsys):
    from dispynb.cli import main

    assert main(["secret"]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed) == 43 and estimate_bits(printed.encode()) >= MIN_SECRET_BITS
    path = tmp_path / "s"
    assert main(["secret", str(path)]) == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert main(["secret", str(path)]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_secret_file_of_another_user_is_refused_naming_its_owner(tmp_path):
    """Mode 600 does not keep its owner out: root given another user's file would
    use the secret that user chose (tests/hostile/test_secret_owner.py)."""
    path = write_secret(tmp_path, SECRET)
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigurationError, match=r"belongs to .*65534") as info:
        resolve_secret(None, path)
    assert SECRET not in str(info.value)
    os.chown(path, 0, -1)  # root's: trusted
    assert resolve_secret(None, path) == SECRET.encode()
