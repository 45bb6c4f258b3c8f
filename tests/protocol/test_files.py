"""File names from peers: validation and writing that never leaves its folder."""

from __future__ import annotations

import os

import pytest

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
