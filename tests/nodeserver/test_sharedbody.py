"""`nodeserver.sharedbody`: large frames in reusable memfds, handed to workers."""

from __future__ import annotations

import gc
import os
import pickle

import pytest

from dispynb.protocol import serialize
from dispynb.protocol.framing import FrameDecoder, encode_frames, split_body
from nodeserver import sharedbody
from nodeserver.sharedbody import (
    MIN_SIZE,
    BodyPool,
    SharedBody,
    map_segments,
    segments,
    unmap,
)

pytestmark = pytest.mark.skipif(not sharedbody.AVAILABLE, reason="needs memfd")

MB = 1 << 20


def _body(view: bytearray | memoryview) -> SharedBody:
    assert isinstance(view, memoryview)
    body = view.obj
    assert type(body) is SharedBody
    return body


def test_small_frames_get_a_bytearray_large_ones_a_shared_view_of_their_size():
    pool = BodyPool()
    assert type(pool.take(MIN_SIZE - 1)) is bytearray
    view = pool.take(3 * MB + 5)
    assert isinstance(view, memoryview) and view.nbytes == 3 * MB + 5
    assert not view.readonly
    assert len(_body(view)) >= view.nbytes


def test_a_body_is_taken_again_only_once_nothing_refers_to_it():
    pool = BodyPool()
    first = pool.take(2 * MB)
    fd = _body(first).fd
    second = pool.take(2 * MB)
    assert _body(second).fd != fd  # the first is still in use
    part = first[10:20]  # a view of a view keeps it busy too
    del first
    assert _body(pool.take(2 * MB)).fd != fd
    del part
    again = pool.take(2 * MB)
    assert _body(again).fd == fd


def test_a_lease_keeps_a_body_busy_and_forget_retires_it():
    pool = BodyPool()
    view = pool.take(2 * MB)
    lease = _body(view)  # what a job sent to a worker holds
    del view
    assert _body(pool.take(2 * MB)).fd != lease.fd
    kept = pool.kept
    pool.forget(lease)
    assert pool.kept == kept - len(lease)
    del lease
    gc.collect()
    assert pool.kept <= kept


def test_the_pool_keeps_at_most_keep_bytes_and_release_lets_every_body_go():
    pool = BodyPool(keep_bytes=4 * MB)
    views = [pool.take(2 * MB) for _ in range(3)]
    assert pool.kept == 4 * MB  # the third is shared, not kept
    fds = [_body(v).fd for v in views]
    third = _body(views[2])
    assert third not in pool._bodies
    del views[2], third
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fds[2])  # freed, its descriptor closed
    busy = _body(views[0]).fd
    del views[1]
    pool.release()
    assert pool.kept == 0
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fds[1])  # free: freed at once
    os.fstat(busy)  # in use: freed once nothing refers to it
    del views
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(busy)


def test_no_memfd_to_be_had_falls_back_to_a_bytearray(monkeypatch):
    def no_memory(cls: type[SharedBody], capacity: int) -> SharedBody:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(SharedBody, "create", classmethod(no_memory))
    taken = BodyPool().take(2 * MB)
    assert type(taken) is bytearray and len(taken) == 2 * MB


def _received(pool: BodyPool, buffers: list[bytes]) -> list[memoryview]:
    """``buffers`` framed, then decoded by a decoder whose bodies come from
    ``pool``, as a client connection of the node server does."""
    head, parts = encode_frames(buffers)
    decoder = FrameDecoder(1 << 30)
    decoder.take_body = pool.take
    frames = []
    for piece in [head, *parts]:
        view = memoryview(piece)
        while view:
            space = decoder.buffer()
            step = min(len(space), len(view))
            space[:step] = view[:step]
            view = view[step:]
            frames.extend(decoder.filled(step))
    [(_prefix, count, body)] = frames
    got, _signed, _mac = split_body(body, count)
    return got


