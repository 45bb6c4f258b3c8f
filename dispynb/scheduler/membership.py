"""`DriverNodes`: the driver's nodes: connect, set up, read, watch, lose, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Collection

from dispynb import config as dispy_config
from dispynb.defaults import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT
from dispynb.errors import ClusterError, DispynbError, NodeLostError, SetupError
from dispynb.protocol import shm
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationSetup,
    Message,
    Ping,
    Welcome,
)
from dispynb.scheduler.events import (
    CancelRequested,
    NodeJoined,
    NodeLeft,
)
from dispynb.scheduler.link import (
    DEAD_AFTER,
    RECONNECT_DELAY,
    RECONNECT_DELAY_MAX,
    RECONNECT_FOR,
    Allocator,
    NodeLink,
)
from dispynb.scheduler.outbox import file_entry
from dispynb.scheduler.results import DriverResults
from dispynb.secret import is_credential
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection, describe_error
from dispynb.transport.connector import connect, not_listening, out_of_descriptors

#: The driver's logger (one name for all its parts, as users configure it).
logger = logging.getLogger("dispynb.scheduler.driver")


class DriverNodes(DriverResults):
    """Connecting, setting up, reading and losing nodes (dispy's node management)."""

    #: "node ... cannot be used" warnings held back (`hold_failure_warnings`).
    _held_warnings: list[tuple[str, str, str, DispynbError]] | None = None

    # -- nodes ---------------------------------------------------------------------

    def add_node(self, host: str, port: int, allocate: Allocator) -> asyncio.Task[None]:
        """Connect to a node and set the computation up on it.

        ``allocate(welcome, peer_ip)`` returns ``(cpus, bundle, files)``: the CPUs to
        use (0 rejects the node), the pickled computation and the files it needs.
        """
        link = self.nodes.get(format_address(host, port)) or self._new_link(host, port)
        return self._spawn(self._join(link, allocate))

    def _new_link(self, host: str, port: int) -> NodeLink:
        """Register a node being connected (it counts as one that may come)."""
        link = NodeLink(node_id=format_address(host, port), host=host, port=port)
        self.nodes[link.node_id] = link
        self._connecting += 1
        link.setting_up = True
        self._watch()
        return link

    async def _connect(self, host: str, port: int) -> tuple[Connection, Welcome]:
        config = self.config
        # dispy's ``dispy.config.MsgTimeout`` scales both timeouts (slow links).
        scale = max(dispy_config.MsgTimeout, 0.1) / dispy_config.DEFAULT_MSG_TIMEOUT
        return await connect(
            host,
            port,
            timeout=CONNECT_TIMEOUT * scale,
            handshake_timeout=HANDSHAKE_TIMEOUT * scale,
            secret=config.secret,
            max_message_size=config.max_message_size,
            ssl_context=config.ssl_context,
            name=config.client_name,
        )

    async def _join(self, link: NodeLink, allocate: Allocator) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RECONNECT_FOR
        delay = RECONNECT_DELAY
        while True:
            try:
                conn, welcome = await self._connect(link.host, link.port)
                break
            except DispynbError as exc:
                # Out of descriptors: the node is fine, this process is full; it
                # tries again as other connections (or files) free theirs.
                if not out_of_descriptors(exc) or loop.time() + delay > give_up:
                    if not_listening(exc) and not self._closing:
                        # Not started yet, perhaps (dispy used a node that started
                        # after its client): tried again in the background, as a
                        # lost node is. Counted before the failure, so that queued
                        # jobs wait for it rather than end Abandoned.
                        self._start_reconnecting(link.host, link.port, allocate)
                    self._fail_node(link, exc)
                    return
                log = logger.warning if delay == RECONNECT_DELAY else logger.debug
                log("node %s not connected yet: %s", link.node_id, describe_error(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_MAX)
        await self._attach(link, allocate, conn, welcome)

    async def _attach(
        self, link: NodeLink, allocate: Allocator, conn: Connection, welcome: Welcome
    ) -> None:
        """Set the computation up over an authenticated connection; then read it."""
        link.conn, link.welcome = conn, welcome
        link.closed = asyncio.get_running_loop().create_future()
        address = conn.peer_address
        link.peer_ip = address[0] if address is not None else link.host
        link.allocate = allocate
        link.shared_memory = shm.enabled() and shm.same_machine(
            link.peer_ip, welcome.boot_id, welcome.pid, welcome.pid_namespace
        )
        if link.shared_memory:
            self._segment_pool()
        try:
            self._set_up(link)
        except DispynbError as exc:
            if not (conn.closed and conn.messages_waiting):
                self._fail_node(link, exc)
                return
            # It ended after saying something: read that first. A scheduler that
            # refuses a session says why and closes, which over TLS can all come
            # in the read that brought its Welcome.
        await self._read(link)

    def _set_up(self, link: NodeLink) -> None:
        """Ask the node to set the computation up (again, for `resetup_node`)."""
        assert link.conn is not None and link.welcome is not None
        assert link.allocate is not None
        config = self.config
        cpus, bundle, files = link.allocate(link.welcome, link.peer_ip)
        # Declined: the program's choice (dispy's examples pick nodes so), not a
        # failure to warn of; with no node left, JobCluster() raises it as any.
        link.declined = cpus <= 0
        if link.declined:
            raise SetupError(f"{link.node_id}: NodeAllocate.allocate gave it no CPUs")
        given = {ref.relative for ref in files}  # (its depends win: newer)
        files = [*files, *(r for p, r in link.placed.items() if p not in given)]
        for ref in files:
            self._files[ref.digest] = ref
        link.setup_files.update(ref.digest for ref in files)
        self._post(
            link,
            ComputationSetup(
                comp_id=config.comp_id,
                name=config.name,
                workers=cpus,
                dest_path=config.dest_path,
                cleanup=config.cleanup,
                files=[file_entry(ref, ref.size) for ref in files],
                pulse_interval=self.pulse,
                setup_timeout=config.setup_timeout,
                recovery_id=config.recovery_id,
                keep_results=config.keep_results,
                keep_sent=config.keep_sent,
                # The cluster journals every job: it says which results it has.
                ack_journaled=bool(config.recovery_id) and config.keep_sent,
                max_output=config.max_output,
                max_result=config.max_result,
                max_pids=config.max_pids,
                fresh_process=config.fresh_process,
                reentrant=config.reentrant,
                exclusive=config.exclusive,
                allocates=config.allocates,
                max_message_size=config.max_message_size,
                python=config.python,
            ),
            bundle,
        )

    def _settle(self, link: NodeLink) -> None:
        """``link`` leaves its setting-up phase (ready or failed)."""
        if link.setting_up:
            link.setting_up = False
            self._connecting -= 1

    def _fail_node(self, link: NodeLink, exc: DispynbError) -> None:
        self._settle(link)
        if link.conn is not None:
            link.conn.close()
        # A user's credential is proved to a shared scheduler, the cluster's only
        # "node" then. Each message is its own literal: the notebook holds those
        # about nodes back by their format (`dispynb.jupyter.magicsupport`).
        if is_credential(self.config.secret):
            message = "scheduler %s cannot be used: %s"
        else:
            message = "node %s cannot be used: %s"
        # Most errors name the node already ("HOST:PORT: ..."): name it once.
        text = describe_error(exc).removeprefix(f"{link.node_id}: ")
        if link.declined:
            logger.debug(message, link.node_id, text)
        elif self._held_warnings is not None:
            self._held_warnings.append((message, link.node_id, text, exc))
        else:
            logger.warning(message, link.node_id, text)
        self.last_error = exc
        self.nodes.pop(link.node_id, None)
        # Jobs queued for it alone (submit_node as it was set up again) end.
        self._apply(self.state.handle(NodeLeft(link.node_id)), lost_reason=text)
        self.events.node_failed(link, exc)
        self._abandon_if_no_nodes()

    async def _read(self, link: NodeLink) -> None:
        """Handle the node's messages until it is lost (or fails its setup).

        A handler that raises anything but a `DispynbError` (a bug, or a node's
        message we do not cope with) costs that node only: the error is logged with
        its traceback, the connection closed and the node's jobs treated as a lost
        node's; the cluster and the other nodes go on.
        """
        assert link.conn is not None
        loop = asyncio.get_running_loop()
        routes = self._routes
        ended: list[str | None] = []  # why reading stopped; None: the node failed

        def handle(message: Message, buffers: list[memoryview]) -> bool:
            link.last_seen = loop.time()
            route = routes.get(type(message))
            if route is None:
                return False  # nothing a client acts on (node -> client only)
            try:
                stop = route(link, message, buffers)
            except DispynbError:
                raise
            except Exception as exc:
                logger.error(
                    "error handling a %r message from node %s; dropping its connection",
                    message.op,
                    link.node_id,
                    exc_info=True,
                )
                reason = f"error handling its {message.op!r} message: {exc!r}"
                if link.setting_up:
                    self._fail_node(link, ClusterError(f"{link.node_id}: {reason}"))
                    ended.append(None)
                else:
                    ended.append(reason)
                return True
            if stop is None:
                return False
            ended.append(stop.reason)
            return True

        try:
            # Messages are handled in the socket's read callback: no task switch.
            await link.conn.dispatch(handle)
        except DispynbError as exc:
            if link.setting_up:
                self._fail_node(link, exc)
                return
            ended.append(describe_error(exc))
        finally:
            if link.closed is not None and not link.closed.done():
                link.closed.set_result(None)
        reason = ended[0] if ended else "connection closed"
        if reason is not None:
            self._lose_node(link, reason)

    # -- node management (dispy's allocate/deallocate/close/resetup_node) ---------

    def set_cpus(self, node_id: str, cpus: int) -> int:
        """Use ``cpus`` CPUs of a node from now on (0: send it no more jobs).

        Returns the CPUs now used (at most what the node set up), or -1 for an
        unknown node. Jobs already there finish.
        """
        link = self.nodes.get(node_id)
        if link is None:
            return -1
        if (link.closes_sent and link.resetting) or (
            not link.ready and link.setting_up and not link.releasing
        ):
            # Being set up (again: allocate_node as its close went on, or
            # resetup_node): the last call decides, as it is ready (`_on_ready`).
            link.cpus_asked = max(0, cpus)
            return min(link.cpus_asked, link.cpus) if link.cpus else link.cpus_asked
        if not link.ready or link.closes_sent:
            return -1
        cpus = max(0, min(cpus, link.cpus))
        self._apply(self.state.handle(NodeJoined(node_id, cpus)))
        return cpus

    def close_node(self, node_id: str, terminate: bool, release: bool = True) -> bool:
        """Close the computation on one node (after its jobs, unless ``terminate``).

        Jobs pinned to the node and not sent yet are cancelled here; the node
        cancels the jobs it holds that have not started, and with ``release`` those
        neither pinned nor cancelled by the user go back to the queue (as in dispy,
        where a node holds only running jobs: `DriverResults._closed_unstarted`). With
        ``release`` the node then leaves the cluster
        for good: the connection is closed and never made again (dispy's
        ``close_node``); `add_node` brings it back.
        """
        link = self.nodes.get(node_id)
        if link is None:
            return False
        if release and (link.closes_sent or link.ready or link.setting_up):
            link.placed.clear()  # as dispy's close_node, its files go
        if link.closes_sent:
            # Closing already (close_node, allocate_node, close_node ... in a
            # row): the last call decides what follows the node's answer. (Each
            # close sent is answered: the setup made anew after the first answer
            # was closed by the second.)
            link.releasing, link.resetting = release, not release
            if release:
                self._cancel_pinned(node_id)
            if terminate and not link.close_terminates:
                # Its running jobs were to finish: the node terminates them now,
                # as dispy's does on a second close with terminate_pending.
                self._send_close(link, terminate)
            return True
        if not link.ready:
            if not link.setting_up:
                return False
            # Connected or set up just now (allocate_node named it, or set up
            # again): closed once ready (`_on_ready`), before it gets any job, then
            # released, or set up anew (resetup_node): the last call decides.
            link.releasing, link.resetting = release, not release
            if release:
                self._cancel_pinned(node_id)
            return True
        self.set_cpus(node_id, 0)
        self._cancel_pinned(node_id)
        link.releasing = release
        link.cpus_asked = None  # (with release it leaves; else all of it again)
        self._send_close(link, terminate)
        return True

    def _cancel_pinned(self, node_id: str) -> None:
        """Cancel the jobs queued for the node alone (`close_node`, as dispy's)."""
        for key in self.state.pinned_keys(node_id):
            self._apply(self.state.handle(CancelRequested(key)))

    def _send_close(self, link: NodeLink, terminate: bool) -> None:
        """Ask the node to close the computation; it cancels what has not started."""
        link.closes_sent += 1
        link.close_terminates = link.close_terminates or terminate
        with contextlib.suppress(DispynbError):
            self._post(
                link,
                ComputationClose(
                    comp_id=self.config.comp_id,
                    terminate=terminate,
                    cancel_waiting=True,
                ),
            )

    def resetup_node(self, node_id: str, terminate: bool) -> bool:
        """Close the computation on a node and set it up again on the same node."""
        link = self.nodes.get(node_id)
        if link is None or not self.close_node(node_id, terminate, release=False):
            return False
        link.resetting = True
        return True

    def _redo_setup(self, link: NodeLink) -> None:
        was_ready, link.ready = link.ready, False
        link.closes_sent, link.close_terminates = 0, False
        if was_ready:  # (not if closed as it became ready: `_on_ready`)
            self._apply(
                self.state.handle(NodeLeft(link.node_id, returning=True)),
                lost_reason="re-setup",
            )
            self.events.node_closed(link, "set up again")  # ``resetting`` still True
        link.resetting = False
        self._connecting += 1
        link.setting_up = True
        try:
            self._set_up(link)
        except DispynbError as exc:
            self._fail_node(link, exc)

    def running_keys(self, node_id: str) -> list[int]:
        """Keys of the jobs running on a node."""
        return self.state.running_keys(node_id)

    def _node_stopping(self, link: NodeLink, why: str) -> None:
        """The node says it shuts down (``why``): it gets no more jobs. A reentrant
        computation's jobs there run elsewhere now rather than at its end (the
        node is dropped); others may finish there while it drains, and those that
        do not end with the reason it gave."""
        link.stopping = why
        logger.info("node %s: %s", link.node_id, why)
        if not link.leaving and link.ready:  # not before it joined
            link.leaving = True
            self._apply(self.state.handle(NodeJoined(link.node_id, 0)))
        if self.config.reentrant and self.state.running_keys(link.node_id):
            # Closed there first: else a node keeping computations for recovery
            # would run the jobs on, orphaned, until its drain ends.
            if link.conn is not None and not link.pumping:
                with contextlib.suppress(DispynbError):
                    link.conn.write(
                        ComputationClose(
                            comp_id=self.config.comp_id,
                            terminate=True,
                            cancel_waiting=True,
                        )
                    )
            self._lose_node(link, why)

    def _lose_node(self, link: NodeLink, reason: str) -> None:
        for stream in [s for s in self._streams if s[0] == link.node_id]:
            del self._streams[stream]  # its results will not come
        if link.conn is not None:
            link.conn.close()  # fencing: whatever it still sends is never read
        if self.nodes.get(link.node_id) is not link:
            return  # dropped already (another link may have its id now)
        del self.nodes[link.node_id]
        was_ready = link.ready
        if link.stopping:  # what it said as it began to stop, not "closed"
            reason = link.stopping
        if link.ready:
            link.ready = False
            self._apply(
                self.state.handle(NodeLeft(link.node_id)),
                lost_reason=reason,
                stopped=bool(link.stopping),
            )
            self.events.node_closed(link, reason)
        elif link.releasing:  # closed as it was set up (again): never ready
            self.events.node_closed(link, reason)
        if not was_ready:  # jobs queued for it alone (as it was set up again) end
            self._apply(self.state.handle(NodeLeft(link.node_id)), lost_reason=reason)
        if (
            was_ready
            and not self._closing
            and not link.releasing
            and link.allocate is not None
        ):
            # It may come back (restarted, link healed): try again for a while.
            self._start_reconnecting(link.host, link.port, link.allocate, back=True)
        self._abandon_if_no_nodes()

    def _start_reconnecting(
        self, host: str, port: int, allocate: Allocator, back: bool = False
    ) -> None:
        self._reconnecting += 1
        self._spawn(self._reconnect(host, port, allocate, back))

    async def _reconnect(
        self, host: str, port: int, allocate: Allocator, back: bool = True
    ) -> None:
        """Connect to a node that is away (lost if ``back``, else never reached),
        with backoff, for up to RECONNECT_FOR s; with ``ping_interval``, every
        ``ping_interval`` s at most, for as long as the cluster is open (dispy pinged
        its named nodes so).

        A node that comes back authenticates anew and gets a fresh computation; what
        it may still send for the old one was on the old, closed connection.
        """
        loop = asyncio.get_running_loop()
        every = self.config.ping_interval
        delay_max = min(RECONNECT_DELAY_MAX, every) if every else RECONNECT_DELAY_MAX
        deadline = math.inf if every else loop.time() + RECONNECT_FOR
        exited = self.config.node_exited
        delay = min(RECONNECT_DELAY, delay_max)
        conn: Connection | None = None
        welcome: Welcome | None = None
        try:
            while not self._closing and loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, delay_max)
                if self._closing or format_address(host, port) in self.nodes:
                    return
                if exited is not None and (why := exited(host, port)) is not None:
                    logger.warning("not trying again: %s", why)
                    self.last_error = NodeLostError(why)
                    break
                try:
                    conn, welcome = await self._connect(host, port)
                    break
                except DispynbError as exc:
                    logger.debug("node %s:%d still away: %s", host, port, exc)
        finally:
            self._reconnecting -= 1
        if conn is None or welcome is None or self._closing:
            if conn is not None:
                conn.close()
            self._abandon_if_no_nodes()
            return
        logger.info(
            "node %s is %s", format_address(host, port), "back" if back else "up now"
        )
        link = self._new_link(host, port)
        await self._attach(link, allocate, conn, welcome)

    def _watch(self) -> None:
        """Start the pulse watchdog (once, on the I/O loop)."""
        if self._watchdog is None:
            self._watchdog = self._spawn(self._watch_pulses())

    async def _watch_pulses(self) -> None:
        """Ping the nodes every half pulse (also while they set the computation
        up), and look at those set up as often: a node silent for DEAD_AFTER
        pulses is dead (found within half a pulse of it)."""
        loop = asyncio.get_running_loop()
        pulse = self.pulse
        while not self._closing:
            expected = loop.time() + pulse / 2
            await asyncio.sleep(pulse / 2)
            now = loop.time()
            late = now - expected > pulse
            for link in list(self.nodes.values()):
                if link.conn is None:
                    continue
                if not link.ready:
                    # Setting the computation up there (as long as its setup
                    # takes): not judged, but pinged all the same, or the node
                    # (or a shared scheduler) takes a client waiting for a setup
                    # longer than its --zombie_interval for a silent one.
                    if not link.conn.unsent:
                        with contextlib.suppress(DispynbError):
                            link.conn.write(Ping())
                    continue
                if late:
                    # This loop was held up (a huge result?): the nodes' pulses may be
                    # waiting unread, so judge no one this round.
                    link.last_seen = now
                    continue
                if link.conn.reads != link.reads_seen:
                    # Bytes arrived (maybe of a message slower to cross the link
                    # than DEAD_AFTER pulses, with the pulses queued behind it).
                    link.reads_seen = link.conn.reads
                    link.last_seen = now
                silent = now - link.last_seen
                if silent > DEAD_AFTER * pulse and link.conn.unread_bytes():
                    # Its bytes wait unread (this check ran before the loop's reads
                    # of this turn, or reading is paused): alive.
                    link.last_seen = now
                    continue
                if silent > DEAD_AFTER * pulse:
                    logger.warning(
                        "node %s sent nothing for %.1f s: declared dead",
                        link.node_id,
                        silent,
                    )
                    self._lose_node(link, f"no pulse for {silent:.1f} s")
                    continue
                if link.conn.unsent:
                    # The node has not taken what was sent: a ping each time would
                    # pile up without end for a node that never reads.
                    continue
                with contextlib.suppress(DispynbError):
                    link.conn.write(Ping())

    def nodes_may_come(self) -> bool:
        """Whether nodes may still appear (discovery, or a launcher expecting
        some): queued jobs wait for them."""
        expected = self.config.nodes_expected
        return self.discovering or (expected is not None and expected())

    def hold_failure_warnings(self) -> None:
        """Keep the "node ... cannot be used" warnings aside until
        `release_failure_warnings` (while ``JobCluster()`` starts: when it fails,
        its exception says the same, and a script would show it twice)."""
        self._held_warnings = []

    def release_failure_warnings(self, said: Collection[DispynbError] = ()) -> None:
        """Log the warnings held back, but those of the errors in ``said`` (which
        the caller reports otherwise); warn at once again from now on."""
        held, self._held_warnings = self._held_warnings or [], None
        for message, node_id, text, exc in held:
            if not any(exc is error for error in said):
                logger.warning(message, node_id, text)

    def _abandon_if_no_nodes(self) -> None:
        """With no node left (and none coming), queued jobs can never run."""
        if self._connecting > 0 or self._reconnecting > 0 or self.nodes_may_come():
            return
        if self.released:  # allocate_node may bring one back: wait, as dispy
            return
        if any(n.ready for n in self.nodes.values()):
            return
        for key in list(self._jobs):
            self._jobs.pop(key)
            self._release_segments(key)
            self.events.job_abandoned(key, None, self._no_node_reason())

    def _no_node_reason(self) -> str:
        if self.revoked:  # not a node's fault: the scheduler refuses this user
            return self.revoked
        reason = "no node is available to run the job"
        if self.last_error is not None:
            reason += f" (last node error: {describe_error(self.last_error)})"
        return reason

    @property
    def connecting(self) -> bool:
        """True while some node is still connecting or being set up."""
        return self._connecting > 0

    @property
    def reconnecting(self) -> bool:
        """True while some node that is away is being tried again."""
        return self._reconnecting > 0
