"""`nodeserver.leftovers`: what a note names is removed by a sweep only if it lies
within the node's directory; a damaged note removes nothing and is dropped."""

from __future__ import annotations

import json
from pathlib import Path

from nodeserver.leftovers import NOTES, Removals


def test_a_sweep_removes_what_is_noted_and_forgets_what_is_done(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    home = dest / "client-1-1"
    noted, finished = home / "comp-1", home / "comp-2"
    for path in (noted, finished):
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "file").write_text("x")
    removals = Removals(str(dest))
    removals.note(str(noted), str(home))
    removals.done(removals.note(str(finished), str(home)))
    assert Removals(str(dest)).sweep() == 1
    assert not noted.exists()
    assert (finished / "sub" / "file").exists()  # its note was done: kept
    assert list((dest / NOTES).iterdir()) == []


def test_a_sweep_keeps_a_directory_noted_as_kept_and_forgets_its_note(
    tmp_path: Path,
) -> None:
    """``cleanup=False``: the directory is the user's. A note of an older node (no
    "keep") named only directories to remove."""
    dest = tmp_path / "dest"
    home = dest / "client-1-1"
    kept, old = home / "comp-1", home / "comp-2"
    for path in (kept, old):
        (path / "file").parent.mkdir(parents=True)
        (path / "file").write_text("x")
    Removals(str(dest)).note(str(kept), str(home), keep=True)
    (dest / NOTES / "old").write_text(json.dumps({"path": str(old), "home": None}))
    assert Removals(str(dest)).sweep() == 1
    assert (kept / "file").exists() and not old.exists()
    assert list((dest / NOTES).iterdir()) == []


def test_a_note_naming_a_place_outside_the_directory_removes_nothing(
    tmp_path: Path,
) -> None:
    """Notes are files a job running as the node's user could write: one naming
    the node's directory itself, a place outside it or through a symbolic link out
    of it, or one that is no JSON, removes nothing (and is dropped)."""
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (dest / "link").parent.mkdir(parents=True)
    (dest / "link").symlink_to(outside)
    notes = dest / NOTES
    notes.mkdir()
    for name, path in [
        ("a", str(outside)),
        ("b", str(dest)),
        ("c", str(dest / "link" / "keep")),
        ("d", str(dest / ".." / "outside")),
    ]:
        (notes / name).write_text(json.dumps({"path": path, "home": str(tmp_path)}))
    (notes / "e").write_text("not json")
    (notes / "f").write_text(json.dumps(["no", "keys"]))
    assert Removals(str(dest)).sweep() == 0
    assert (outside / "keep").is_dir() and dest.is_dir()
    assert list(notes.iterdir()) == []


def test_beside_a_running_node_a_sweep_follows_only_the_notes_of_nodes_gone(
    tmp_path: Path,
) -> None:
    """Another node runs on the directory: its notes (this process's here), and
    those of an older node that named none, are left with what they name; a gone
    node's are followed, but not into a directory a running node noted too."""
    dest = tmp_path / "dest"
    home = dest / "client"
    mine, gone, shared, old = (
        home / name for name in ("mine", "gone", "shared", "old")
    )
    for path in (mine, gone, shared, old):
        path.mkdir(parents=True)
    removals = Removals(str(dest))
    removals.note(str(mine), str(home))
    removals.note(str(shared), str(home))
    for path in (gone, shared):
        name = removals.note(str(path), str(home))
        note = dest / NOTES / name
        entry = json.loads(note.read_text())
        entry["node"][1] = -1  # this pid's process of another start: gone
        note.write_text(json.dumps(entry))
    (dest / NOTES / "old").write_text(json.dumps({"path": str(old), "home": None}))
    assert Removals(str(dest)).sweep(alone=False) == 1
    assert not gone.exists()
    assert mine.is_dir() and shared.is_dir() and old.is_dir()
    assert len(list((dest / NOTES).iterdir())) == 3  # the running one's, the old one


def test_beside_running_nodes_a_note_of_another_machine_is_never_followed(
    tmp_path: Path,
) -> None:
    """A --dest-path on NFS holds the notes of nodes running on other machines (or
    in other containers): their pids mean nothing here, so they are not taken for
    gone, nor what they name removed."""
    dest = tmp_path / "dest"
    there = dest / "client" / "there"
    there.mkdir(parents=True)
    name = Removals(str(dest)).note(str(there), str(dest / "client"))
    note = dest / NOTES / name
    for field, other in ((2, "another-boot-id"), (3, 12345)):
        entry = json.loads(note.read_text())
        entry["node"][1] = -1  # gone, were it of this machine
        entry["node"][field] = other
        note.write_text(json.dumps(entry))
        assert Removals(str(dest)).sweep(alone=False) == 0
        assert there.is_dir() and note.exists()
