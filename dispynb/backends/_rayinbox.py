"""The Ray engine's inbox: what running jobs send before they end
(``dispy_provisional_result``, ``dispy_send_file``) reaches the client through an
asynchronous actor (`_rayinboxactor.Inbox`, one per engine) that each cluster long-polls
for its own messages; they are delivered in the order each job sent them, and a job's
outcome waits for its messages."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from typing import Any

from dispynb.backends._raystate import _RayState
from dispynb.backends._rayworker import LIFE
from dispynb.backends.jobfiles import save_job_file

logger = logging.getLogger("dispynb.backends.ray")

#: Seconds each long poll of the inbox lasts.
POLL = 1.0


class _InboxReader(_RayState):
    """Long-poll the inbox; deliver provisional results and save files."""

    def _poll_inbox(self) -> None:
        if self._closed:
            return
        future = self._inbox.take.remote(self._token, POLL).future()
        future.add_done_callback(lambda fut: self._post(self._inbox_items, fut))

    def _inbox_items(self, fut: concurrent.futures.Future[Any]) -> None:
        if self._closed:
            return
        try:
            items = fut.result()
        except Exception as exc:
            logger.warning("provisional results are lost: the inbox failed: %s", exc)
            for key in list(self._held):
                self._release(key)
            self._settle_dying(list(self._dying), final=True)
            return
        self._take_items(items)
        self._poll_inbox()

    def _read_for_dying(self, keys: list[int]) -> None:
        """The actor of jobs ``keys`` died while they ran: read the inbox once
        more (a job's ``os._exit`` put its status there before it ended the
        process), then settle them (`_settle_dying`; they may wait for the word of
        their actor's next life)."""
        try:
            future = self._inbox.take.remote(self._token, 0.0).future()
        except Exception:  # (Ray is shutting down)
            self._settle_dying(keys)
            return
        future.add_done_callback(
            lambda fut: self._post(self._read_for_dying_done, keys, fut)
        )

    def _read_for_dying_done(
        self, keys: list[int], fut: concurrent.futures.Future[Any]
    ) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):  # unread: the jobs are settled anyway
            self._take_items(fut.result())
        self._settle_dying(keys)
        self._schedule()

    def _take_items(self, items: list[Any]) -> None:
        """Deliver the inbox's messages, in the order each job sent them."""
        for key, attempt, number, kind, value in items:
            if kind == LIFE:  # of no job: an actor's earlier life ended
                self._life_reported(value)
                continue
            if self._attempts.get(key) != attempt:
                self._not_saved(key, attempt, number, kind, value)
                continue
            early = self._early.setdefault(key, {})
            early[number] = (kind, value)
            # Deliver in the order the job sent them.
            while self._sent.get(key, 0) in early:
                kind, value = early.pop(self._sent.get(key, 0))
                if not self._deliver(key, kind, value):
                    break
            if not early:
                self._early.pop(key, None)

    def _deliver(self, key: int, kind: str, value: Any) -> bool:
        """Report one message of a running (or just ended) job; False if the job
        is gone."""
        if kind == "exited":  # its actor dies now: `_settle_dying` says so
            self._sent[key] = self._sent.get(key, 0) + 1
            self._exited[key] = int(value)
            return True
        slot = self._where.get(key)
        held = self._held.get(key)
        node = slot.node if slot is not None else held[0] if held else None
        number = self._sent.get(key, 0)
        attempt = self._attempts.get(key, 0)
        if node is None:
            self._not_saved(key, attempt, number, kind, value)
            return False
        self._sent[key] = number + 1
        if kind == "provisional":
            self._events.job_provisional(key, self._view(node), value)
        elif kind == "file":
            path, data, *waits = value
            error = save_job_file(self._files_dir, key, path, data, logger=logger)
            if waits and waits[0]:  # its job waits for the answer
                self._inbox.answer.remote(self._token, (key, attempt, number), error)
        if held is not None and self._sent[key] >= held[2]:
            self._release(key)
        return True

    def _not_saved(
        self, key: int, attempt: int, number: int, kind: str, value: Any
    ) -> None:
        """A file of a job no longer run here (cancelled, or run again) is not
        saved: a job still waiting for its answer is told so."""
        if kind == "file" and len(value) > 2 and value[2]:
            error = "its job was cancelled or has ended"
            self._inbox.answer.remote(self._token, (key, attempt, number), error)

    def _release(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        node, outcome, _, timer = held
        timer.cancel()
        self._forget(key)
        self._events.job_done(key, node.info, outcome)
