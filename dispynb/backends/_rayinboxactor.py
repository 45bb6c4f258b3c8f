"""The Ray engine's inbox actor (`Inbox`): what running jobs send before they end
(``dispy_provisional_result``, ``dispy_send_file``) waits there for their clients,
which long-poll it (`dispynb.backends._rayinbox`); it also holds each open cluster's
computation for its actors (`dispynb.backends._rayworker.JobActor`).

Like `dispynb.backends._rayworker`, imported by Ray's processes and by the client;
it imports neither ``ray`` nor anything heavy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from dispynb.jobenv import unconfirmed

#: Items an `Inbox` holds at most; a job that sends more waits (back-pressure).
INBOX_LIMIT = 10_000

#: Seconds an actor waits for its cluster's computation to reach the inbox (the
#: client's `Inbox.keep` and the actor's ask come from two processes, in any order).
KEEP_WAIT = 120.0

#: The `Inbox`'s concurrency group of the calls that wait for the client's answer
#: to a file (`Inbox.wait_answer`): they do not hold the calls that carry messages.
ANSWERS = "answers"

#: What a job waiting for its file's answer is told when its cluster closes.
_CLOSED = "the cluster closed before its client saved the file"


class Inbox:
    """Messages of running jobs for their clients (an asynchronous Ray actor).

    One per `RayEngine`, shared by its clusters (no worker process of its own per
    cluster): each message starts with its cluster's token, and each cluster takes
    only its own (`take`) and drops what is left of them as it closes (`drop`). It
    also holds each open cluster's computation for its actors (`keep`).
    """

    def __init__(self) -> None:
        #: Refs to each open cluster's computation and depends files, by token.
        self.computations: dict[str, list[Any]] = {}
        #: Set when a cluster's computation is kept (or the cluster dropped).
        self.kept: dict[str, asyncio.Event] = {}
        self.items: dict[str, list[Any]] = {}
        self.events: dict[str, asyncio.Event] = {}
        #: Tokens of closed clusters: their late messages are discarded.
        self.dropped: set[str] = set()
        #: The client's answers about files, by ``(token, key, attempt, number)``:
        #: the answer, or the future a job's `wait_answer` awaits (whose loop may
        #: be another thread's: its concurrency group's).
        self.answers: dict[tuple[Any, ...], Any] = {}
        #: Files whose job stopped waiting (its timeout): their late answers are
        #: dropped, not kept for a wait that never comes.
        self.gave_up: set[tuple[Any, ...]] = set()
        self.answers_lock = threading.Lock()

    def _event(self, token: str) -> asyncio.Event:
        event = self.events.get(token)
        if event is None:
            event = self.events[token] = asyncio.Event()
        return event

    async def keep(self, token: str, stored: list[Any]) -> None:
        """Hold cluster ``token``'s computation (refs) for its actors until `drop`."""
        if token in self.dropped:
            return
        self.computations[token] = stored
        self.kept.setdefault(token, asyncio.Event()).set()

    async def computation(self, token: str) -> list[Any] | None:
        """What `keep` holds for ``token``, once it does (within `KEEP_WAIT`); None
        if the cluster closed."""
        if token in self.dropped:
            return None
        kept = self.kept.setdefault(token, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(kept.wait(), KEEP_WAIT)
        return self.computations.get(token)

    async def put(self, item: Any) -> None:
        """Keep ``item`` (``(token, ...)``) for its cluster's next `take`."""
        token = item[0]
        while len(self.items.get(token, ())) >= INBOX_LIMIT:
            if token in self.dropped:
                return
            await asyncio.sleep(0.05)
        if token in self.dropped:
            return
        self.items.setdefault(token, []).append(item[1:])
        self._event(token).set()

    async def take(self, token: str, timeout: float) -> list[Any]:
        """The messages of cluster ``token`` kept so far (without the token); waits
        up to ``timeout`` seconds for a first one (0: a look beside the client's
        long poll, which keeps waiting)."""
        if timeout <= 0:
            return self.items.pop(token, [])
        event = self._event(token)
        if not self.items.get(token):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        items = self.items.pop(token, [])
        event.clear()
        if not items and self.events.get(token) is event:
            del self.events[token]  # an idle cluster holds nothing here
        return items

    async def answer(self, token: str, ident: tuple[Any, ...], error: str) -> None:
        """The client's answer about the file ``ident`` (``(key, attempt,
        number)``) of cluster ``token``: "" once it wrote it, else why not."""
        self._answer((token, *ident), error)

    def _answer(self, key: tuple[Any, ...], error: str) -> None:
        with self.answers_lock:
            if key in self.gave_up:
                self.gave_up.discard(key)
                return
            waiting = self.answers.pop(key, None)
            if waiting is None:  # before the job asked for it
                self.answers[key] = error
        if isinstance(waiting, asyncio.Future):
            waiting.get_loop().call_soon_threadsafe(_settle, waiting, error)

    async def wait_answer(
        self, token: str, ident: tuple[Any, ...], timeout: float | None
    ) -> str:
        """The client's answer about a file a job sent (see `answer`), within
        ``timeout`` seconds (None: no limit). Called in the `ANSWERS` group."""
        key = (token, *ident)
        with self.answers_lock:
            if token in self.dropped:
                return _CLOSED
            answered = self.answers.pop(key, None)
            if answered is not None:
                return str(answered)
            waiting = asyncio.get_running_loop().create_future()
            self.answers[key] = waiting
        try:
            return str(await asyncio.wait_for(waiting, timeout))
        except TimeoutError:
            with self.answers_lock:
                if token not in self.dropped:
                    self.gave_up.add(key)
            return unconfirmed(timeout)
        finally:
            with self.answers_lock:
                if self.answers.get(key) is waiting:
                    del self.answers[key]

    async def drop(self, token: str) -> None:
        """Cluster ``token`` closed: forget its computation and its messages, now
        and to come; the jobs waiting for their files' answers are told."""
        self.computations.pop(token, None)
        with self.answers_lock:
            self.dropped.add(token)
            closed = [key for key in self.answers if key[0] == token]
            self.gave_up = {key for key in self.gave_up if key[0] != token}
        for key in closed:  # a job's waiting future, or an answer nobody awaits
            self._answer(key, _CLOSED)
        kept = self.kept.pop(token, None)
        if kept is not None:
            kept.set()
        self.items.pop(token, None)
        event = self.events.pop(token, None)
        if event is not None:
            event.set()


def _settle(future: asyncio.Future[str], error: str) -> None:
    if not future.done():
        future.set_result(error)
