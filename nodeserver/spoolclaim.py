"""Which kept-results spool (`nodeserver.spool`) is a node's, when nodes share a
destination directory (its default, ``<tmp>/dispynb``, is every node's of a user
on the machine).

One cluster gives the same recovery id to each of its nodes, and a spool names its
directories by that id: two nodes sharing a spool removed each other's results as
they set the computation up (`ResultSpool.create`), and the first to hand its
results to ``recover_jobs`` deleted the other's; a node started again offered the
other's results as its own. So each running node holds a spool of its own, by the
``flock`` of its directory, as each holds a file store (`nodeserver.filestore`).

Results must outlive the node process, so a spool is not removed when its node
stops: the next node takes it; but one of its own (``.kept-*``) holding none is
(and by the next node's sweep, if its node crashed): each fixed ``--port`` ever used
beside another node left one for ever. A client finds a node again by its address, so a
node with a fixed ``--port`` takes the spool a node of that port used last; one
with none (or whose port has none) takes ``.kept`` or another spool left by a node
of no fixed port, and makes a new one (``.kept-*``) only when none is free.

A spool no running node holds is read only by the next node of its port: one whose
node never returns (its port retired, its machine's address changed) kept its
results on the disk for ever. So a node that starts removes, from the spools no
node holds, the results whose time to be kept is over (as their node would have).

The nodes sharing a destination directory claim and sweep one at a time, under the
``flock`` of ``.kept.lock`` there: a sweep holds each spool it looks at, and a node
of a fixed port starting meanwhile found its own spool held, made another, and lost
its results to ``recover_jobs``; a spool just made could be taken by another node
before its maker locked it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator

from dispynb.daemon import read_own_file, replace_file
from dispynb.wording import counted
from nodeserver.filestore import lock_dir
from nodeserver.spool import ResultSpool

logger = logging.getLogger(__name__)

#: The spool of the first node in a destination directory (older nodes' only one).
SHARED = ".kept"
#: File in a spool naming the port of the node that used it last (none: no port).
_OWNER = ".port"
#: File in the destination directory whose ``flock`` its nodes claim and sweep under.
_CLAIMS = ".kept.lock"
#: Seconds a node waits for another's claim or sweep (`_one_at_a_time`).
CLAIM_WAIT = 10.0


class SpoolClaim:
    """A node's spool directory ``root``, held by the ``flock`` of ``fd`` while the
    node runs; None: none (the node keeps its results in memory)."""

    def __init__(self, root: str | None, fd: int | None) -> None:
        self.root = root
        self.fd = fd

    def release(self) -> None:
        """The node stops: the spool stays (for the next node), unlocked; one of
        its own (``.kept-*``) holding no results is removed (`_remove_if_empty`)."""
        if self.fd is not None:
            if self.root is not None:
                _remove_at_exit(self.root)
            os.close(self.fd)
            self.fd = None


def claim_spool(dest_path: str, port: int) -> SpoolClaim:
    """The spool of a node whose configured port is ``port`` (0: none) in
    ``dest_path`` (see the module's docstring). If none can be had (a full disk, a
    directory the node cannot write to), ``.kept`` if no other node holds it (the
    spool says what it cannot do there), else none (see `_fallback`)."""
    try:
        os.makedirs(os.path.join(dest_path, SHARED), mode=0o700, exist_ok=True)
        with _one_at_a_time(dest_path):
            claim = _claim(dest_path, port)
            _remove_expired_unheld(dest_path, str(claim.root))
    except OSError as exc:
        return _fallback(dest_path, exc)
    return claim


def _fallback(dest_path: str, exc: OSError) -> SpoolClaim:
    """``.kept``, locked, when no spool could be claimed for ``exc``; none (results
    kept in memory) if another node holds it: a node that used another's spool
    removed its results as it set a computation up, and offered them as its own
    when started again."""
    shared = os.path.join(dest_path, SHARED)
    try:
        fd = lock_dir(shared)
    except OSError as error:  # not a directory it can open: no node's spool either
        logger.warning(
            "cannot claim a kept-results spool in %s: %s (%s)", dest_path, exc, error
        )
        return SpoolClaim(shared, None)  # the spool says what it cannot do there
    if fd is not None:
        logger.warning(
            "cannot claim a kept-results spool in %s (%s): this node uses %s",
            dest_path,
            exc,
            shared,
        )
        return SpoolClaim(shared, fd)
    logger.warning(
        "cannot claim a kept-results spool in %s (%s), and another node holds %s: "
        "this node keeps results for clients that may come back in memory only "
        "(lost if it stops); free space there, or give it a --dest-path of its own",
        dest_path,
        exc,
        shared,
    )
    return SpoolClaim(None, None)


@contextlib.contextmanager
def _one_at_a_time(dest_path: str) -> Iterator[None]:
    """Hold the ``flock`` of `_CLAIMS` in ``dest_path``, waiting for the node that
    holds it (a claim and a sweep take a moment) for `CLAIM_WAIT` seconds at most:
    a node stopped (SIGSTOP) or stuck on its disk as it held it is not to keep
    every other node from starting. Then the claim goes on without it (logged)."""
    path = os.path.join(dest_path, _CLAIMS)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + CLAIM_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning(
                        "another node has held %s for %.0f s (stopped, or stuck on "
                        "its disk?): this node claims a kept-results spool without it",
                        path,
                        CLAIM_WAIT,
                    )
                    break
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _claim(dest_path: str, port: int) -> SpoolClaim:
    spools = [(path, _owner(path)) for path in _spools(dest_path)]
    mine = [path for path, owner in spools if port and owner == port]
    for path in mine + [path for path, owner in spools if not owner]:
        with contextlib.suppress(FileNotFoundError):
            fd = lock_dir(path)
            if fd is not None:
                return _own(path, fd, port)
    root = tempfile.mkdtemp(prefix=f"{SHARED}-", dir=dest_path)
    fd = lock_dir(root)
    if fd is None:
        raise OSError(f"cannot lock the new kept-results spool {root}")
    logger.info(
        "the kept-results spools in %s are %s: this node keeps its own in %s",
        dest_path,
        _whose(spools, port),
        root,
    )
    return _own(root, fd, port)


def _whose(spools: list[tuple[str, int]], port: int) -> str:
    """Why none of ``spools`` (path, owner's port) is this node's of ``port``: held
    by nodes running there, or kept for the nodes of other ports, which may start
    again (it said "other nodes use" them with no other node running: a node
    moved to another port, or started with --port 0, found its old spool kept)."""
    running = 0
    waiting: set[int] = set()
    for path, owner in spools:
        with contextlib.suppress(OSError):
            fd = lock_dir(path)
            if fd is None:
                running += 1
                continue
            os.close(fd)
            if owner and owner != port:
                waiting.add(owner)
    said = []
    if running:
        said.append(f"used by {counted(running, 'other node')} running there")
    if waiting:
        ports = ", ".join(str(p) for p in sorted(waiting))
        said.append(
            f"kept for the {'node' if len(waiting) == 1 else 'nodes'} of port "
            f"{ports} (their clients' results wait for them to start again there)"
        )
    return " and ".join(said) or "used by other nodes"


def _spools(dest_path: str) -> list[str]:
    """``.kept``, then the other spools (``.kept-*``) in ``dest_path``."""
    others = []
    with os.scandir(dest_path) as entries:
        for entry in entries:
            if entry.name.startswith(f"{SHARED}-") and entry.is_dir(
                follow_symlinks=False
            ):
                others.append(entry.path)
    return [os.path.join(dest_path, SHARED), *sorted(others)]


def _owner(path: str) -> int:
    """The port of the node that used spool ``path`` last; 0 if none (or unknown)."""
    try:  # never a FIFO a job put there: a node's start hung on it
        return int(read_own_file(os.path.join(path, _OWNER), 64))
    except (OSError, ValueError):
        return 0


def _own(path: str, fd: int, port: int) -> SpoolClaim:
    """Spool ``path``, locked by ``fd``, is now the node's of ``port``."""
    try:
        if _owner(path) != port:
            replace_file(os.path.join(path, _OWNER), f"{port}\n", 0o600)
    except BaseException:
        os.close(fd)
        raise
    return SpoolClaim(path, fd)


def _remove_expired_unheld(dest_path: str, mine: str) -> None:
    """Remove the expired results of the spools no node holds (under the lock of
    the claims: a node starting meanwhile waits, and then finds its spool free)."""
    removed = freed = 0
    with contextlib.suppress(OSError):
        for path in _spools(dest_path):
            if path == mine:
                continue
            with contextlib.suppress(OSError):
                fd = lock_dir(path)
                if fd is None:
                    continue  # a running node's
                try:
                    count, size = ResultSpool(path, 0).remove_expired()
                    _remove_if_empty(path)  # a node's that ended without (crashed)
                finally:
                    os.close(fd)
                removed += count
                freed += size
    if removed:
        logger.info(
            "removed the expired results of %s (%.1f MiB) kept by "
            "nodes no longer running in %s",
            counted(removed, "computation"),
            freed / 2**20,
            dest_path,
        )


def _remove_at_exit(path: str) -> None:
    """Remove spool ``path`` if empty (`_remove_if_empty`) as its node exits, under
    the claims' lock if free now; else the next node's sweep removes it (a node
    stopping waits for no other)."""
    try:
        fd = os.open(
            os.path.join(os.path.dirname(path), _CLAIMS),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove_if_empty(path)
    except OSError:
        pass  # another node claims: its sweep removes it
    finally:
        os.close(fd)


def _remove_if_empty(path: str) -> None:
    """Remove spool ``path``, held by this process, if it is one of its own
    (``.kept-*``) holding no results: only its `_OWNER`. Each fixed ``--port`` ever
    used left one for ever; the next node of that port, finding none, takes
    another (there was nothing to take back). Called under the claims' lock: a node
    claiming could open the directory just before it is removed."""
    if not os.path.basename(path).startswith(f"{SHARED}-"):
        return
    with contextlib.suppress(OSError):
        if set(os.listdir(path)) <= {_OWNER}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, _OWNER))
            os.rmdir(path)  # fails if a result came meanwhile: kept
