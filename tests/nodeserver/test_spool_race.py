"""Nodes that share a destination directory start together (a LocalCluster's, a
machine's nodes at boot): each must get a kept-results spool of its own, and a node
of a fixed port the one it used last (its kept results, for ``recover_jobs``)."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest

from nodeserver import spoolclaim
from nodeserver.spoolclaim import SpoolClaim, claim_spool

#: Three nodes of fixed ports and three of none, as they start at once.
PORTS = [9711, 9712, 9713, 0, 0, 0]


def keep_a_computation(spool: str) -> None:
    """Put a computation's kept results (for an hour) in ``spool``."""
    os.makedirs(f"{spool}/c0", exist_ok=True)
    meta = {"name": "c0", "keep": 3600, "expires": time.time() + 3600}
    with open(f"{spool}/c0/meta", "w") as handle:
        json.dump(meta, handle)


def _start_together(dest: str) -> list[tuple[int, str, bool]]:
    """Fork a process per port of `PORTS` that claims its spool (sweeping the
    others) as the others do, all let go at once; each holds its claim until all
    claimed. Their ``(port, spool, locked)``."""
    go_r, go_w = os.pipe()  # end of file: go
    out_r, out_w = os.pipe()  # one line per claim
    stop_r, stop_w = os.pipe()  # end of file: release
    pids = []
    for port in PORTS:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                for fd in (go_w, out_r, stop_w):
                    os.close(fd)
                os.read(go_r, 1)
                claim = claim_spool(dest, port)
                line = json.dumps([port, claim.root, claim.fd is not None]) + "\n"
                os.write(out_w, line.encode())
                keep_a_computation(str(claim.root))  # so the spool stays
                os.read(stop_r, 1)
                claim.release()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for fd in (go_r, out_w, stop_r):
        os.close(fd)
    os.close(go_w)
    try:
        with os.fdopen(out_r) as out:
            lines = [out.readline() for _ in PORTS]
    finally:
        os.close(stop_w)
        for pid in pids:
            os.waitpid(pid, 0)
    return [tuple(json.loads(line)) for line in lines]  # type: ignore[misc]


@pytest.mark.timeout(120)
def test_nodes_starting_together_each_get_their_own_spool_back(tmp_path: Path):
    """A node sweeping the spools no node holds held each one a moment: a node of a
    fixed port starting meanwhile found its own held, took another and lost its
    kept results (11 of 120 starts here)."""
    last: dict[int, str] = {}
    moved = shared = unlocked = 0
    for _ in range(25):
        claims = _start_together(str(tmp_path))
        roots = [root for _port, root, _locked in claims]
        shared += len(roots) - len(set(roots))
        unlocked += sum(not locked for _port, _root, locked in claims)
        for port, root, _locked in claims:
            if port:
                moved += last.setdefault(port, root) != root
    spools = [name for name in os.listdir(tmp_path) if name.startswith(".kept")]
    assert (moved, shared, unlocked) == (0, 0, 0)
    assert len(spools) == len(PORTS) + 1  # and the lock file


@pytest.mark.timeout(60)
def test_a_node_stopped_as_it_claims_does_not_keep_others_from_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A node stopped (SIGSTOP) or stuck on its disk while it holds the claims'
    lock: another node starting there waits `CLAIM_WAIT`, then claims a spool."""
    monkeypatch.setattr(spoolclaim, "CLAIM_WAIT", 0.5, raising=False)
    os.makedirs(tmp_path / ".kept")
    held = os.open(tmp_path / ".kept.lock", os.O_RDWR | os.O_CREAT, 0o600)
    claims: list[SpoolClaim] = []
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # the stopped node's
        starting = threading.Thread(
            target=lambda: claims.append(claim_spool(str(tmp_path), 9711))
        )
        starting.start()
        starting.join(timeout=10)
        assert not starting.is_alive(), "the node waits for the stopped one"
    finally:
        os.close(held)
        starting.join()
    assert [claim.root for claim in claims] == [str(tmp_path / ".kept")]
    assert claims[0].fd is not None
    claims[0].release()
    assert "claims a kept-results spool without it" in caplog.text


def test_a_node_starting_removes_the_spools_left_empty_by_others(tmp_path: Path):
    """The ``.kept-*`` spools of nodes gone without removing theirs (killed, or
    older versions) holding no results are removed by the next node's sweep; one
    holding results is not."""
    for name, port in ((".kept-empty", 9711), (".kept-full", 9712)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / ".port").write_text(f"{port}\n")
    keep_a_computation(str(tmp_path / ".kept-full"))
    claim = claim_spool(str(tmp_path), 9713)
    claim.release()
    assert claim.root == str(tmp_path / ".kept")
    assert sorted(os.listdir(tmp_path)) == [".kept", ".kept-full", ".kept.lock"]
