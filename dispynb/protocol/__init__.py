"""The dispynb wire protocol, sans-IO: framing, messages, authentication, pickling.

Shared by the client and the node server; imports no networking library.
"""

from __future__ import annotations

from dispynb.protocol.messages import PROTOCOL_VERSION, Message, WireMessage

__all__ = ["PROTOCOL_VERSION", "Message", "WireMessage"]
