"""Client programs that the recovery tests kill as a crash would (SIGKILL: nothing
of theirs runs after), for `recover_jobs` to find what they journaled."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.jobs import WAIT


def start_client(
    cwd: Path,
    script: str,
    *args: str,
    said: str = "submitted",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Write ``script`` as ``client.py`` in ``cwd`` and run it with ``args``; return
    it once its first line is ``said`` (it submitted its jobs). One that says
    anything else is killed, failing the test."""
    (cwd / "client.py").write_text(script)
    client = subprocess.Popen(
        [sys.executable, "client.py", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    line = client.stdout.readline().strip()
    if line != said:
        client.kill()
        client.wait(WAIT)
        client.stdout.close()
        raise AssertionError(f"the client said {line!r}, not {said!r}")
    return client


@contextmanager
def killed_after(client: subprocess.Popen[str]) -> Iterator[None]:
    """Run the body while ``client`` lives, then SIGKILL it; killed and its pipe
    closed whatever happens."""
    try:
        yield
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT)
    finally:
        client.kill()
        if client.stdout is not None:
            client.stdout.close()
