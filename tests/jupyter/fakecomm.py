"""A stand-in for the ipykernel comm of the JupyterLab panel, and what it collects:
the tests of the panel's kernel side (`dispynb.jupyter.labcomm`) without a kernel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from dispynb import JobCluster

#: The links' poll interval in these tests (s).
INTERVAL = 0.05


class FakeComm:
    """Collects what the kernel sends; stands in for an ipykernel comm."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.fail = False

    def send(self, data: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("kernel shutting down")
        with self._cond:
            self.sent.append((time.monotonic(), data))
            self._cond.notify_all()

    def on_msg(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self.handlers["msg"] = handler

    def on_close(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self.handlers["close"] = handler

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The first message (sent so far or later) for which predicate holds."""
        seen = 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, data in self.sent[seen:]:
                    if predicate(data):
                        return data
                seen = len(self.sent)
                left = deadline - time.monotonic()
                if left <= 0:
                    last = [d for _, d in self.sent[-3:]]
                    raise AssertionError(
                        f"no such message in {timeout} s; last: {last}"
                    )
                self._cond.wait(left)

    def states(self) -> list[tuple[float, dict[str, Any]]]:
        with self._cond:
            return [(t, d) for t, d in self.sent if d["type"] == "state"]

    def reply(self, request_id: int, timeout: float = 20) -> dict[str, Any]:
        return self.wait_for(
            lambda d: d["type"] == "reply" and d["id"] == request_id, timeout
        )


def cluster_state(cluster: JobCluster) -> Callable[[dict[str, Any]], bool]:
    def find(predicate: Callable[[dict[str, Any]], bool]) -> Callable[..., bool]:
        def check(data: dict[str, Any]) -> bool:
            if data["type"] != "state":
                return False
            mine = [c for c in data["clusters"] if c["id"] == cluster.uid]
            return bool(mine) and predicate(mine[0])

        return check

    return find  # type: ignore[return-value]


def state_of(cluster: JobCluster, predicate: Callable[[dict[str, Any]], bool]) -> Any:
    return cluster_state(cluster)(predicate)  # type: ignore[operator]
