"""Fixtures for transport tests."""

from __future__ import annotations

import pytest

from tests.transport.certs import make_cert


@pytest.fixture
def cert(tmp_path) -> tuple[str, str]:
    """``(certfile, keyfile)`` of a fresh self-signed certificate for 127.0.0.1."""
    return make_cert(tmp_path, "node")


@pytest.fixture
def other_cert(tmp_path) -> tuple[str, str]:
    """A second, unrelated self-signed certificate."""
    return make_cert(tmp_path, "other")
