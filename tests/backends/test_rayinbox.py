"""The Ray engine's `Inbox` on its own (a plain class: no Ray needed): the client's
answers about the files jobs send reach the job that waits for them, whichever
comes first, and an answer nobody will wait for is not kept."""

from __future__ import annotations

import asyncio

import pytest

from dispynb.backends._rayinboxactor import Inbox

pytestmark = pytest.mark.timeout(30)

#: A file of cluster "t": job 1, attempt 1, its first message.
FILE = (1, 1, 0)


def test_an_answer_reaches_the_job_whether_it_comes_before_or_after_the_wait() -> None:
    async def scenario() -> list[str]:
        inbox = Inbox()
        await inbox.answer("t", FILE, "")  # before the job asks
        first = await inbox.wait_answer("t", FILE, None)
        waiting = asyncio.ensure_future(inbox.wait_answer("t", (1, 1, 1), None))
        await asyncio.sleep(0)  # the job waits first
        await inbox.answer("t", (1, 1, 1), "disk full")
        return [first, await waiting, str(inbox.answers)]

    assert asyncio.run(scenario()) == ["", "disk full", "{}"]


def test_a_late_answer_to_a_job_that_stopped_waiting_is_not_kept() -> None:
    """timeout=0: the job is told the client did not confirm in time; the answer
    that comes after is dropped (before: kept until the cluster closed)."""

    async def scenario() -> tuple[str, int]:
        inbox = Inbox()
        told = await inbox.wait_answer("t", FILE, 0)
        await inbox.answer("t", FILE, "")
        return told, len(inbox.answers)

    told, kept = asyncio.run(scenario())
    assert "did not confirm it within 0" in told
    assert kept == 0


def test_a_cluster_that_closes_answers_its_waiting_jobs() -> None:
    async def scenario() -> list[str]:
        inbox = Inbox()
        waiting = asyncio.ensure_future(inbox.wait_answer("t", FILE, None))
        await asyncio.sleep(0)
        await inbox.drop("t")
        later = await inbox.wait_answer("t", (1, 1, 1), None)
        return [await waiting, later, str(inbox.answers)]

    waited, later, left = asyncio.run(scenario())
    assert "the cluster closed" in waited and "the cluster closed" in later
    assert left == "{}"
