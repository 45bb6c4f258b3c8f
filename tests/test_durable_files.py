"""Files the daemons replace (`dispynb.daemon.replace_file`: a scheduler's users
file, a node's saved configuration, port files) are on the disk before they
replace the old ones: a power loss leaves the old file or the new, never a torn one."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from dispynb.daemon import replace_file


def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What ``os.fsync`` is called on from now: each descriptor's path."""
    calls: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_a_replaced_file_is_synced_before_its_rename_and_its_name_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "users"
    target.write_text("old\n")
    calls = synced(monkeypatch)
    replace_file(str(target), "new\n", 0o600)
    assert target.read_text() == "new\n"
    assert len(calls) == 2, calls
    assert calls[0].startswith(str(tmp_path / ".users.")), calls  # the new file
    assert calls[0].endswith(".tmp"), calls
    assert calls[1] == str(tmp_path)  # then its directory: the rename
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_a_directory_that_cannot_be_synced_fails_no_replaced_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems cannot sync a directory (EINVAL): the file is replaced all
    the same (a node's port file, a scheduler's users file), not an error after
    the rename."""
    real = os.fsync

    def no_directories(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_directories)
    replace_file(str(tmp_path / "port"), "9711\n")
    assert (tmp_path / "port").read_text() == "9711\n"
