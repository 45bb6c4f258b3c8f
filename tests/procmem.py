"""A process's own memory, as tests that bound it measure it (Linux, /proc)."""

from __future__ import annotations


def private_memory(pid: int) -> int:
    """Bytes of process ``pid``'s resident memory that are its own: anonymous (heap,
    buffers, a copy of a file) and shared memory it maps (message bodies). Not the
    pages of files it maps (its code, which a path run for the first time faults in
    by MiBs, e.g. the cryptography library's; a file it sends from a map), which the
    kernel shares and drops at will."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value
    return sum(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssShmem"))
