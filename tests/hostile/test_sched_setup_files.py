"""One user of a scheduler sets up computations that list very many files.

A computation's setup lists the files it depends on; the scheduler keeps the
setup, and a claim on each file, while the computation lives (waiting for the
files, here). ``--max_user_args`` bounded its functions only: a setup listing
200,000 files (15 MiB sent) held 180 MiB of the scheduler's memory, counted as
nothing, and a user's 16 computations could hold 3 GiB; so did a setup's texts
(a name of 15 MiB). Each file listed counts now (`FILE_ENTRY_COST`), and the
texts, and a setup over the quota is refused, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb import JobCluster, LocalCluster, SharedJobCluster
from dispynb.protocol import serialize
from dispynb.protocol.messages import ComputationSetup
from tests.hostile.test_scheduler import args_quota_attack, people, shared_nodes
from tests.sharedsched.harness import (
    SchedulerProcess,
    raw_scheduler_session,
    refusals_within,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Mallory's quota, her computations, the files each lists, and what the
#: scheduler may grow by meanwhile (a setup being decoded takes memory a while).
QUOTA = 32 * MiB
COMPUTATIONS = 6
FILES = 60_000
BOUND = 160 * MiB
#: Characters of each computation's name in the second attack, its computations,
#: and what the scheduler may grow by (two of them fit in her quota).
NAME = 15 * MiB
NAMED = 10
NAMED_BOUND = 200 * MiB
#: Seconds her setups may take to be answered.
WAIT = 30


def identity(n: int) -> int:
    return n


async def _set_up(
    sched: SchedulerProcess, credential: Path, count: int, long_names: bool = False
) -> tuple[int, list[str]]:
    """Set up ``count`` computations listing `FILES` files each (never sent),
    or named with `NAME` characters (``long_names``): the scheduler's growth, and
    the refusals."""
    assert sched.proc is not None
    scheduler = psutil.Process(sched.proc.pid)
    # (It takes what the scheduler says of the files: which are missing.)
    conn = await raw_scheduler_session(sched.port, credential, max_message_size=1 << 30)
    try:
        before = scheduler.memory_info().rss
        bundle = serialize.dumps({"func": identity, "setup": None, "setup_args": ()})
        for comp_id in range(1, count + 1):
            files = [[f"f{i}", f"{comp_id:02x}{i:062x}", 1] for i in range(FILES)]
            setup = ComputationSetup(
                comp_id=comp_id,
                name=f"{comp_id:x}" * NAME if long_names else f"many-{comp_id}",
                workers=1,
                files=[] if long_names else files,
            )
            conn.write(setup, bundle)
            await conn.flush()
        # The setups answered, or not refused.
        refusals = await refusals_within(conn, 15, count)
        return scheduler.memory_info().rss - before, refusals
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-setup-files",
    title=f"A scheduler user sets up {COMPUTATIONS} computations listing "
    f"{FILES:,} files each, never sent (--max_user_args {QUOTA // MiB}M)",
    goal=f"the scheduler grows by under {BOUND // MiB} MiB, her setups over the "
    "quota refused naming --max_user_args; another user's jobs run (was: the "
    "files listed not counted: +334 MiB)",
)
def test_the_files_a_setup_lists_count_in_the_users_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    attack = functools.partial(_set_up, count=COMPUTATIONS)
    grown, refusals, alices = args_quota_attack(tmp_path, people, QUOTA, attack)
    measure(
        f"scheduler +{grown / MiB:.0f} MiB; {len(refusals)} of {COMPUTATIONS} "
        f"setups refused ({refusals[0][:90] if refusals else 'none'}...); alice's "
        f"results {alices}"
    )
    assert grown < BOUND
    assert len(refusals) == COMPUTATIONS
    assert all("--max_user_args" in text for text in refusals)
    assert alices == [0, 1, 4, 9]


@pytest.mark.attack(
    id="sched-setup-name",
    title=f"A scheduler user sets up {NAMED} computations named with "
    f"{NAME // MiB} MiB of text each (--max_user_args {QUOTA // MiB}M)",
    goal=f"the scheduler grows by under {NAMED_BOUND // MiB} MiB, her setups over "
    "the quota refused naming --max_user_args (was: the name not counted: +39 MiB "
    "a setup)",
)
def test_a_setups_texts_count_in_the_users_quota(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(
        tmp_path, people, "--max_user_args", f"{QUOTA // MiB}M"
    ) as sched:  # fmt: skip
        grown, refusals = asyncio.run(
            _set_up(sched, people["mallory"], NAMED, long_names=True)
        )
    measure(
        f"scheduler +{grown / MiB:.0f} MiB; {len(refusals)} of {NAMED} "
        f"setups refused ({refusals[0][:90] if refusals else 'none'}...)"
    )
    assert grown < NAMED_BOUND
    assert len(refusals) >= NAMED - QUOTA // NAME
    assert all("--max_user_args" in text for text in refusals)


#: Files a cluster taking messages of `SMALL_LIMIT` bytes depends on: asked for
#: in one message, their digests would take some 140 kB.
DEPENDS = 2000
SMALL_LIMIT = 64 * 1024


def count_files(n: int) -> int:
    """How many of the files the computation depends on its job finds."""
    import os

    return sum(1 for name in os.listdir(".") if name.startswith("dep-")) + n


@pytest.mark.attack(
    id="files-missing-limit",
    title=f"A cluster taking messages of {SMALL_LIMIT // 1024} KiB at most "
    f"(max_message_size) depends on {DEPENDS:,} files, through a shared scheduler "
    "and straight to a node",
    goal="its files asked for in messages it takes, all sent; its job finds them "
    "(was: all asked for in one message of 140 kB, over its limit: the client "
    "dropped the scheduler, and the node)",
)
@pytest.mark.parametrize("via", ["scheduler", "node"])
def test_files_are_asked_for_in_messages_the_client_takes(
    via: str, tmp_path: Path, people: dict[str, Path], measure
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    depends = []
    for i in range(DEPENDS):
        path = files / f"dep-{i:05d}"
        path.write_text(f"file {i}\n")
        depends.append(str(path))
    options: dict[str, Any] = {
        "depends": depends,
        "max_message_size": SMALL_LIMIT,
        "pulse_interval": 0.5,
    }
    with contextlib.ExitStack() as stack:
        if via == "scheduler":
            sched = stack.enter_context(
                shared_nodes(
                    tmp_path, people, "--max_files", str(DEPENDS + 8), nofile=4096
                )
            )
            cluster = stack.enter_context(
                SharedJobCluster(
                    count_files,
                    scheduler_host=sched.address,
                    secret_file=str(people["alice"]),
                    **options,
                )
            )
        else:
            nodes = stack.enter_context(LocalCluster(nodes=1, cpus=1))
            cluster = stack.enter_context(
                JobCluster(count_files, nodes=nodes, **options)
            )
        job = cluster.submit(0)
        cluster.wait(timeout=WAIT)
        found, status = job.result, job.status.name
    measure(f"{via}: job {status}, found {found} of {DEPENDS:,} files")
    assert found == DEPENDS