def test_a_jobs_buffers_in_a_frame_map_back_in_a_worker_with_their_contents():
    pool = BodyPool()
    data = os.urandom(3 * MB)
    pickled = serialize.dumps(((data, b"small"), {}))
    received = _received(pool, [b"header", *[bytes(b) for b in pickled]])
    job = received[1:]  # what the session gives the computation
    found = segments(job)
    assert found is not None
    body, layout = found
    assert len(layout) == 2 * len(job)
    mapping, views = map_segments(os.dup(body.fd), layout)
    assert [bytes(v) for v in views] == [bytes(b) for b in job]
    args, kwargs = serialize.loads(views)
    assert args == (data, b"small") and kwargs == {}
    del views
    assert unmap(mapping)
    assert sharedbody.MAPPINGS.held == len(body)  # kept for the body's next job
    assert sharedbody.MAPPINGS.release() == len(body)


def test_buffers_not_all_in_one_shared_body_travel_through_the_socket():
    pool = BodyPool()
    one = _received(pool, [b"h", os.urandom(2 * MB)])
    other = _received(pool, [b"h", os.urandom(2 * MB)])
    assert segments([]) is None
    assert segments([memoryview(bytearray(10))]) is None
    assert segments([one[0], other[0]]) is None
    assert segments([one[0][:0]]) is None  # empty
    assert segments([one[0].toreadonly()]) is None


@pytest.mark.parametrize(
    "layout",
    [[], [0], [-1, 10], [0, -1], [0, 3 * MB], [2 * MB, MB + 1], [1 << 62, 1]],
)
def test_a_layout_outside_the_body_is_refused_and_its_descriptor_closed(layout):
    body = SharedBody.create(2 * MB)
    fd = os.dup(body.fd)
    with pytest.raises(ValueError, match=r"layout|outside"):
        map_segments(fd, layout)
    with pytest.raises(OSError):
        os.fstat(fd)


class _Held:
    """An object unpickled from an out-of-band buffer without a copy (as a NumPy
    array is), keeping a view of the mapping. (A bytearray where it is pickled: a
    memoryview with an export in the pickler's reference cycle crashes CPython's
    garbage collector.)"""

    def __init__(self, buffer: bytearray | memoryview) -> None:
        self.buffer = buffer

    def __reduce_ex__(self, protocol: object) -> object:
        return _Held, (pickle.PickleBuffer(self.buffer),)


def test_unmap_says_when_an_unpickled_object_still_uses_the_mapping():
    pool = BodyPool()
    pickled = serialize.dumps(((_Held(bytearray(os.urandom(MB))),), {}))
    received = _received(pool, [b"h", *[bytes(b) for b in pickled]])
    found = segments(received[1:])
    assert found is not None
    mapping, views = map_segments(os.dup(found[0].fd), found[1])
    (held,), _ = serialize.loads(views)
    del views
    assert not unmap(mapping)  # `held` still refers to it
    held.buffer[0] ^= 1  # copy-on-write: the node's memory does not change
    assert bytes(held.buffer) != bytes(found[0][found[1][2] : found[1][2] + MB])
    del held
    gc.collect()
    assert unmap(mapping)


# -- a worker keeps its mappings of bodies from one job to the next -------------------


def _job_in(body: SharedBody, data: bytes) -> list[int]:
    """Write ``data`` into ``body`` as the node would receive it; its layout."""
    body[: len(data)] = data
    return [0, len(data)]


def test_a_pristine_mapping_is_kept_and_shows_the_nodes_next_contents():
    mappings = sharedbody.WorkerMappings()
    body = SharedBody.create(2 * MB)
    first, second = os.urandom(2 * MB), os.urandom(2 * MB)
    mapping, views = mappings.map(os.dup(body.fd), _job_in(body, first))
    assert bytes(views[0]) == first
    del views
    assert mappings.done(mapping)
    assert mappings.held == 2 * MB
    again, views = mappings.map(os.dup(body.fd), _job_in(body, second))
    assert again is mapping  # no new mapping, no page-table entries made again
    assert bytes(views[0]) == second  # the node's new bytes, not the old ones
    del views
    assert mappings.done(again)
    assert mappings.release() == 2 * MB
    assert mappings.held == 0 and mapping.closed


