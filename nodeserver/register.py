"""``dispynb-node --register HOST:PORT``: announce this node to its launcher's client.

The node connects to the client's registration listener, answers its challenge with a
proof of the secret (`dispynb.protocol.registration`) and learns whether it was
accepted; the client then connects to the node and authenticates as usual. No
credential and no port file: the secret never leaves the node.
"""

from __future__ import annotations

import asyncio
import logging

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


async def register(
    address: str,
    *,
    secret: bytes,
    name: str,
    port: int,
    cpus: int,
    patience: float = REGISTER_PATIENCE,
    boot: bytes | None = None,
) -> None:
    """Register the node listening on ``port`` with the client at ``address``.

    Retries a refused or unreachable client for ``patience`` seconds. Raises
    `AuthenticationError` if the client rejects the proof (a different secret), and
    `DispynbError` if it cannot be reached. Registering again with the same
    ``boot`` id is how a node checks that its client still lives: the client
    accepts it without reporting the node twice.
    """
    host, client_port = parse_address(address, 0)
    if not client_port:
        raise DispynbError(f"--register needs HOST:PORT, not {address!r}")
    reg = Registration(
        name=fit_name(name), port=port, cpus=cpus, boot=boot or new_boot_id()
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.2
    while True:
        try:
            await asyncio.wait_for(
                _attempt(host, client_port, secret, reg), ATTEMPT_TIMEOUT
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if loop.time() + delay > deadline:
                raise DispynbError(
                    f"cannot register with the client at "
                    f"{format_address(host, client_port)}: {exc or type(exc).__name__}"
                ) from exc
            logger.info("registration with %s failed (%s); retrying", address, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        logger.info(
            "registered with the client at %s", format_address(host, client_port)
        )
        return


async def _attempt(host: str, port: int, secret: bytes, reg: Registration) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
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
        raise AuthenticationError(
            f"the client at {format_address(host, port)} rejected this node's "
            "registration: the node's secret is not the client's"
        )
