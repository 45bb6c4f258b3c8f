"""Health probes: ``dispynb-node --check HOST[:PORT]`` asks a running node how it is.

A monitoring system (a Nagios or Icinga check, a systemd timer, a script) needs to know
that a node is up and how busy it is without being one of its clients: a client's
connection is a session the node logs at info level, counts for ``--serve N`` (a
probe would use up the node's clients) and for ``--exit-without-client`` (a probe
every minute would keep an idle batch node alive for ever).

The probe authenticates as any client does (the node's secret, or TLS client
certificates; a node without a secret admits its own user only), so what it learns is
no more than a client may. Its hello names it `HEALTH_PROBE`; once authenticated, the
node answers with one `NodeHealth` and closes, creating no session and logging the
probe at debug level only. Anybody who knows the secret may claim the name: it gets
that one answer and a closed connection, nothing a client could not get.

``dispynb-scheduler --check`` asks a scheduler the same way, proving the node secret
(no user credential: a user name never has the probe's characters); its answer counts
the CPUs of its nodes up, the jobs running on them, its user sessions and
computations.

The command prints one line in the monitoring-plugin format (``OK - ... | perfdata``)
and exits 0 (it answered), 1 (WARNING: a scheduler with no node up), 2 (CRITICAL:
not reachable, refused, no answer) or 3 (UNKNOWN: the check itself is
misconfigured: an address that is no ``HOST[:PORT]``, a secret it cannot read). A
node that does not listen (outside its service window, draining after SIGTERM,
after ``--serve``'s last client) refuses the probe's connection as it refuses
clients': CRITICAL, naming the refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import ssl
import time
from typing import TYPE_CHECKING

from dispynb._version import __version__
from dispynb.defaults import MAX_MESSAGE_SIZE, NODE_PORT, SCHEDULER_PORT
from dispynb.errors import (
    AuthenticationError,
    ConfigurationError,
    DispynbError,
    MessageError,
)
from dispynb.protocol.handshake import (
    HEALTH_PROBE,
    NODE_WITHOUT_SECRET,
    PROOF_REFUSED,
)
from dispynb.protocol.messages import NodeHealth
from dispynb.transport.addressing import format_address, parse_address
from dispynb.wording import counted

if TYPE_CHECKING:
    from dispynb.transport.tls import TlsOptions
    from nodeserver.server import NodeServer


#: Exit statuses, as monitoring plugins give them.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_STATUS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

#: Seconds the whole probe may take (connect, handshake, answer) by default.
CHECK_TIMEOUT = 10.0


def health_of(server: NodeServer) -> NodeHealth:
    """How ``server`` is now."""
    return NodeHealth(
        name=server.config.name,
        version=__version__,
        pid=os.getpid(),
        uptime=round(time.monotonic() - server.started, 3),
        cpus=server.config.cpus,
        busy=server.budget.busy,
        clients=len(server.sessions),
        computations=sum(s.computation_count for s in server.sessions),
        serving=server.listening and server.held is None,
        draining=server.draining,
    )


async def probe(
    address: str,
    *,
    secret: bytes | None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = CHECK_TIMEOUT,
    default_port: int = NODE_PORT,
    tls_options: TlsOptions | None = None,
    kind: str = "node",
) -> NodeHealth:
    """Ask the ``kind`` (node, or scheduler) at ``address`` (``HOST[:PORT]``) how it
    is; a TLS error names the fix in ``tls_options`` (default: a client's keywords).

    Raises `DispynbError` (`ConnectTimeoutError`, `AuthenticationError`...) if it
    cannot be asked, `TimeoutError` if it does not answer within ``timeout`` s.
    """
    from dispynb.transport.connector import connect  # not a serving node's import
    from dispynb.transport.tls import CLIENT_TLS

    host, port = parse_address(address, default_port)
    async with asyncio.timeout(timeout):
        conn, _welcome = await connect(
            host,
            port,
            secret=secret,
            max_message_size=MAX_MESSAGE_SIZE,
            ssl_context=ssl_context,
            name=HEALTH_PROBE,
            timeout=timeout,
            handshake_timeout=timeout,
            retry_for=0.0,
            tls_options=tls_options or CLIENT_TLS,
            server=f"dispynb-{kind}",
        )
        try:
            answer, _ = await conn.recv()
        finally:
            conn.close()
    if not isinstance(answer, NodeHealth):
        raise MessageError(
            f"{format_address(host, port)} answered the probe with {answer.op!r}: "
            "is it a dispynb-node of this version?"
        )
    return answer


def report(address: str, health: NodeHealth, kind: str = "node") -> tuple[int, str]:
    """The exit status and the line `check` prints for ``health`` of a ``kind``."""
    if health.server != kind:  # a node's port given to the scheduler's check...
        return CRITICAL, (
            f"CRITICAL - {kind} at {address}: a dispynb-{health.server} answered "
            f"({health.name!r}), not a dispynb-{kind}: check the address (nodes "
            f"listen on --port, {NODE_PORT} by default; a scheduler's users connect "
            f"to its -p, {SCHEDULER_PORT})"
        )
    # A node that does not listen (outside its service window, draining, after
    # --serve's last client) cannot be asked: only the moment it stops is seen.
    status, state = OK, "draining" if health.draining else "serving"
    if not health.cpus:  # a scheduler none of whose nodes is up
        status, state = WARNING, "up with no node up (no CPUs)"
    line = (
        f"{_STATUS[status]} - {kind} {health.name!r} at {address} {state}: "
        f"{health.busy} of {counted(health.cpus, 'CPU')} busy, "
        f"{counted(health.clients, 'client')}, "
        f"{counted(health.computations, 'computation')}, "
        f"up {_duration(health.uptime)}, "
        f"dispynb {health.version}, pid {health.pid}"
        f" | busy={health.busy};;;0;{health.cpus} clients={health.clients}"
        f" computations={health.computations} uptime={health.uptime:.0f}s"
    )
    return status, line


def check(
    address: str,
    *,
    secret: bytes | None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = CHECK_TIMEOUT,
    kind: str = "node",
    default_port: int = NODE_PORT,
    tls_options: TlsOptions | None = None,
    secret_options: str = "",
) -> tuple[int, str]:
    """Probe the ``kind`` (a node, a scheduler) at ``address``; return the exit
    status and the line to print (a TLS error naming ``tls_options``, a refused
    secret the check's ``secret_options``). An address that is no ``HOST[:PORT]``
    is UNKNOWN, as plugins say of a bad argument."""
    problem = address_problem(address, default_port)
    if problem is not None:
        return UNKNOWN, f"UNKNOWN - cannot check {address}: {problem}"
    try:
        health = asyncio.run(
            probe(
                address,
                secret=secret,
                ssl_context=ssl_context,
                timeout=timeout,
                default_port=default_port,
                tls_options=tls_options,
                kind=kind,
            )
        )
    except TimeoutError:
        return CRITICAL, (
            f"CRITICAL - {kind} at {address} did not answer within {timeout:g} s"
        )
    except (DispynbError, OSError) as exc:
        text = str(exc)
        # The error names the address already, as a client's does: not twice.
        with contextlib.suppress(DispynbError):
            text = text.removeprefix(
                f"{format_address(*parse_address(address, default_port))}: "
            )
        if isinstance(exc, AuthenticationError):
            text = _secret_refused(text, kind, secret, secret_options)
        return CRITICAL, f"CRITICAL - {kind} at {address}: {text}"
    return report(address, health, kind)


def _secret_refused(text: str, kind: str, secret: bytes | None, options: str) -> str:
    """The line for a refused handshake, in the words of the admin running the
    check: what was wrong with the check's secret, and the check's own ``options``
    to fix it (the peer's words are a client's: "the client's proof is wrong",
    ``secret=``)."""
    reason = text.partition("; ")[0]
    if not options or not reason.startswith(PROOF_REFUSED):
        return text
    if reason.endswith(NODE_WITHOUT_SECRET):
        return (
            f"the {kind} has no secret and refused the check's; run the check "
            f"without {options}, as the {kind}'s user"
        )
    refused = (
        f"the {kind} refused the check's secret, which is not the one it uses"
        if secret
        else f"the {kind} refused the check, which has no secret"
    )
    return f"{refused}; give the check the {kind}'s secret ({options})"


def address_problem(address: str, default_port: int = NODE_PORT) -> str | None:
    """What makes ``address`` no ``HOST[:PORT]`` (None: nothing). A host with
    colons is an IPv6 address or a typo (``node7:9711:x``), never a name to look up."""
    try:
        host, _port = parse_address(address, default_port)
    except ConfigurationError as exc:
        problem = str(exc)
    else:
        if ":" not in host:
            return None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            problem = f"bad address {address!r}: {host!r} is no IPv6 address"
        else:
            return None
    fix = "give host:port, or [IPv6 address]:port"
    return problem if "host:port" in problem else f"{problem}; {fix}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
