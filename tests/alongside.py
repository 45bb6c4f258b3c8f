"""``./dev test`` with no arguments: the whole suite as two pytest runs at once.

Much of the suite's wall time is long tests that wait (on SLURM's walltime, on Ray's
and JupyterLab's start in private namespaces, on the daemons of namespace hosts, on
nodes outliving their clients), not compute: they run in a second pytest beside the
main one, which runs everything else. Each is an ordinary serial pytest, as before:
its own session fixtures, leak checks (its own children, threads, descriptors) and
signals. The second runs in a scratch directory of its own, and so do the pytests
its tests start (`tests.nodeproc.inner_pytest`), so that each run's check against
recovery files left in the current directory (``_dispy_*``, see tests/conftest.py)
sees only its own files: the main run's clusters make such files in the checkout
all the time. The two runs share no fixed names: network namespaces, temporary
directories and ports are made per process.

The main run's output comes live, the second's after it; the exit status is the
main run's, or the second's if the main one passed.

    python -m tests.alongside   # from the checkout; ./dev test does this
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The test files of the second run: long, mostly waiting on daemons and timeouts.
#: Timing-sensitive tests (slow links, liveness, memory, bench) stay in the main run.
ALONGSIDE = (
    "tests/backends/test_ray_netns.py",
    "tests/labextension/test_lab_browser.py",
    "tests/multihost",
    "tests/backends/test_dask_multihost.py",
    "tests/backends/test_dask_multihost_notebook.py",
    "tests/backends/test_dask_notebooks.py",
    "tests/compat",
    "tests/deploy",
    # Built once per run (Sphinx, six notebooks executed) and read, not timed.
    "tests/docs",
)

#: How many of the slowest tests each run lists (pytest's ``--durations``).
DURATIONS = "--durations=20"


def main() -> int:
    python = sys.executable
    main_argv = [python, "-m", "pytest", DURATIONS]
    main_argv += [f"--ignore={path}" for path in ALONGSIDE]
    side_argv = [python, "-m", "pytest", "-p", "no:cacheprovider", DURATIONS]
    side_argv += ["--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
    side_argv += [str(ROOT / path) for path in ALONGSIDE]
    with (
        tempfile.TemporaryDirectory(prefix="dispynb-alongside-") as scratch,
        tempfile.TemporaryFile("w+") as log,
    ):
        side = subprocess.Popen(side_argv, cwd=scratch, stdout=log, stderr=log)
        first = subprocess.Popen(main_argv, cwd=ROOT)
        # Ctrl-C reaches both runs (the terminal's process group): each stops as
        # pytest does; this process only waits for them and reports. A SIGTERM
        # sent to this process alone goes on to both, as it went to the one pytest.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(
            signal.SIGTERM,
            lambda *_: [p.send_signal(signal.SIGTERM) for p in (first, side)],
        )
        main_status = first.wait()
        side_status = side.wait()
        log.seek(0)
        print(f"\n{' the tests run alongside (a second pytest) ':=^88}", flush=True)
        sys.stdout.write(log.read())
    print(
        f"./dev test: main pytest exited {main_status}, "
        f"the one alongside {side_status}",
        flush=True,
    )
    return main_status or side_status


if __name__ == "__main__":
    sys.exit(main())
