"""``dispynb-node --register HOST:PORT``: announce this node to a client that listens
for registrations (a launcher's, or ``dispynb-scheduler --register_port``), and stay
known to it.

The node connects to the client's registration listener, answers its challenge with a
proof of the secret (`dispynb.protocol.registration`) and learns whether it was
accepted; the client then connects to the node and authenticates as usual. No
credential and no port file: the secret never leaves the node.

Once registered the node registers again every `REREGISTER_INTERVAL` seconds (with
jitter) while no session from the client's address is live (`keep_registered`):
a scheduler restarted after a crash or an upgrade thus finds its nodes again without
restarting them. A client counts a node once whatever how often it registers (the
same boot id is not reported again), so this costs one small exchange per interval
and nothing while the client is connected.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from dispynb.errors import AuthenticationError, DispynbError
from dispynb.protocol.discovery import fit_name, new_boot_id
from dispynb.protocol.registration import (
    ACCEPTED,
    MAX_MESSAGE,
    Registration,
    RegistrationError,
    decode_challenge,
    encode_registration,
    sign,
)
from dispynb.transport.addressing import format_address, parse_address

logger = logging.getLogger(__name__)

#: Seconds spent retrying a client that does not answer yet, and per attempt.
REGISTER_PATIENCE = 30.0
ATTEMPT_TIMEOUT = 10.0
#: Seconds between registrations while no session from the client is live (each
#: wait drawn from half to one and a half times this: nodes restarted together do
#: not all register in the same instant).
REREGISTER_INTERVAL = 5.0
#: A session counts as live while its client was heard within this many intervals
#: (a client that vanished without a reset leaves a session that looks open).
LIVE_INTERVALS = 3

#: What the log calls the client a node registers with: a launcher's (``--register``)
#: or a ``dispynb-scheduler`` (``--scheduler_host``), which a node's log must not
#: call a client (its users are the clients).
CLIENT = "the client"
SCHEDULER = "the scheduler"

#: Failures of one attempt: the client is not there (yet), or not answering.
_UNREACHED = (OSError, TimeoutError, asyncio.IncompleteReadError)


async def register(
    address: str,
    *,
    secret: bytes,
    name: str,
    port: int,
    cpus: int,
    patience: float | None = REGISTER_PATIENCE,
    boot: bytes | None = None,
    peer: str = CLIENT,
) -> str:
    """Register the node listening on ``port`` with the client at ``address``;
    return the client's IP address as this node reached it.

    Retries a refused or unreachable client for ``patience`` seconds (None: until it
    answers); one line is logged at its first failure, the retries only at debug
    level. Raises `AuthenticationError` if the client rejects the proof (a
    different secret), and `DispynbError` if it cannot be reached. Registering
    again with the same ``boot`` id is how a node checks that its client still
    lives: the client accepts it without reporting the node twice. ``peer`` is
    what the log lines call the client: `CLIENT` (a launcher's) or `SCHEDULER`.
    """
    host, client_port = _client_address(address)
    reg = Registration(
        name=fit_name(name), port=port, cpus=cpus, boot=boot or new_boot_id()
    )
    where = format_address(host, client_port)
    loop = asyncio.get_running_loop()
    deadline = None if patience is None else loop.time() + patience
    delay = 0.2
    failures = 0
    while True:
        try:
            ip = await asyncio.wait_for(
                _attempt(host, client_port, secret, reg, peer), ATTEMPT_TIMEOUT
            )
        except _UNREACHED as exc:
            why = unreached(exc, client_port, peer)
            if deadline is not None and loop.time() + delay > deadline:
                raise DispynbError(
                    f"cannot register with {peer} at {where}: {why}"
                ) from exc
            if failures:  # said once: each attempt only with -d
                logger.debug("registration with %s failed (%s)", where, why)
            elif deadline is not None:
                logger.info(
                    "cannot register with %s at %s yet (%s): retrying for %g s",
                    peer,
                    where,
                    why,
                    patience,
                )
            else:
                logger.warning(
                    "cannot register with %s at %s yet (%s): trying until it answers",
                    peer,
                    where,
                    why,
                )
            failures += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        logger.info("registered with %s at %s", peer, where)
        return ip


async def keep_registered(
    address: str,
    *,
    secret: bytes,
    name: str,
    port: int,
    cpus: int,
    boot: bytes,
    first_ip: str,
    live_session: Callable[[set[str], float], bool],
    interval: float = REREGISTER_INTERVAL,
    peer: str = CLIENT,
) -> None:
    """Keep a node that registered with ``address`` known to it, for ever.

    Every ``interval`` seconds (jittered), unless ``live_session(ips, within)``
    says that a client at one of ``ips`` (the addresses the client answered
    registrations from, ``first_ip`` the first) was heard within ``within``
    seconds, the node registers again with ``boot``. A client that stays away (a
    scheduler being restarted) is logged once when it is lost and once when it
    takes the node again; the attempts between are logged at debug level only. A
    rejection (the client's secret changed) is logged the same way, and the node
    keeps trying: the operator may put the secret right at the client.
    """
    host, client_port = _client_address(address)
    where = format_address(host, client_port)
    reg = Registration(name=fit_name(name), port=port, cpus=cpus, boot=boot)
    ips = {first_ip}
    within = LIVE_INTERVALS * interval
    lost = False  # an attempt failed: the next success is logged
    alone = True  # registered with no session since: nothing new to say
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        if live_session(ips, within):
            alone = False
            continue
        try:
            ips.add(
                await asyncio.wait_for(
                    _attempt(host, client_port, secret, reg, peer), ATTEMPT_TIMEOUT
                )
            )
        except (*_UNREACHED, DispynbError) as exc:  # also rejected, or garbled
            why = unreached(exc, client_port, peer)
            if lost:
                logger.debug("registering again with %s failed: %s", where, why)
            else:
                logger.warning(
                    "lost %s at %s (%s): registering again every %g s until it answers",
                    peer,
                    where,
                    why,
                    interval,
                )
            lost = True
            continue
        if lost:
            logger.info("registered again with %s at %s", peer, where)
        elif not alone:
            logger.info("no session from %s at %s: registered again", peer, where)
        else:
            logger.debug("registered again with %s at %s", peer, where)
        lost, alone = False, True


def unreached(exc: BaseException, port: int, party: str = CLIENT) -> str:
    """Why an attempt to register on ``port`` failed, in words: asyncio's are
    "[Errno 111] Connect call failed ('10.0.0.1', 9714)"."""
    if isinstance(exc, ConnectionRefusedError):
        hint = (
            "; is dispynb-scheduler running there, with --register_port?"
            if party == SCHEDULER
            else ""
        )
        return f"connection refused: nothing listens on port {port} there{hint}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {ATTEMPT_TIMEOUT:g} s"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "it closed the connection before answering"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _client_address(address: str) -> tuple[str, int]:
    host, client_port = parse_address(address, 0)
    if not client_port:
        raise DispynbError(f"--register needs HOST:PORT, not {address!r}")
    return host, client_port


async def _attempt(
    host: str, port: int, secret: bytes, reg: Registration, party: str = CLIENT
) -> str:
    """One registration; return the client's IP address as connected to."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        peer = writer.get_extra_info("peername")
        size = int.from_bytes(await reader.readexactly(2), "big")
        if size > MAX_MESSAGE:
            raise RegistrationError(f"challenge of {size} bytes over {MAX_MESSAGE}")
        challenge = decode_challenge(await reader.readexactly(size))
        writer.write(encode_registration(sign(secret, challenge.nonce, reg)))
        await writer.drain()
        answer = await reader.readexactly(1)
    finally:
        writer.close()
    if answer != ACCEPTED:
        fix = (
            "give the node the scheduler's node secret (the file of its "
            "--node_secret_file, or its DISPYNB_SECRET) with --secret-file"
            if party == SCHEDULER
            else "give the node the secret its launcher uses (--secret-stdin, "
            "--secret-file or DISPYNB_SECRET)"
        )
        raise AuthenticationError(
            f"{party} at {format_address(host, port)} rejected this node's "
            f"registration: the node's secret is not {party}'s; {fix}"
        )
    return unmapped(str(peer[0])) if peer else host


def unmapped(ip: str) -> str:
    """``ip`` without an IPv4-mapped IPv6 prefix (``::ffff:10.0.0.1``)."""
    return ip.removeprefix("::ffff:")
