"""`FileUses`: a file is let go once the last job sent with it ended."""

from dispynb.protocol.fileuses import FileUses


def test_a_file_is_released_when_the_last_job_needing_it_ends() -> None:
    uses = FileUses()
    uses.need(["a", "b"])
    uses.need(["a"])
    assert uses.done(["a", "b"]) == ["b"]
    assert "a" in uses and "b" not in uses
    assert uses.done(["a"]) == ["a"]
    assert len(uses) == 0


def test_an_end_for_a_file_never_counted_releases_it_and_keeps_no_count() -> None:
    # A job counted on an earlier connection: the node is told to let it go.
    uses = FileUses()
    assert uses.done(["x"]) == ["x"]
    assert "x" not in uses
    assert len(uses) == 0
