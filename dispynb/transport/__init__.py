"""Bytes on sockets for dispynb: connections, listener, connector, TLS."""

from __future__ import annotations
