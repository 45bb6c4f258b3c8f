"""``--config FILE`` that another user could change, for ``dispynb-node`` and
``dispynb-scheduler``: refused in one line (they would choose the program's options,
its secret and directories included; a node run as root then ran their code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nodeproc import node_env

PROGRAMS = {"dispynb-node": "nodeserver", "dispynb-scheduler": "schedserver"}

#: What such a file says: a secret of its owner's choosing (under the program's key
#: for it), and an option to show.
SECRET_KEYS = {"dispynb-node": "secret", "dispynb-scheduler": "node_secret"}


def _theirs(program: str) -> str:
    secret = "chosen-by-someone-else-0123456789abcdef"
    return f"[DEFAULT]\n{SECRET_KEYS[program]} = {secret}\nzombie_interval = 7\n"


def _config(program: str, config: Path) -> subprocess.CompletedProcess[str]:
    """The options ``config`` gives (``--save_config -``: printed, nothing started)."""
    return subprocess.run(
        [sys.executable, "-m", PROGRAMS[program], "--config", str(config),
         "--save_config", "-"],
        env=node_env(), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
@pytest.mark.parametrize("program", PROGRAMS)
def test_a_config_file_of_another_user_is_refused(tmp_path, program):
    config = tmp_path / "theirs.ini"
    config.write_text(_theirs(program))
    os.chown(config, 65534, -1)
    done = _config(program, config)
    assert done.returncode == 2, done.stdout
    assert done.stderr == (
        f"{program}: config file {str(config)!r} belongs to user 'nobody' (uid "
        "65534), who could change this program's options (its secret, the "
        "directories it writes): give a file of your own\n"
    )
    assert "zombie_interval" not in done.stdout


@pytest.mark.parametrize("mode", [0o666, 0o620])
@pytest.mark.parametrize("program", PROGRAMS)
def test_a_config_file_others_may_write_is_refused(tmp_path, program, mode):
    config = tmp_path / "shared.ini"
    config.write_text(_theirs(program))
    config.chmod(mode)
    done = _config(program, config)
    assert done.returncode == 2, done.stdout
    assert done.stderr == (
        f"{program}: config file {str(config)!r} is writable by other users (mode "
        f"{mode:04o}), who could change this program's options (its secret, the "
        f"directories it writes): chmod go-w {config}\n"
    )
    config.chmod(0o644)  # readable by all, as dispy wrote them: used
    done = _config(program, config)
    assert done.returncode == 0, done.stderr
    assert "zombie_interval = 7" in done.stdout
