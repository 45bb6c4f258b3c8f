"""`nodeserver.privatedir.private_dir`: the node's directory, safe from other users."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispynb.errors import ConfigurationError
from nodeserver.privatedir import private_dir
from tests.nodeproc import start_node


def test_a_missing_directory_is_made_private(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others add names, cannot rename ours
    private_dir(str(shared / "dispynb" / "inner"))
    assert (shared / "dispynb" / "inner").stat().st_mode & 0o777 == 0o700


def test_an_own_directory_others_can_write_is_made_private(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    dest.chmod(0o1777)  # as a tmpfs mounted there
    private_dir(str(dest))
    assert dest.stat().st_mode & 0o7777 == 0o700


def test_a_name_another_user_put_in_it_is_refused_saying_how_to_fix_it(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("a file of another user needs root")
    dest = tmp_path / "dest"
    (dest / ".store").mkdir(parents=True)
    os.chown(dest / ".store", 65534, 65534)
    with pytest.raises(ConfigurationError) as caught:
        private_dir(str(dest))
    assert ".store in it belongs to" in str(caught.value)
    assert "a directory of your own" in str(caught.value)


def test_a_directory_under_one_others_can_write_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)  # not sticky: anyone may rename what is in it
    with pytest.raises(ConfigurationError, match=f"{loose} is writable by others"):
        private_dir(str(loose / "dest"))


def test_a_symlink_is_checked_where_it_leads(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    (loose / "target").mkdir(parents=True)
    loose.chmod(0o777)
    link = tmp_path / "link"
    os.symlink(loose / "target", link)
    with pytest.raises(ConfigurationError, match=f"{loose} is writable by others"):
        private_dir(str(link))


@pytest.mark.slow
def test_a_node_never_makes_its_lock_file_through_a_planted_symlink(
    tmp_path: Path,
) -> None:
    """A symlink as ``.node-lock`` (a job runs as the node's user: it can put one
    there) had the next node create the file it named (opened with O_CREAT,
    following it), wherever it was, and lock it. A real node starts."""
    dest = tmp_path / "node" / "dest"
    dest.mkdir(parents=True, mode=0o700)
    planted = tmp_path / "elsewhere"
    (dest / ".node-lock").symlink_to(planted)
    node = start_node(tmp_path / "node")
    try:
        assert not planted.exists() and not planted.is_symlink()
        assert (dest / ".node-lock").is_file()
        assert not (dest / ".node-lock").is_symlink()
    finally:
        assert node.stop() == 0
    assert "a symlink?): replaced" in node.log_text()


def test_the_directory_made_private_is_the_one_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is made to lead elsewhere (a symlink swapped in) between the check
    and the change of mode: the directory checked is changed, not where the name
    now leads (it was chmod by name)."""
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir(mode=0o755)
    dest.chmod(0o755)
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)

    def swap() -> None:
        dest.rename(tmp_path / "checked")
        dest.symlink_to(elsewhere)

    for name in ("chmod", "fchmod"):
        real = getattr(os, name)

        def swapped(*args: object, real: object = real, **kwargs: object) -> None:
            if not dest.is_symlink():
                swap()
            real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(os, name, swapped)
    private_dir(str(dest))
    assert (tmp_path / "checked").stat().st_mode & 0o7777 == 0o700
    assert elsewhere.stat().st_mode & 0o7777 == 0o755
