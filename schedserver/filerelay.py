"""Files between the shared scheduler's clients and nodes: kept (on disk) as clients
send them, given to the nodes that ask for them, placed with ``send_file``."""

from __future__ import annotations

import dataclasses

from dispynb.protocol.chunks import fit_message
from dispynb.protocol.files import digest_of
from dispynb.protocol.messages import (
    ComputationFailed,
    FilePlace,
    FilePlaced,
    FilePut,
    FilesMissing,
)
from schedserver.computation import SharedComputation, Upstream
from schedserver.nodelimits import file_over_node
from schedserver.session import SchedulerSession
from schedserver.state import _ServerState, logger

#: A computation's ``send_file`` requests waiting for their nodes at most: each
#: writes the whole file to every node, and a client waits for each answer (a
#: user's 3,000 at once queued 3,000 copies of her file for each node).
MAX_PLACEMENTS = 64


class _FileRelay(_ServerState):
    """Files from the clients, on their way to the nodes."""

    def file_put(
        self, session: SchedulerSession, message: FilePut, buffers: list[memoryview]
    ) -> str:
        """A client sent a file: keep it (on disk) for the nodes (that asked, or
        will), as long as a computation that lists it, or ``session``, lives.

        Returns why it was refused ("" if kept): the content must match its digest
        (files are shared by digest between users) and fit --max_file_size.
        """
        if len(buffers) != 1 or digest_of(buffers[0]) != message.digest:
            return f"file {message.digest[:16]}... does not match its digest: refused"
        if buffers[0].nbytes != message.size:
            # Passed on as it came to the nodes waiting for it (other users'
            # computations too), each of which would end its connection.
            return (
                f"file {message.digest[:16]}... announced {message.size!r} bytes "
                f"and holds {buffers[0].nbytes}: refused"
            )
        refused = self.files.put(message.digest, buffers[0], session, session.user)
        if refused:
            self._setups_refused(session, message.digest, refused)
            return refused
        for comp, upstream in self._wanted.pop(message.digest, set()):
            self._put_file(comp, upstream, message.digest, buffers[0])
        return ""

    def _put_file(
        self, comp: SharedComputation, upstream: Upstream, digest: str, data: memoryview
    ) -> bool:
        """Send a file ``comp``'s setup lists to ``upstream``'s node, unless it is
        over what the node takes: ``comp`` is then refused there, saying so (the
        node would end the connection). False if not sent."""
        too_large = file_over_node(
            _listed_path(comp, digest), data.nbytes, upstream.node.max_message_size
        )
        if too_large:
            self.refuse_upstream(comp, upstream, too_large)
            return False
        self.write(upstream, FilePut(digest=digest, size=data.nbytes), [data])
        return True

    def _setups_refused(
        self, session: SchedulerSession, digest: str, refused: str
    ) -> None:
        """A file ``session`` sent was not kept: its computations being set up that
        list it fail now, saying why (their nodes would wait for it for ever, and
        so would the client)."""
        for comp in session.computations.values():
            if comp.ready_sent or comp.closing:
                continue
            if any(entry[1] == digest for entry in comp.setup.files):
                comp.ready_sent = True  # answered: no ready after this
                comp.to_client(ComputationFailed(comp_id=comp.comp_id, message=refused))

    def file_release(self, session: SchedulerSession, digests: list[str]) -> None:
        """The client's jobs that needed these files ended: the files its session
        uploaded go, unless a computation lists them or another session's uploaded
        them too. The client sends a file again before a later job that needs it."""
        self.files.release_some(session, digests)
        self.room_freed(session.user)

    def _give_files(
        self, comp: SharedComputation, upstream: Upstream, digests: list[str]
    ) -> None:
        """A node of ``comp`` asks for these files (`FilesMissing`): those kept here
        go to it; the others are asked of the client, in messages it takes (a
        computation listing 60,000 files was asked for all in one of 3.9 MB, which
        a client taking 1 MB dropped, with the scheduler). Only files its setup
        lists are given or asked for: a node asking for others is logged once."""
        if not all(isinstance(digest, str) for digest in digests):
            logger.warning(
                "node %s asked for files by malformed digests: none sent",
                upstream.node.name,
            )
            return
        listed = {entry[1] for entry in comp.setup.files}
        missing = []
        unlisted = 0
        for digest in digests:
            if digest not in listed:
                unlisted += 1
                continue
            data = self.files.get(digest)
            if data is not None:
                sent = self._put_file(comp, upstream, digest, data)
                del data  # the connection holds the map until it is written
                if not sent:
                    return
            else:
                self._wanted.setdefault(digest, set()).add((comp, upstream))
                missing.append(digest)
        if unlisted and upstream.node.name not in comp.foreign_senders:
            comp.foreign_senders.add(upstream.node.name)
            logger.warning(
                "%s: node %s asked for %d files its setup does not list: not "
                "given (more such from it are not logged)",
                comp.name,
                upstream.node.name,
                unlisted,
            )
        if missing:
            asked = FilesMissing(comp_id=comp.comp_id, digests=missing)
            for part, _none in fit_message(asked, [], comp.client_max):
                comp.to_client(part)

    def _release_files(self, comp: SharedComputation) -> None:
        """``comp`` closed: drop the files only it needed, and its wishes."""
        self.files.release(comp)
        for digest in list(self._wanted):
            wanted = {w for w in self._wanted[digest] if w[0] is not comp}
            if wanted:
                self._wanted[digest] = wanted
            else:
                del self._wanted[digest]

    def file_place(self, comp: SharedComputation, message: FilePlace) -> None:
        """``send_file``: place the file on every node where ``comp`` is ready
        (`MAX_PLACEMENTS` requests of it waiting for their nodes at most)."""
        ready = [u for u in comp.upstream.values() if u.ready and u.conn is not None]
        error = ""
        if not ready:
            error = "no node is ready for this computation"
        elif len(comp.placements) >= MAX_PLACEMENTS:
            error = (
                f"refused: {MAX_PLACEMENTS} send_file requests of this computation "
                "wait for their nodes already, the most the scheduler takes at once "
                "(each writes the whole file to every node): wait for their answers"
            )
        if error:
            comp.to_client(
                FilePlaced(comp_id=comp.comp_id, request=message.request, error=error)
            )
            return
        comp.placements[message.request] = [{u.node.name for u in ready}, ""]
        data = self.files.get(message.digest)
        for upstream in ready:
            limit = upstream.node.max_message_size
            too_large = data is not None and file_over_node(
                message.path, data.nbytes, limit
            )
            if too_large:  # (the node would end the connection)
                comp.placed(
                    upstream,
                    FilePlaced(
                        comp_id=comp.comp_id,
                        request=message.request,
                        error=f"node {upstream.node.name}: {too_large}",
                    ),
                )
                continue
            if data is not None:
                self.write(
                    upstream, FilePut(digest=message.digest, size=data.nbytes), [data]
                )
            self.write(upstream, dataclasses.replace(message, comp_id=comp.comp_id))


def _listed_path(comp: SharedComputation, digest: str) -> str:
    """The path ``comp``'s setup lists the file ``digest`` under (for messages)."""
    return next((e[0] for e in comp.setup.files if e[1] == digest), digest[:16])
