"""The panel's comm in a real kernel: what a frontend sends there, replied to.

The kernel is started as JupyterLab starts it; the test speaks the Jupyter comm
messages (``comm_open``, ``comm_msg``) as the panel does.
"""

from __future__ import annotations

import queue
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.jupyter.kernel import CELL_TIMEOUT, Kernel, kernel

pytestmark = pytest.mark.slow


def send(k: Kernel, msg_type: str, content: dict[str, Any]) -> None:
    k.client.shell_channel.send(k.client.session.msg(msg_type, content))


def replies(k: Kernel, comm_id: str, count: int) -> list[dict[str, Any]]:
    """The next ``count`` replies the kernel sends on the comm (states skipped)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + CELL_TIMEOUT
    while len(found) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(found)} of {count} replies: {found}"
        try:
            msg = k.client.get_iopub_msg(timeout=left)
        except queue.Empty:
            continue
        content = msg["content"]
        if (
            msg["msg_type"] == "comm_msg"
            and content.get("comm_id") == comm_id
            and content["data"].get("type") == "reply"
        ):
            found.append(content["data"])
    return found


def test_what_a_frontend_sends_is_answered_and_the_comm_goes_on(
    tmp_path: Path,
) -> None:
    with kernel(tmp_path) as k:
        k.run_ok("from dispynb.jupyter import labcomm; labcomm.register()")
        comm_id = uuid.uuid4().hex
        send(k, "comm_open", {"comm_id": comm_id, "target_name": "dispynb.lab",
                              "data": {"protocol": 1}})  # fmt: skip
        for data in (
            ["not", "a", "request"],
            # Under pyzmq's zero-copy threshold (64 kB), which would start its
            # garbage-collector thread for the rest of the test process.
            {"type": "request", "id": 1, "action": "x" * 60_000},
            {"type": "request", "id": 2, "action": "nodes"},
        ):
            send(k, "comm_msg", {"comm_id": comm_id, "data": data})
        got = replies(k, comm_id, 3)
        by_id = {reply["id"]: reply for reply in got}
        assert "not a request" in by_id[None]["error"]
        assert "unknown request" in by_id[1]["error"] and len(by_id[1]["error"]) < 300
        assert by_id[2]["ok"] and by_id[2]["result"]["clusters"] == []
        k.run_ok("assert labcomm._links and not labcomm._links[0].closed")