def test_a_mapping_the_job_wrote_to_is_unmapped_not_kept():
    mappings = sharedbody.WorkerMappings()
    body = SharedBody.create(2 * MB)
    data = os.urandom(2 * MB)
    mapping, views = mappings.map(os.dup(body.fd), _job_in(body, data))
    views[0][MB : MB + 1] = b"\0" if data[MB] else b"\1"  # copy-on-write page
    del views
    assert mappings.done(mapping)
    assert mappings.held == 0 and mapping.closed
    assert bytes(body[: 2 * MB]) == data  # the node's memory never changed
    again, views = mappings.map(os.dup(body.fd), [0, 2 * MB])
    assert bytes(views[0]) == data  # a fresh mapping: the node's bytes
    del views
    mappings.release()
    again.close()


def test_a_mapping_still_in_use_is_neither_kept_nor_unmapped():
    mappings = sharedbody.WorkerMappings()
    body = SharedBody.create(2 * MB)
    mapping, views = mappings.map(os.dup(body.fd), _job_in(body, os.urandom(MB)))
    kept_view = views[0]
    del views
    assert not mappings.done(mapping)  # an object still refers to it
    assert mappings.held == 0 and not mapping.closed
    del kept_view
    mapping.close()


def test_kept_mappings_are_bounded_oldest_unmapped_first():
    mappings = sharedbody.WorkerMappings(keep_bytes=4 * MB)
    bodies = [SharedBody.create(2 * MB) for _ in range(3)]
    maps = []
    for body in bodies:
        mapping, views = mappings.map(os.dup(body.fd), _job_in(body, b"x" * MB))
        del views
        assert mappings.done(mapping)
        maps.append(mapping)
    assert mappings.held == 4 * MB
    assert maps[0].closed and not maps[1].closed and not maps[2].closed
    assert mappings.release() == 4 * MB


# -- sealed: arguments that are all copies leave nothing to write through ----------


def _no_page_walk(mapping):
    raise AssertionError("a sealed mapping's pages were read")


def test_a_mapping_whose_arguments_were_all_copied_is_kept_without_a_page_walk(
    monkeypatch,
):
    mappings = sharedbody.WorkerMappings()
    body = SharedBody.create(2 * MB)
    data = os.urandom(MB)
    pickled = serialize.dumps(((data,), {}))  # a bytes argument: unpickled as a copy
    layout, offset = [], 0
    for part in pickled:
        part = bytes(part)
        body[offset : offset + len(part)] = part
        layout += [offset, len(part)]
        offset += len(part)
    mapping, views = mappings.map(os.dup(body.fd), layout)
    (got,), _ = serialize.loads(views)
    assert got == data
    assert mappings.seal(mapping, views)
    with pytest.raises(ValueError):
        bytes(views[0])  # let go: nothing is left to write to the mapping through
    del views
    monkeypatch.setattr(sharedbody, "_pristine", _no_page_walk)
    assert mappings.done(mapping)
    assert mappings.held == 2 * MB  # kept for the next job
    mappings.release()


@pytest.mark.parametrize("how", ["the view itself", "a view of the view"])
def test_a_mapping_an_argument_still_uses_is_not_sealed_and_its_pages_are_read(
    how, monkeypatch
):
    mappings = sharedbody.WorkerMappings()
    body = SharedBody.create(2 * MB)
    data = os.urandom(2 * MB)
    mapping, views = mappings.map(os.dup(body.fd), _job_in(body, data))
    # What a zero-copy argument (a NumPy array made from a buffer) holds on to.
    held = views[0] if how == "the view itself" else memoryview(views[0])[MB:]
    assert not mappings.seal(mapping, views)
    assert bytes(held[:16]) == (
        data[:16] if how == "the view itself" else data[MB:][:16]
    )
    held[0:1] = b"\0" if held[0] else b"\1"  # the job writes: copy-on-write page
    del held, views
    walked = []
    real = sharedbody._pristine
    monkeypatch.setattr(sharedbody, "_pristine", lambda m: walked.append(m) or real(m))
    assert mappings.done(mapping)
    assert walked and mappings.held == 0 and mapping.closed  # written: not kept
    assert bytes(body[: 2 * MB]) == data  # the node's memory never changed
