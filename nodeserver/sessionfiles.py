"""The files a client sends its node: checked against the node's limits and its
transfer quota, stored (a large one off the loop), held while the session lives,
and placed in a computation's directory when a job asks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dispynb.errors import MessageError, ProtocolError
from dispynb.protocol.files import safe_relative_path
from dispynb.protocol.messages import (
    ComputationFailed,
    FilePlace,
    FilePlaced,
    FilePut,
    FileRelease,
)
from nodeserver.filestore import CannotStore, DiskFull
from nodeserver.sessionstate import _SessionState

#: Files of at least this many bytes are checked against their digest and written in
#: a thread, not on the loop: hashing 100 MB takes long enough for the node's pulses
#: to stop and its clients to declare it dead. This session reads its next message
#: once the file is stored, so the order of its messages holds.
HASH_OFF_LOOP_BYTES = 1 << 20


class _SessionFiles(_SessionState):
    """The session's part that takes files (see the module docstring)."""

    def _check_files(self, entries: list[list[Any]]) -> list[tuple[str, str, bool]]:
        """``(path, digest, executable)`` of each file a computation depends on."""
        files = []
        for entry in entries:
            if (
                len(entry) not in (3, 4)
                or not isinstance(entry[2], int)
                or entry[3:] not in ([], [True])
            ):
                raise ProtocolError("malformed file entry in computation-setup")
            path, digest, size = entry[:3]
            self.server.store.check_size(size, f"file {path!r}")
            self.server.store.path(digest)  # validates the digest
            files.append((safe_relative_path(path), digest, len(entry) == 4))
        return files

    def _job_files(self, entries: Any) -> list[tuple[str, str, bool]]:
        """``(path, digest, executable)`` of each file a job was given."""
        if not isinstance(entries, list):
            raise MessageError("malformed job files in job-submit")
        files = []
        for entry in entries:
            if (
                not isinstance(entry, list)
                or len(entry) not in (2, 3)
                or entry[2:] not in ([], [True])
            ):
                raise MessageError("malformed job file entry in job-submit")
            self.server.store.path(entry[1])  # validates the digest
            files.append((safe_relative_path(entry[0]), entry[1], len(entry) == 3))
        return files

    def _check_quota(self, size: int, what: str) -> None:
        """Raise `ProtocolError` if ``size`` more bytes of files would pass the
        node's per-computation transfer quota."""
        quota = self.server.config.transfer_quota
        if quota and self._transferred + size > quota:
            raise ProtocolError(
                f"{what} of {size} bytes would take this computation's files past the "
                f"node's transfer quota of {quota} bytes ({self._transferred} held "
                "already; dispynb-node --transfer-quota)"
            )

    def _on_file_put(self, message: FilePut, buffers: list[memoryview]) -> None:
        if len(buffers) != 1 or buffers[0].nbytes != message.size:
            raise MessageError("file-put carries one buffer of the announced size")
        store = self.server.store
        try:
            self._check_quota(message.size, "a file")
            self._transferred += message.size
            self._file_sizes[message.digest] = (
                self._file_sizes.get(message.digest, 0) + message.size
            )
            # Held before it is stored (maybe in a thread): the store's cache must
            # not remove a copy it already has meanwhile.
            self._hold_file(message.digest)
            if message.size >= HASH_OFF_LOOP_BYTES and not store.has(message.digest):
                self._deferred_file = (message, buffers[0])  # `serve` stores it
                return
            try:
                store.put(message.digest, buffers[0])
            except DiskFull:
                if not store.make_room(message.size):
                    raise
                store.put(message.digest, buffers[0])  # room made: once more
        except ProtocolError as exc:
            self._refuse_file(message.digest, exc)
            return
        self._file_stored(message.digest)

    async def _store_file_off_loop(self, message: FilePut, data: memoryview) -> None:
        """Check a large file's digest and write it in a thread (the loop, and so
        the node's pulses and other clients, go on meanwhile)."""
        store = self.server.store
        try:
            try:
                await asyncio.to_thread(store.put, message.digest, data)
            except DiskFull:
                if not store.make_room(message.size):
                    raise
                await asyncio.to_thread(store.put, message.digest, data)
        except ProtocolError as exc:
            self._refuse_file(message.digest, exc)
            return
        self._last_heard = time.monotonic()
        self._file_stored(message.digest)

    def _refuse_file(self, digest: str, exc: ProtocolError) -> None:
        """Refuse this file only; whatever needs it is told why. A setup waiting for
        a file this node cannot store fails now: its client will not send it again
        (as it may a file whose bytes did not match), so both would wait for ever."""
        # A count past the first (`Tally`): a line each let a client flood the log.
        self.server.message_refusals.event(
            "files refused", str(self.conn.peer), str(exc)
        )
        self._refused_files[digest] = str(exc)
        if not isinstance(exc, CannotStore):
            return
        for comp_id, (missing, _start) in list(self._waiting_for_files.items()):
            if digest not in missing:
                continue
            self._stop_waiting_for_files(comp_id)
            self._computations.pop(comp_id, None)
            recovery = self._recovery.pop(comp_id, None)
            if recovery is not None:
                self.server.keeper.release(recovery[0])
            self.outbox.write(
                ComputationFailed(
                    comp_id=comp_id, message=f"a file of its setup was refused: {exc}"
                )
            )

    def _on_file_release(self, message: FileRelease, buffers: list[memoryview]) -> None:
        """The client's jobs that needed these files have ended: the session lets
        them go (the store keeps them as a cache, within its size), and they no
        longer count in its transfer quota. A job that needs one later gets it
        sent again first."""
        if not isinstance(message.digests, list) or not all(
            isinstance(digest, str) for digest in message.digests
        ):
            raise MessageError("malformed digests in file-release")
        store = self.server.store
        for digest in message.digests:
            store.path(digest)  # validates the digest (ProtocolError)
            self._refused_files.pop(digest, None)  # may be sent again, and fit
            if digest in self._file_holds:
                self._file_holds.discard(digest)
                self._transferred -= self._file_sizes.pop(digest, 0)
                store.release(digest)

    def _hold_file(self, digest: str) -> None:
        """Keep the stored file for as long as this session lives (the store's
        cache would otherwise remove it once nobody holds it)."""
        if digest not in self._file_holds:
            self._file_holds.add(digest)
            self.server.store.hold(digest)

    def _file_stored(self, digest: str) -> None:
        self._hold_file(digest)
        for comp_id, (missing, start) in list(self._waiting_for_files.items()):
            missing.discard(digest)
            if not missing:
                del self._waiting_for_files[comp_id]
                self._spawn(start)

    def _on_file_place(self, message: FilePlace, buffers: list[memoryview]) -> None:
        computation = self._computations.get(message.comp_id)
        error = ""
        if computation is None:
            error = "the computation is not set up on this node"
        else:
            try:
                path = safe_relative_path(message.path)
                refused = self._refused_files.get(message.digest)
                if refused is not None:
                    raise ProtocolError(refused)
                self.server.store.place(
                    message.digest, computation.path, path, message.executable
                )
            except (ProtocolError, OSError) as exc:
                error = str(exc)
        self.outbox.write(
            FilePlaced(comp_id=message.comp_id, request=message.request, error=error)
        )

    def _stop_waiting_for_files(self, comp_id: int) -> None:
        """A computation waiting for its files closes: it never starts."""
        waiting = self._waiting_for_files.pop(comp_id, None)
        if waiting is not None:
            waiting[1].close()  # its files never all arrived: it never started

    def _end_files(self) -> None:
        """The session ended: computations still waiting for files never start, and
        the store may remove the files this client sent."""
        for _missing, start in self._waiting_for_files.values():
            start.close()  # never started: the files did not all arrive
        self._waiting_for_files.clear()
        for digest in self._file_holds:
            self.server.store.release(digest)
        self._file_holds.clear()
