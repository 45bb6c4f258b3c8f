"""Shared memory references (dispynb.protocol.shm): round trip, refusals, the check."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.errors import SerializationError
from dispynb.protocol import serialize, shm
from dispynb.protocol.shmpool import SegmentPool


@pytest.fixture
def pool() -> Iterator[SegmentPool]:
    """A client's segment pool; closed afterwards whatever happened."""
    made = SegmentPool()
    yield made
    made.close()


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Names a test creates by hand; unlinked afterwards whatever happened."""
    made: list[str] = []
    yield made
    for name in made:
        shm.unlink(name)


def exists(name: str) -> bool:
    return (shm.SHM_DIR / name).exists()


def test_round_trip_copies_the_arguments_out(pool: SegmentPool) -> None:
    payload = (os.urandom(3_000_000), bytearray(b"z" * 100_000), [1, "two"])
    buffers = serialize.dumps((payload, {}))
    name, reference = pool.write(buffers)
    info = (shm.SHM_DIR / name).stat()
    assert info.st_mode & 0o777 == 0o600
    assert shm.is_reference([reference]) and not shm.is_reference(buffers)
    assert shm.reference_name(reference) == name
    args, kwargs = shm.load_reference(reference, serialize.loads)
    assert args == payload and kwargs == {}
    assert exists(name)  # the client's: it reuses it for the next job
    args[1][0] = ord("y")  # the job's own copy: writable, private
    # The client rewrites the object for another job: this job's arguments stay.
    pool.release(name)
    pool.write([b"\0" * 3_200_000])
    assert args == ((payload[0], bytearray(b"y" + b"z" * 99_999), [1, "two"]))


def test_an_argument_that_would_keep_a_view_gets_a_private_copy(
    pool: SegmentPool,
) -> None:
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(500_000, dtype=numpy.int64)  # out-of-band: a view if mapped
    name, reference = pool.write(serialize.dumps(((array,), {})))
    (args, _kwargs) = shm.load_reference(reference, serialize.loads)
    pool.release(name)
    pool.write([b"\xff" * 4_000_000])  # the same object, rewritten
    assert pool.reused == 1
    assert numpy.array_equal(args[0], array)
    args[0][0] = 7  # writable


def test_names_are_unguessable(pool: SegmentPool) -> None:
    made = set()
    for _ in range(20):
        name, _reference = pool.write([b"x"])
        made.add(name)
        pool.release(name)  # reused: the same object under a new name each time
    assert pool.created == 1 and pool.reused == 19
    assert len(made) == 20
    assert all(len(n) == len("dnb-") + 32 for n in made)
    assert not any(exists(n) for n in made)  # each job's name died with the job


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "sem.mp-abc", "dnb-1234", "dnb-" + "G" * 32, 7],
)
def test_malformed_names_are_refused(name: object) -> None:
    reference = (
        shm.MAGIC + f'{{"name": {name!r}, "sizes": [1]}}'.replace("'", '"').encode()
    )
    with pytest.raises(SerializationError, match="refused shared memory name"):
        shm.open_reference(reference)


def test_guessed_name_that_does_not_exist_is_refused() -> None:
    reference = shm.MAGIC + b'{"name": "dnb-' + b"0" * 32 + b'", "sizes": [5]}'
    with pytest.raises(SerializationError, match="cannot open the job's shared"):
        shm.open_reference(reference)


def test_wrong_size_is_refused_and_left_alone(pool: SegmentPool) -> None:
    name, _ = pool.write([b"abcdef"])
    forged = shm.MAGIC + f'{{"name": "{name}", "sizes": [2000000]}}'.encode()
    with pytest.raises(SerializationError, match="2000000 announced"):
        shm.open_reference(forged)
    assert exists(name)


def test_symlink_is_refused(tmp_path: Path, names: list[str]) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"hello")
    name = "dnb-" + os.urandom(16).hex()
    (shm.SHM_DIR / name).symlink_to(target)
    names.append(name)
    reference = shm.MAGIC + f'{{"name": "{name}", "sizes": [5]}}'.encode()
    with pytest.raises(SerializationError, match="cannot open"):
        shm.open_reference(reference)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_another_users_object_is_refused(pool: SegmentPool) -> None:
    name, reference = pool.write([b"abc"])
    os.chown(shm.SHM_DIR / name, 65534, 65534)
    with pytest.raises(SerializationError, match="not a regular object of this user"):
        shm.open_reference(reference)


def test_malformed_reference_is_refused() -> None:
    with pytest.raises(SerializationError, match="malformed"):
        shm.open_reference(shm.MAGIC + b"{not json")
    with pytest.raises(SerializationError, match="bad sizes"):
        shm.open_reference(
            shm.MAGIC + b'{"name": "dnb-' + b"0" * 32 + b'", "sizes": [-1]}'
        )


def test_each_buffer_is_read_into_the_object_the_unpickler_keeps(
    pool: SegmentPool,
) -> None:
    data, scratch = os.urandom(2_000_000), bytearray(os.urandom(300_000))
    buffers = serialize.dumps(((data, scratch), {}))
    name, reference = pool.write(buffers)
    read = shm.read_reference(reference)
    # The pickle and the bytes argument come back as bytes (the unpickler takes
    # them as they are), the bytearray as a bytearray: one copy each, no mapping.
    assert [type(b) for b in read] == [bytes, bytes, bytearray]
    assert read[1] == data and read[2] == scratch
    ((got_data, got_scratch), _kwargs) = serialize.loads(list(read))
    assert got_data is read[1] and got_scratch is read[2]
    assert name not in Path("/proc/self/maps").read_text()


def test_a_reference_without_writability_keeps_arguments_writable(
    pool: SegmentPool,
) -> None:
    scratch = bytearray(b"w" * 200_000)
    name, reference = pool.write(serialize.dumps(((b"r" * 200_000, scratch), {})))
    older = (
        shm.MAGIC
        + json.dumps(
            {"name": name, "sizes": json.loads(reference[len(shm.MAGIC) :])["sizes"]}
        ).encode()
    )  # what a sender before writability was sent wrote
    ((data, got), _kwargs) = shm.load_reference(older, serialize.loads)
    assert data == b"r" * 200_000 and type(data) is bytes
    assert got == scratch and type(got) is bytearray


def test_malformed_writability_is_refused(pool: SegmentPool) -> None:
    name, _reference = pool.write([b"abc"])
    for writable in ("[true, false]", '"yes"', "[1]"):
        forged = shm.MAGIC + (
            f'{{"name": "{name}", "sizes": [3], "writable": {writable}}}'.encode()
        )
        with pytest.raises(SerializationError, match="bad writable"):
            shm.read_reference(forged)


def test_same_machine() -> None:
    boot, ns = shm.boot_id(), shm.pid_namespace()
    assert boot and ns
    assert shm.same_machine("127.0.0.1", boot, os.getpid(), ns)
    assert shm.same_machine("::1", boot, os.getpid(), ns)
    # Another host (or network namespace) has another address: never.
    assert not shm.same_machine("10.0.0.2", boot, os.getpid(), ns)
    # A loopback tunnel to another machine: another boot id.
    assert not shm.same_machine("127.0.0.1", "f" * 36, os.getpid(), ns)
    assert not shm.same_machine("127.0.0.1", "", os.getpid(), ns)  # an older node
    assert not shm.same_machine("127.0.0.1", boot, 0, ns)
    assert not shm.same_machine("not an address", boot, os.getpid(), ns)
    assert not shm.same_machine("127.0.0.1", boot, 2**22 + 12345, ns)  # no such process
    # An older node, or another pid namespace (where its pid is another process's).
    assert not shm.same_machine("127.0.0.1", boot, os.getpid(), 0)
    assert not shm.same_machine("127.0.0.1", boot, os.getpid(), ns + 1)


def test_same_machine_refuses_a_node_with_a_private_dev_shm(tmp_path: Path) -> None:
    """A node in its own mount namespace with another /dev/shm: not the same memory."""
    import subprocess
    import sys

    code = "import sys; sys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()"
    proc = subprocess.Popen(
        [
            "unshare", "-m", "sh", "-c",
            f"mount -t tmpfs none /dev/shm && exec {sys.executable} -c \"{code}\"",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ok\n"
        assert os.stat(f"/proc/{proc.pid}").st_uid == os.geteuid()
        assert not shm.same_machine(
            "127.0.0.1", shm.boot_id(), proc.pid, shm.pid_namespace()
        )
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.slow
def test_same_machine_sees_a_node_of_its_user_that_is_not_dumpable(
    tmp_path: Path,
) -> None:
    """A node is not dumpable (its user's processes cannot read its /proc/PID/root):
    a client of its user still finds it shares its /dev/shm. Both run as nobody
    (root reads any process's /proc)."""
    import shutil
    import subprocess
    import sys

    from tests.hostile.tools import AS_NOBODY
    from tests.nodeproc import ROOT, node_env, start_node

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running a node as another user needs root and setpriv")
    # Sticky, as /tmp: a node refuses a --dest-path under one anyone may rename.
    os.chmod(tmp_path, 0o1777)
    node = start_node(tmp_path / "node", launcher=AS_NOBODY)
    try:
        check = (
            "from dispynb.protocol import shm; "
            "print(shm.same_machine('127.0.0.1', shm.boot_id(), "
            f"{node.proc.pid}, shm.pid_namespace()))"
        )
        # setpriv without the capabilities AS_NOBODY keeps: a plain user.
        plain = AS_NOBODY[: AS_NOBODY.index("--clear-groups") + 1]
        seen = subprocess.run(
            [*plain, sys.executable, "-c", check],
            capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=30,
        )  # fmt: skip
    finally:
        node.stop()
    assert seen.stdout.strip() == "True", seen.stderr


def test_unlink_ignores_gone_and_foreign_names(tmp_path: Path) -> None:
    shm.unlink("dnb-" + "0" * 32)  # gone: no error
    # Never a name that is not dispynb's: beside its own, or outside the directory.
    beside = shm.SHM_DIR / f"not-dispynb-{os.getpid()}"
    outside = tmp_path / "x"
    beside.touch()
    outside.touch()
    try:
        shm.unlink(beside.name)
        shm.unlink(os.path.relpath(outside, shm.SHM_DIR))  # ../../tmp/...
        assert beside.exists() and outside.exists()
    finally:
        beside.unlink(missing_ok=True)
