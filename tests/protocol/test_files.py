"""File names from peers: validation and writing that never leaves its folder."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispynb.errors import ProtocolError
from dispynb.protocol.files import (
    digest_of,
    link_inside,
    safe_relative_path,
    write_inside,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", "a.txt"),
        ("out/result1.txt", "out/result1.txt"),
        ("./out//x", "out/x"),
    ],
)
def test_safe_relative_path_accepts_and_normalises(name, expected):
    assert safe_relative_path(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../x",
        "a/../../x",
        "/etc/passwd",
        "C:/x",
        "a\\b",
        "a\0b",
        "dir/",
        ".",
        "x" * 2000,
        None,
        b"bytes",
    ],
)
def test_safe_relative_path_refuses_unsafe_names(name):
    with pytest.raises(ProtocolError):
        safe_relative_path(name)


def test_write_inside_creates_dirs_and_writes(tmp_path):
    path = write_inside(str(tmp_path), "out/deep/r.txt", b"data")
    assert path == str(tmp_path / "out" / "deep" / "r.txt")
    assert (tmp_path / "out" / "deep" / "r.txt").read_bytes() == b"data"
    assert not [p for p in tmp_path.rglob("*.part")]


def test_write_inside_refuses_symlinked_directory_escape(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(ProtocolError, match="symlink"):
        write_inside(str(base), "link/evil.txt", b"x")
    assert not (outside / "evil.txt").exists()


def test_write_inside_refuses_symlink_as_the_file(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    base = tmp_path / "base"
    base.mkdir()
    (base / "f.txt").symlink_to(target)
    with pytest.raises(ProtocolError, match="symlink"):
        write_inside(str(base), "f.txt", b"overwrite")
    assert target.read_text() == "keep"


def test_write_inside_refuses_traversal_names(tmp_path):
    with pytest.raises(ProtocolError):
        write_inside(str(tmp_path), "../escape.txt", b"x")
    assert not (tmp_path.parent / "escape.txt").exists()


def test_link_inside_links_store_file(tmp_path):
    source = tmp_path / "store-file"
    source.write_bytes(b"content")
    base = tmp_path / "comp"
    base.mkdir()
    path = link_inside(str(base), "data/in.txt", str(source))
    with open(path, "rb") as handle:
        assert handle.read() == b"content"
    assert os.stat(path).st_ino == source.stat().st_ino


def test_digest_of_is_sha256_hex():
    assert digest_of(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize("writer", ["write", "link"])
def test_nothing_is_created_through_a_symlinked_directory(tmp_path, writer):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "name").symlink_to(outside)
    source = tmp_path / "source"
    source.write_bytes(b"x")
    with pytest.raises(ProtocolError, match="'name' on its way is a symlink"):
        if writer == "write":
            write_inside(str(base), "name/a/b/x", b"x")
        else:
            link_inside(str(base), "name/a/b/x", str(source))
    assert list(outside.iterdir()) == []


def test_a_symlink_deeper_down_stops_creation_there(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "a").mkdir(parents=True)
    outside.mkdir()
    (base / "a" / "b").symlink_to(outside)
    with pytest.raises(ProtocolError, match="symlink"):
        write_inside(str(base), "a/b/c/d/x", b"x")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in base.rglob("*")) == ["a", "b"]


def test_a_file_on_the_way_is_refused(tmp_path):
    (tmp_path / "a").write_text("plain file")
    with pytest.raises(ProtocolError, match="not a directory"):
        write_inside(str(tmp_path), "a/x", b"x")


def test_a_base_reached_through_a_symlink_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    write_inside(str(tmp_path / "alias"), "d/x", b"data")
    assert (real / "d" / "x").read_bytes() == b"data"


def test_write_inside_replaces_an_existing_file(tmp_path):
    write_inside(str(tmp_path), "x", b"one")
    write_inside(str(tmp_path), "x", b"two")
    assert (tmp_path / "x").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# --- property: symlinks planted anywhere never let anything out ----------------

_part = st.sampled_from(["a", "b", "c", "name"])


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(
    links=st.lists(st.lists(_part, min_size=1, max_size=3), max_size=3),
    names=st.lists(st.lists(_part, min_size=1, max_size=4), min_size=1, max_size=4),
    link_kind=st.sampled_from(["outside", "dir-outside", "file-outside", "dangling"]),
)
def test_no_symlink_lets_a_write_create_anything_outside(links, names, link_kind):
    with tempfile.TemporaryDirectory() as top:
        base, outside = os.path.join(top, "base"), os.path.join(top, "outside")
        os.mkdir(base)
        os.mkdir(outside)
        targets = {
            "outside": outside,
            "dir-outside": os.path.join(outside, "sub"),
            "file-outside": os.path.join(outside, "f"),
            "dangling": os.path.join(outside, "missing", "deeper"),
        }
        if link_kind == "file-outside":
            with open(targets["file-outside"], "w") as handle:
                handle.write("keep")
        elif link_kind == "dir-outside":
            os.mkdir(targets["dir-outside"])
        for parts in links:  # symlinks planted at arbitrary places inside base
            _plant(base, parts, targets[link_kind])
        before = sorted(os.walk(outside))
        for parts in names:
            with contextlib.suppress(ProtocolError, OSError):
                write_inside(base, "/".join(parts), b"x")
        assert sorted(os.walk(outside)) == before
        if link_kind == "file-outside":
            with open(targets["file-outside"]) as handle:
                assert handle.read() == "keep"


def _plant(base: str, parts: list[str], target: str) -> None:
    """Make real directories down to ``parts[:-1]`` (none through a symlink), then a
    symlink ``parts[-1]`` to ``target``; skip it if the way is taken."""
    where = base
    for part in parts[:-1]:
        where = os.path.join(where, part)
        if os.path.islink(where) or (
            os.path.exists(where) and not os.path.isdir(where)
        ):
            return
        if not os.path.exists(where):
            os.mkdir(where)
    with contextlib.suppress(FileExistsError):
        os.symlink(target, os.path.join(where, parts[-1]))


def test_a_file_that_cannot_be_linked_is_copied_a_piece_at_a_time(tmp_path):
    """Linking fails across file systems (or past a file's most links, EMLINK): the
    copy made instead held the whole file in memory (a depends file of several GiB
    on a node)."""
    size = 32 << 20
    if os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as source:  # another fs: EXDEV
        data = os.urandom(1 << 20)
        for _ in range(size >> 20):
            source.write(data)
        source.flush()
        tracemalloc.start()
        try:
            path = link_inside(str(tmp_path), "data/big.bin", source.name)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert os.stat(path).st_ino != os.stat(source.name).st_ino  # a copy
        assert os.path.getsize(path) == size
        with open(path, "rb") as handle:
            assert handle.read(1 << 20) == data
    assert peak < 4 << 20, peak
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "data") == ["big.bin"]


def test_a_copy_made_for_want_of_a_link_keeps_the_files_mode_and_times(tmp_path):
    """A program placed where it cannot be linked (another file system, EMLINK)
    stays executable, as its link would: the copy was made 0600, so a depends
    program sent executable failed with PermissionError there."""
    if os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as store:
        source = os.path.join(store, "tool.sh")
        with open(source, "w") as handle:
            handle.write("#!/bin/sh\necho ran\n")
        os.chmod(source, 0o755)
        os.utime(source, (946684800, 946684800))  # the store's 2000-01-01
        path = link_inside(str(tmp_path), "bin/tool.sh", source)
        assert os.stat(path).st_ino != os.stat(source).st_ino  # a copy
        assert os.stat(path).st_mode & 0o777 == 0o755
        assert os.stat(path).st_mtime == 946684800
        ran = subprocess.run([path], capture_output=True, text=True, timeout=30)
    assert ran.stdout == "ran\n", ran.stderr
