"""`SlurmNodes`' options and the batch script it submits (no SLURM needed)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

import pytest

from dispynb.deploy import LaunchError, SlurmNodes
from dispynb.errors import ConfigurationError
from dispynb.jupyter.errors import MagicError

SECRET = "top-secret-value-0123456789abcdef"


def test_job_script_has_the_directives_and_no_secret() -> None:
    with SlurmNodes(
        0,
        cpus=4,
        memory="2G",
        walltime="1:30:00",
        partition="short",
        account="proj-1",
        directives=["--qos=low", "#SBATCH --gres=gpu:1"],
        python="/opt/my venv/bin/python",
        node_args=["--drain-timeout", "5"],
        secret=SECRET,
    ) as nodes:
        script = nodes.job_script("slurm-0-abc", "10.0.0.1:4000")
    assert SECRET not in script
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=slurm-0-abc",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=2G",
        "#SBATCH --time=1:30:00",
        "#SBATCH --partition=short",
        "#SBATCH --account=proj-1",
        "#SBATCH --qos=low",
        "#SBATCH --gres=gpu:1",
    ]
    assert "'/opt/my venv/bin/python' -c 'import os, sys;" in script
    assert '"-P", "-m", "nodeserver"] + sys.argv[1:])\' --register 10.0.0.1:4000' in (
        script
    )
    assert "--cpus 4 --drain-timeout 5 --secret-stdin" in script


def test_the_script_hands_the_secret_to_the_node_on_stdin(tmp_path: object) -> None:
    """Run the script's shell part with a fake Python: it gets the secret on its
    standard input, not in its arguments or environment."""
    fake = f"{tmp_path}/python"
    with open(fake, "w") as out:
        out.write(
            "#!/bin/sh\n"
            'read -r line; echo "stdin=$line"; echo "args=$*"\n'
            'echo "env=$(env | grep -c top-secret)"\n'
        )
    os.chmod(fake, 0o755)
    with SlurmNodes(0, python=fake, secret=SECRET) as nodes:
        script = nodes.job_script("n", "h:1")
    env = {
        "PATH": os.environ["PATH"],
        "DISPYNB_LAUNCH_SECRET": SECRET,
        "DISPYNB_SECRET": SECRET,
        "SLURM_CPUS_ON_NODE": "3",
    }
    out = subprocess.run(
        ["sh"], input=script, capture_output=True, text=True, env=env, timeout=10
    ).stdout.splitlines()
    assert out[0] == f"stdin={SECRET}"
    assert SECRET not in out[1] and "--cpus 3" in out[1] and "--secret-stdin" in out[1]
    assert out[2] == "env=0"


def test_a_secret_file_keeps_the_secret_out_of_slurm(tmp_path: object) -> None:
    with SlurmNodes(0, secret=SECRET, secret_file="/home/me/.dispynb-secret") as nodes:
        script = nodes.job_script("n", "h:1")
    assert "--secret-file /home/me/.dispynb-secret" in script
    assert "--secret-stdin" not in script and "printf" not in script


@pytest.mark.parametrize(
    "options",
    [
        {"memory": "2 G"},
        {"memory": "2G\n#SBATCH --uid=0"},
        {"walltime": "soon"},
        {"partition": "a;b"},
        {"account": "x y"},
        {"directives": ["--qos=a\n--uid=0"]},
        {"directives": ["qos=a"]},
        {"cpus": 0},
        {"env": {"A B": "1"}},
        {"exit_without_client": 0},
        {"exit_without_client": float("nan")},
    ],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        SlurmNodes(0, **options)  # type: ignore[arg-type]


def test_nodes_exit_without_a_client_by_default_and_as_told() -> None:
    with SlurmNodes(0, secret=SECRET) as nodes:
        assert "--exit-without-client 120 " in nodes.job_script("n", "h:1")
    with SlurmNodes(0, secret=SECRET, exit_without_client=7.5) as nodes:
        assert "--exit-without-client 7.5 " in nodes.job_script("n", "h:1")
    with SlurmNodes(0, secret=SECRET, exit_without_client=None) as nodes:
        assert "--exit-without-client" not in nodes.job_script("n", "h:1")


def test_without_sbatch_the_error_says_so() -> None:
    with pytest.raises(LaunchError, match="SLURM login node"):
        SlurmNodes(1, sbatch="/nonexistent/sbatch", register_host="127.0.0.1")


def _failing_scontrol(directory: object, *lines: str) -> str:
    """A stand-in ``scontrol`` that writes ``lines`` on standard error, exits 1."""
    from pathlib import Path

    scontrol = Path(str(directory)) / "scontrol"
    said = "".join(f"echo '{line}' >&2\n" for line in lines)
    scontrol.write_text(f"#!/bin/sh\n{said}exit 1\n")
    scontrol.chmod(0o755)
    return str(scontrol)


def test_a_machine_without_a_slurm_configuration_says_where_to_run(
    tmp_path: object,
) -> None:
    """SLURM's commands installed on a machine that is not part of a cluster (a
    laptop, a container): scontrol's own lines alone left the user to guess that
    the launcher must run on a login node."""
    scontrol = _failing_scontrol(  # what Debian's scontrol says without slurm.conf
        tmp_path,
        "scontrol: error: fetch_config: DNS SRV lookup failed",
        "scontrol: fatal: Could not establish a configuration source",
    )
    with pytest.raises(LaunchError) as raised:
        SlurmNodes(1, scontrol=scontrol, secret=SECRET)
    assert str(raised.value) == (
        "scontrol show config failed (scontrol: error: fetch_config: DNS SRV lookup "
        "failed; scontrol: fatal: Could not establish a configuration source): "
        "SlurmNodes submits its nodes with SLURM's commands, which must work on "
        "this machine: run it on a login node of the cluster (or set SLURM_CONF to "
        "the cluster's slurm.conf), where `scontrol show config` works"
    )


def test_a_controller_that_is_down_is_named_as_such(tmp_path: object) -> None:
    """A configured login node whose slurmctld is down: not told to move."""
    scontrol = _failing_scontrol(
        tmp_path,
        "slurm_load_ctl_conf error: Unable to contact slurm controller "
        "(connect failure)",
    )
    with pytest.raises(LaunchError) as raised:
        SlurmNodes(1, scontrol=scontrol, secret=SECRET)
    assert str(raised.value) == (
        "scontrol show config failed (slurm_load_ctl_conf error: Unable to contact "
        "slurm controller (connect failure)): slurmctld does not answer (down, or "
        "restarting): try again once `scontrol ping` says it is UP"
    )


def test_a_suspension_is_said_once_and_its_end_as_an_end(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The states squeue reports in turn: a job suspended, resumed, suspended
    again (the reason changing meanwhile), then cancelled while suspended. Events:
    suspended, resumed, suspended; the cancel is said as the node's end, not as a
    resumption."""
    import asyncio

    from dispynb.deploy.launcherstate import Launched
    from dispynb.deploy.slurm import SlurmJob

    reports = iter(
        [
            "7|RUNNING|None",
            "7|SUSPENDED|None",
            "7|RUNNING|None",
            "7|SUSPENDED|None",
            "7|SUSPENDED|Priority",
            "7|CANCELLED|None",
        ]
    )

    async def squeue(*args: object, **kwargs: object) -> tuple[int, str, str]:
        return 0, next(reports) + "\n", ""

    caplog.set_level(logging.INFO, logger="dispynb.deploy.slurm")
    with SlurmNodes(0, secret=SECRET) as nodes:
        job = SlurmJob("n1", "7")
        with nodes._changed:
            nodes._launched.append(Launched("n1", job))
        monkeypatch.setattr(nodes, "_run", squeue)
        for _ in range(6):
            asyncio.run(nodes._refresh())
        said = [(e.action, e.detail) for e in nodes.events if e.node == "n1"]
    assert said == [
        ("suspended", "SLURM job 7 SUSPENDED"),
        ("resumed", "SLURM job 7 RUNNING"),
        ("suspended", "SLURM job 7 SUSPENDED"),
    ]
    assert job.state == "CANCELLED" and job.ended
    logged = [r.getMessage().split(";")[0] for r in caplog.records if "n1" in r.message]
    assert logged == [
        "node n1 suspended: SLURM job 7 SUSPENDED",
        "node n1 resumed: SLURM job 7 RUNNING",
        "node n1 suspended: SLURM job 7 SUSPENDED",
        "node n1 ended: SLURM job 7 CANCELLED",
    ], logged


