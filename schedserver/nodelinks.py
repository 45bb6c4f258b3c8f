"""The shared scheduler's connections to the nodes: a control connection per node
(up, down, up again) and, per computation, an `Upstream` that sets it up there
and carries its jobs and results; what a node says about a computation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import resource
from typing import Any

from dispynb.defaults import CONNECT_RETRY
from dispynb.errors import (
    AuthenticationError,
    DispynbError,
    MessageError,
    ProtocolError,
)
from dispynb.protocol.handshake import PROOF_REFUSED, peer_text
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationClosed,
    ComputationFailed,
    ComputationReady,
    Error,
    FileFromNode,
    FilePlaced,
    FilesMissing,
    JobProvisional,
    JobResults,
    Message,
    NodeStatus,
    ResultChunk,
    Welcome,
)
from dispynb.protocol.records import avail_figures
from dispynb.transport.connection import Connection, describe_error
from dispynb.transport.connector import connect, out_of_descriptors
from dispynb.wording import counted
from schedserver.computation import SharedComputation, Upstream
from schedserver.config import NODE_TLS_OPTIONS
from schedserver.nodelimits import setup_over_node
from schedserver.nodeuse import NODE_ACTIONS
from schedserver.state import NodeState, _ServerState, logger

#: Seconds between attempts to reach a node that is down (doubling up to the max).
RECONNECT_FIRST = 0.2
RECONNECT_MAX = 5.0


def reported_avail(node: NodeState, avail: Any) -> list[float | None]:
    """The figures of ``node``'s resource report; a malformed one (only a node
    holding the secret can send it) is unknown ([]), said once per node: summed
    with the others' it would break the scheduler's report to every client."""
    try:
        return avail_figures(avail)
    except MessageError as exc:
        if not node.avail_malformed:
            node.avail_malformed = True
            logger.warning(
                "node %s: %s; its resources count as unknown (is it dispynb's node "
                "server, of this version?)",
                node.name,
                exc,
            )
        return []


def _node_refusal(name: str, exc: DispynbError) -> str:
    """Why ``name`` could not be reached, in the scheduler's operator's words: the
    node named once, and a refused secret's fix naming the scheduler's options (the
    handshake's are a Python client's: ``secret=``)."""
    if out_of_descriptors(exc):
        return _short_of_descriptors(exc)
    text = describe_error(exc).removeprefix(f"{name}: ")
    reason = text.partition("; ")[0]
    if isinstance(exc, AuthenticationError) and reason.startswith(PROOF_REFUSED):
        return (
            f"{reason}; give the scheduler the nodes' secret (--node_secret_file "
            "or DISPYNB_SECRET)"
        )
    return text


def _short_of_descriptors(exc: BaseException) -> str:
    """Why the scheduler could not connect to a node: it has no descriptor left
    (the connector's words are a client's own, 'this client ... ulimit -n', which
    a SharedJobCluster's user would take for theirs)."""
    while exc.__cause__ is not None and not isinstance(exc, OSError):
        exc = exc.__cause__
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = "none" if soft == resource.RLIM_INFINITY else soft
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return (
        f"the scheduler is out of file descriptors ({reason}, limit {limit}) for "
        "a connection to it (each computation has one to every node it uses): its "
        "operator can raise the limit (LimitNOFILE= in its systemd unit, ulimit "
        "-n), or it serves fewer computations at once"
    )


#: Refusals of a node that its or the scheduler's settings cause, said again when
#: they follow a failure of another kind in one outage (`_NodeLinks._keep_node`).
_SETTING_REFUSALS = (AuthenticationError, ProtocolError)


class _NodeLinks(_ServerState):
    """The connections to the nodes and what comes over them."""

    async def _keep_node(self, node: NodeState) -> None:
        """Keep a control connection to ``node``: up, down, up again."""
        delay = RECONNECT_FIRST
        failing = False  # the operator heard of this outage already
        said = ""  # ... and of a refusal of this kind (a wrong secret...)
        stopped = False  # the node said it shut down: its operator stopped it
        loop = asyncio.get_running_loop()
        down_since = loop.time()
        while not self.stopping:
            try:
                conn, welcome = await self._connect(node, "dispynb-scheduler")
            except DispynbError as exc:
                if node.registered and self._forget(node, loop.time() - down_since):
                    return
                why = _node_refusal(node.name, exc)
                node.down = "; not back: ".join(filter(None, [node.went_down, why]))
                # Once per outage at warning level: a mistyped or unreachable
                # node is visible without -d; each retry only with it. A node
                # that was stopped (it said so) is no fault: said at info level.
                # A refusal that a setting causes (another secret, another
                # version) is said too when it follows another failure: a node
                # not up yet at the scheduler's start, then up with another
                # secret, was retried in silence while its users' jobs waited.
                kind = type(exc).__name__
                again = failing and (
                    kind == said or not isinstance(exc, _SETTING_REFUSALS)
                )
                (logger.debug if again else logger.info if stopped else logger.warning)(
                    "node %s: %s (trying again)", node.name, why
                )
                if not again:
                    said = kind
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_FIRST
            failing = stopped = False
            node.conn = conn
            node.dead_reason = node.down = node.went_down = ""
            node.leaving = False
            node.stopping = ""
            cap = self.config.cpus
            node.cpus = min(welcome.cpus, cap) if cap else welcome.cpus
            node.avail = reported_avail(node, welcome.avail)
            node.hostname = welcome.name
            node.platform = welcome.platform
            node.max_message_size = welcome.max_message_size
            node.alive = True
            # Its name too: an operator knows the nodes by name, not by port.
            logger.info(
                "node %s is up with %s (its name: %s)",
                node.name,
                counted(node.cpus, "CPU"),
                peer_text(node.hostname, 100),
            )
            for comp in self.computations:
                if comp.node_back(node.name):  # (close_node: not again)
                    self._attach_again(comp, node)

            def on_control(message: Message, buffers: list[memoryview]) -> bool:
                if isinstance(message, NodeStatus):
                    node.avail = reported_avail(node, message.avail)
                    if message.leaving:
                        self._node_stopping(node, message.leaving)
                return False

            try:
                await conn.dispatch(on_control)
            except DispynbError as exc:
                why = node.dead_reason or describe_error(exc)
                stopped = bool(node.stopping)
                node.down = node.went_down = node.stopping or why
                if stopped:
                    logger.info("node %s stopped: %s", node.name, node.stopping)
                else:
                    logger.warning("node %s is down: %s", node.name, why)
            finally:
                conn.close()
                node.conn = None
                node.alive = False
                down_since = loop.time()

    def _node_stopping(self, node: NodeState, why: Any) -> None:
        """``node`` says it shuts down (``why``, its `NodeStatus.leaving`, said on
        each of its connections): it gets no more jobs, and the jobs of reentrant
        computations running there run elsewhere now, not when its drain ends
        (their connections there are closed, the computation first: as a
        `JobCluster` does). Others' jobs may finish there while it drains; those
        that do not end in its words."""
        if node.stopping or not node.alive:
            return
        node.stopping = peer_text(why, 500)
        node.leaving = True
        logger.info(
            "node %s shuts down: no more jobs for it (%s)", node.name, node.stopping
        )
        for comp in self.computations:
            upstream = comp.upstream.get(node.name)
            if (
                upstream is None
                or upstream.conn is None
                or comp.closing
                or not comp.setup.reentrant
                or not any(job.node == node.name for job in comp.running.values())
            ):
                continue
            with contextlib.suppress(DispynbError):
                upstream.conn.write(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=True, cancel_waiting=True
                    )
                )
            upstream.conn.close()  # its jobs are requeued as it ends (node_lost)

    def _forget(self, node: NodeState, down_for: float) -> bool:
        """Forget a registered ``node`` unreachable for ``forget_registered`` s:
        a node restarted on another port would otherwise be tried for ever. It
        registers again when it is back (`Registrar.forget`: even from the same
        boot). Returns whether it was forgotten."""
        if down_for < self.config.forget_registered or self.stopping:
            return False
        self.nodes.remove(node)
        for registrar in self._registrars:
            registrar.forget(node.host, node.port)
        logger.warning(
            "node %s forgotten: unreachable for %.0f s (--forget_registered); it "
            "is taken again when it registers",
            node.name,
            down_for,
        )
        return True

    async def _connect(self, node: NodeState, name: str) -> tuple[Connection, Welcome]:
        """Connect to ``node``, at most `CONNECTS_PER_NODE` handshakes at once (the
        rest wait their turn); a busy refusal (other programs from this host in
        their handshake) is retried for `CONNECT_RETRY` s, not a failed setup."""
        async with node.connecting:
            return await connect(
                node.host,
                node.port,
                timeout=self.config.connect_timeout,
                handshake_timeout=self.config.handshake_timeout,
                secret=self.config.node_secret,
                max_message_size=self.config.max_message_size,
                ssl_context=self.config.node_ssl,
                name=name,
                retry_for=CONNECT_RETRY,
                tls_options=NODE_TLS_OPTIONS,
            )

    def _attach_again(self, comp: SharedComputation, node: NodeState) -> None:
        """Set ``comp`` up on ``node``, which is up, unless it is there or on its
        way (or closing, or closed on the nodes)."""
        upstream = comp.upstream.get(node.name)
        if (
            not comp.closing
            and not comp.released
            and (upstream is None or upstream.task is None or upstream.task.done())
        ):
            self._attach(comp, node)

    def set_up_again(self, comp: SharedComputation, name: str) -> None:
        """``comp``'s client gave back the node ``name`` it closed (`close_node`,
        then `allocate_node`): set it up there again now if the node is up and
        the close is over (else once it is: `_run_upstream`, `_keep_node`)."""
        for node in self.nodes:
            if node.name == name and node.alive and not node.leaving:
                self._attach_again(comp, node)

    def _attach(self, comp: SharedComputation, node: NodeState) -> None:
        """Set ``comp`` up on ``node`` over a connection of its own."""
        upstream = Upstream(node)
        comp.upstream[node.name] = upstream
        upstream.task = self._spawn(self._run_upstream(comp, upstream))

    async def _run_upstream(self, comp: SharedComputation, upstream: Upstream) -> None:
        node = upstream.node
        reason = "connection closed"
        try:
            conn, welcome = await self._connect(node, f"dispynb-scheduler:{comp.user}")
        except DispynbError as exc:
            if out_of_descriptors(exc):
                reason = _short_of_descriptors(exc)
                # Said once a run to the operator: every client would say it again.
                (logger.debug if self._descriptors_warned else logger.warning)(
                    "%s: node %s: %s", comp.name, node.name, reason
                )
                self._descriptors_warned = True
            else:
                reason = describe_error(exc)
            comp.node_lost(upstream, reason)
            self._check_failed(comp)
            return
        if comp.closing:
            conn.close()
            comp.node_lost(upstream, "its computation closed")
            return
        node.max_message_size = welcome.max_message_size
        upstream.conn = conn
        setup = dataclasses.replace(
            comp.setup,
            workers=node.cpus,
            pulse_interval=self.config.pulse_interval,
            keep_results=0.0,
            recovery_id=None,
            # Within what both the client and this scheduler take.
            max_message_size=min(
                comp.setup.max_message_size or self.config.max_message_size,
                self.config.max_message_size,
            ),
        )
        refused = setup_over_node(setup, comp.bundle, node.max_message_size)
        if refused:
            self.refuse_upstream(comp, upstream, refused)
        try:
            conn.write(setup, comp.bundle)
            if upstream.closing:  # close_node came while it connected: once set up
                conn.write(
                    ComputationClose(
                        comp_id=comp.comp_id, terminate=False, cancel_waiting=True
                    )
                )
            await conn.dispatch(
                functools.partial(self._from_node, comp, upstream),
                early=functools.partial(comp.pass_on, upstream),
            )
        except DispynbError as exc:
            reason = describe_error(exc)
        except Exception:  # a bug, or a node message we cannot cope with
            logger.exception("%s: error handling node %s", comp.name, node.name)
            reason = "internal error"
        finally:
            conn.close()
            was_set_up = upstream.ready
            if upstream.refused:
                reason = upstream.refused
            elif upstream.closed:
                reason = "closed"
            elif node.dead_reason:
                reason = node.dead_reason
            elif node.stopping:
                reason = node.stopping
            comp.node_lost(upstream, reason)
            self._check_failed(comp)
            if upstream.closed and node.name not in comp.nodes_closed:
                # allocate_node came while its close_node was under way (this task,
                # not done yet, is the link `_attach_again` would wait for)
                if (
                    node.alive
                    and not node.leaving
                    and comp.upstream.get(node.name) is upstream
                    and not (comp.closing or comp.released)
                ):
                    self._attach(comp, node)
            elif was_set_up:
                self._relink_later(comp, upstream, reason)
            self.schedule()

    def refuse_upstream(
        self, comp: SharedComputation, upstream: Upstream, why: str
    ) -> None:
        """Send ``upstream``'s node nothing more of ``comp``, which it cannot take
        (``why``: over its limits, `schedserver.nodelimits`): its connection ends,
        and the node is lost to the computation for that reason (its client hears
        it, as every node's reason when none takes the computation). Not set up
        there again: it would be refused again."""
        if upstream.refused:
            return
        upstream.refused = why
        logger.warning(
            "%s: not sent to node %s: %s", comp.name, upstream.node.name, why
        )
        if upstream.conn is not None:
            upstream.conn.close()

    def _relink_later(
        self, comp: SharedComputation, ended: Upstream, reason: str
    ) -> None:
        """``comp``'s link to a node ended (``ended``, set up there) while the node
        is up: its handler of it failed, a message on it was refused, something
        between cut it. Set ``comp`` up there again after a backoff, as a
        `JobCluster` reconnects to a node it lost: without, it would never use the
        node again until the node's control connection went down and up."""
        node = ended.node
        if (
            ended.closed
            or ended.refused
            or comp.closing
            or comp.released
            or node.name in comp.nodes_closed
            or self.stopping
            or not node.alive
            or node.stopping
            or node.dead_reason
        ):
            return
        delay = comp.relink_delay.get(node.name, RECONNECT_FIRST)
        comp.relink_delay[node.name] = min(delay * 2, RECONNECT_MAX)
        logger.warning(
            "%s: its link to node %s ended (%s); set up there again in %.1f s",
            comp.name,
            node.name,
            reason,
            delay,
        )
        self._spawn(self._relink(comp, ended, delay))

    async def _relink(
        self, comp: SharedComputation, ended: Upstream, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        node = ended.node
        if (
            comp.upstream.get(node.name) is ended  # not set up there since
            and comp in self.computations
            and node.name not in comp.nodes_closed
            and not (comp.closing or comp.released or self.stopping)
            and node.alive
            and not (node.stopping or node.dead_reason)
        ):
            self._attach(comp, node)

    def _from_node(
        self,
        comp: SharedComputation,
        upstream: Upstream,
        message: Message,
        buffers: list[memoryview],
    ) -> bool:
        """One message from a node about ``comp``; True ends reading it."""
        stop = self._handle(comp, upstream, message, buffers)
        if comp.session is not None:
            comp.session.check_backlog()
        return stop

    def _handle(
        self,
        comp: SharedComputation,
        upstream: Upstream,
        message: Message,
        buffers: list[memoryview],
    ) -> bool:
        if isinstance(message, JobResults):
            comp.on_results(upstream, message, buffers)
        elif isinstance(message, FileFromNode):
            comp.job_file(upstream, message, buffers)
        elif isinstance(message, ResultChunk | JobProvisional):
            comp.from_node(upstream, message, buffers)
        elif isinstance(message, NodeStatus):
            upstream.node.avail = reported_avail(upstream.node, message.avail)
            upstream.reporting = True
            if message.leaving:
                self._node_stopping(upstream.node, message.leaving)
        elif isinstance(message, FilesMissing):
            self._give_files(comp, upstream, message.digests)
        elif isinstance(message, FilePlaced):
            comp.placed(upstream, message)
        elif isinstance(message, ComputationReady):
            upstream.ready = True
            if not upstream.closing:  # (closed as it was set up: it runs none)
                comp.account.nodes.add(upstream.node.name)
            comp.hold_for_client(upstream.node.name)
            if not comp.ready_sent:
                comp.ready_sent = True
                comp.to_client(
                    ComputationReady(
                        comp_id=comp.comp_id,
                        workers=max(1, self.total_cpus()),
                        acks_journaled=comp.kept.tracking,
                        pins=True,  # submit_node: `SharedComputation.take`
                        manages=list(NODE_ACTIONS),  # `_NodeUse.manage`
                    )
                )
            comp.report_nodes()
            self.schedule()
        elif isinstance(message, ComputationFailed):
            logger.warning(
                "%s: setup failed on %s: %s",
                comp.name,
                upstream.node.name,
                message.message,
            )
            comp.failures.append(message.message)
            comp.failure_traceback = message.traceback
            return True
        elif isinstance(message, ComputationClosed):
            upstream.closed = True
            return True
        elif isinstance(message, Error):
            logger.warning("node %s reports: %s", upstream.node.name, message.message)
        return False

    def _check_failed(self, comp: SharedComputation) -> None:
        """Every node refused ``comp`` (and none took it): tell its client."""
        if comp.ready_sent or comp.closing or not comp.failures:
            return
        if not all(u.ended for u in comp.upstream.values()):
            return
        comp.ready_sent = True  # answered: no ready after this
        comp.to_client(
            ComputationFailed(
                comp_id=comp.comp_id,
                message="; ".join(comp.failures[-3:]),
                traceback=comp.failure_traceback,
            )
        )

    def check_closed(self, comp: SharedComputation) -> None:
        """``comp`` closing: once every node closed it, tell its client."""
        if comp.closed or not comp.closing:
            return
        if not all(u.closed or u.conn is None for u in comp.upstream.values()):
            return
        comp.closed = True
        if comp.account.exclusive:  # its start was logged: an operator sees both
            logger.info("%s closed: other users' jobs run again", comp.name)
        if comp in self.computations:
            self.computations.remove(comp)
        self.fair.ended(comp.account, comp.account.in_flight)
        comp.to_client(ComputationClosed(comp_id=comp.comp_id))
        if comp.session is not None:
            comp.session.computations.pop(comp.client_comp_id, None)
        comp.kept.clear()
        self._release_files(comp)
        for upstream in comp.upstream.values():
            if upstream.conn is not None:
                upstream.conn.close()
        self.schedule()