def test_an_outage_of_slurmctld_is_said_once_and_its_end(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """slurmctld restarting or down: each squeue of the launcher's poll failed with
    a warning (one every 11 s, squeue retrying for 9 s: dozens in a notebook's
    cell for a few minutes' outage). Now one warning, and one line when it
    answers again."""
    import asyncio

    import dispynb.deploy.slurmjobs as slurmjobs
    from dispynb.deploy.launcherstate import Launched
    from dispynb.deploy.slurm import SlurmJob

    down = (1, "", "slurm_load_jobs error: Unable to contact slurm controller")
    answers = [down] * 4 + [(0, "7|RUNNING|None\n", "")] * 2 + [down] * 2
    calls = 0

    async def run() -> None:
        done = asyncio.Event()

        async def squeue(*args: object, **kwargs: object) -> tuple[int, str, str]:
            nonlocal calls
            calls += 1
            if calls == len(answers):
                done.set()
            return answers[min(calls, len(answers)) - 1]

        monkeypatch.setattr(nodes, "_run", squeue)
        follow = asyncio.ensure_future(nodes._follow())
        await asyncio.wait_for(done.wait(), 30)
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow

    monkeypatch.setattr(slurmjobs, "POLL_INTERVAL", 0.001)
    caplog.set_level(logging.INFO, logger="dispynb.deploy.slurm")
    job = SlurmJob("n1", "7")
    with SlurmNodes(0, secret=SECRET) as nodes:
        with nodes._changed:
            nodes._launched.append(Launched("n1", job))
        asyncio.run(run())
        job.state = "CANCELLED"  # nothing for close to cancel
    said = [
        (r.levelname, r.getMessage()[:48])
        for r in caplog.records
        if "follow" in r.getMessage()
    ]
    assert said == [
        ("WARNING", "cannot follow the nodes' SLURM jobs: squeue fail"),
        ("INFO", "following the nodes' SLURM jobs again"),
        ("WARNING", "cannot follow the nodes' SLURM jobs: squeue fail"),
    ], said


def test_dispy_slurm_register_host_is_the_address_the_nodes_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``%dispy slurm`` had no --register-host: a notebook whose compute nodes reach
    it at another address than the one routing to slurmctld (or whose ``scontrol``
    names no SlurmctldHost, the error saying "give register_host=") could not say
    which. The batch script tells the node that address (a stand-in ``sbatch``
    keeps the script and refuses it)."""
    from tests.jupyter.shell import dispynb_shell

    sbatch = tmp_path / "sbatch"
    sbatch.write_text(
        f'#!/bin/sh\ncat > {tmp_path}/script\necho "refused: a stand-in" >&2\nexit 1\n'
    )
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    line = "slurm --register-host 127.0.0.2"
    with dispynb_shell() as ip, pytest.raises(MagicError) as raised:
        ip.run_line_magic("dispy", line)
    assert "sbatch refused node" in str(raised.value), raised.value
    script = (tmp_path / "script").read_text()
    assert " --register 127.0.0.2:" in script, script
